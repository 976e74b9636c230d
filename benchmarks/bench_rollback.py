"""How long `ragstream rollback` takes for a tenant of many documents.

    .venv/bin/python benchmarks/bench_rollback.py [--documents 10000] [--other-documents 10000]
        [--chunks 4] [--dimensions 512] [--database-url URL] [--json PATH]

One database of its own, loaded with SQL (as the pipeline would have left it, without running
it): a tenant of `--documents` documents and another tenant of `--other-documents`, each
document with `--chunks` chunks of two chunker versions (A, then B) and embeddings at
`--dimensions` of two models (M for both versions, N for B's chunks), and pointing at B and N,
as after a re-chunk and a model change. Then, for the tenant, what an operator runs: `rollback
embedding --to M:DIMS` (a dry run, then the move) and `rollback chunker --to A` (the same),
through `ragstream.rollback.rollback`, the CLI's path. It prints each one's time: the statement
as the client saw it, and the whole call with its connection.

It starts its own PostgreSQL in a temporary directory (or uses the server named by
`--database-url` or RAGSTREAM_DATABASE_URL), creates a database for the run and drops it.
The vectors' HNSW index is not built: a rollback reads and writes no vector.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from uuid import uuid4

import asyncpg

from benchmarks.bench_pipeline import create_database, drop_database
from benchmarks.bench_search import run_on_postgres
from ragstream.logs import configure_logging
from ragstream.rollback import RollbackRequest, rollback
from ragstream.settings import load_settings
from ragstream.store import migrate

TENANT, OTHER = "bench-tenant", "bench-other"
VERSION_A, VERSION_B = "md-1:cl100k_base:t400:o40", "md-1:cl100k_base:t200:o20"
MODEL_M, MODEL_N = "text-embedding-3-small", "text-embedding-3-large"

_DOCUMENTS = """
INSERT INTO documents (document_id, tenant_id, filename, sha256, status, stage_rank,
                       chunk_count, current_parse_sha256, current_chunker_version,
                       current_embedding_model, current_embedding_dimensions,
                       searchable_chunker_version)
SELECT $1 || '-' || lpad(n::text, 6, '0'), $1, 'doc-' || n || '.md', md5($1 || n), 'embedded', 4,
       $2, md5('parse' || $1 || n), $3, $4, $5, $3
FROM generate_series(1, $6) AS n
"""
_CHUNKS = """
INSERT INTO chunks (document_id, chunker_version, chunk_index, tenant_id, text, text_sha256,
                    token_count, char_start, char_end, parse_sha256)
SELECT d.document_id, $2, i, d.tenant_id, 'chunk ' || i || ' of ' || d.document_id || ' ' || $2,
       md5(d.document_id || $2 || i), 50, 0, 200, d.current_parse_sha256
FROM documents d, generate_series(0, $3 - 1) AS i
WHERE d.tenant_id = $1
"""
_EMBEDDINGS = """
INSERT INTO embeddings (document_id, chunker_version, chunk_index, model, dimensions, tenant_id,
                        text_sha256, provider, embedding)
SELECT c.document_id, c.chunker_version, c.chunk_index, $3, $4, c.tenant_id, c.text_sha256,
       -- `0 * c.chunk_index` ties the subquery to the row: a vector of its own for each
       'openai', ARRAY(SELECT random() - 0.5 + 0 * c.chunk_index
                       FROM generate_series(1, $4))::vector
FROM chunks c
WHERE c.tenant_id = $1 AND c.chunker_version = $2
"""


async def load(dsn: str, tenant: str, documents: int, chunks: int, dims: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_DOCUMENTS, tenant, chunks, VERSION_B, MODEL_N, dims, documents)
        for version in (VERSION_A, VERSION_B):
            await conn.execute(_CHUNKS, tenant, version, chunks)
        for version, model in ((VERSION_A, MODEL_M), (VERSION_B, MODEL_M), (VERSION_B, MODEL_N)):
            await conn.execute(_EMBEDDINGS, tenant, version, model, dims)
    finally:
        await conn.close()


async def timed(dsn: str, kind: str, to: str, *, dry_run: bool) -> dict[str, object]:
    settings = load_settings(postgres={"url": dsn})
    request = RollbackRequest.build(kind, to, tenants=[TENANT])
    started = time.perf_counter()
    report = await rollback(settings, request, dry_run=dry_run)
    return {
        "kind": kind,
        "to": to,
        "dry_run": dry_run,
        "documents": report.move.documents,
        "moved": report.move.ready if dry_run else report.move.moved,
        "lacking": report.move.lacking,
        "statement_s": round(report.seconds, 3),
        "call_s": round(time.perf_counter() - started, 3),
    }


async def bench(args: argparse.Namespace, server_dsn: str) -> dict[str, object]:
    name = f"bench_rollback_{uuid4().hex[:8]}"
    dsn = await create_database(server_dsn, name)
    try:
        await migrate(dsn)
        started = time.perf_counter()
        await load(dsn, TENANT, args.documents, args.chunks, args.dimensions)
        if args.other_documents:
            await load(dsn, OTHER, args.other_documents, args.chunks, args.dimensions)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()
        load_s = time.perf_counter() - started
        runs = []
        for kind, to in (("embedding", f"{MODEL_M}:{args.dimensions}"), ("chunker", VERSION_A)):
            runs.append(await timed(dsn, kind, to, dry_run=True))
            runs.append(await timed(dsn, kind, to, dry_run=False))
    finally:
        await drop_database(server_dsn, name)
    return {
        "documents": args.documents,
        "other_documents": args.other_documents,
        "chunks_per_version": args.chunks,
        "dimensions": args.dimensions,
        "load_s": round(load_s, 1),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--other-documents", type=int, default=10_000)
    parser.add_argument("--chunks", type=int, default=4, help="per document and version")
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--database-url", default=os.environ.get("RAGSTREAM_DATABASE_URL"))
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    report = run_on_postgres(bench, args, "rollback")
    print(
        f"tenant of {report['documents']} documents beside one of {report['other_documents']}, "
        f"{report['chunks_per_version']} chunks per version, {report['dimensions']} dimensions; "
        f"load {report['load_s']} s"
    )
    for run in report["runs"]:  # type: ignore[attr-defined]
        what = "dry run of" if run["dry_run"] else "rolled back"
        print(
            f"{what} {run['moved']} documents to {run['kind']} {run['to']} in "
            f"{run['statement_s']:.3f} s (the whole call {run['call_s']:.3f} s; "
            f"{run['lacking']} lacking)"
        )
    sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
