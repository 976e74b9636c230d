"""Recall and latency of the served search against an exact scan.

    .venv/bin/python benchmarks/bench_search.py [--chunks 20000] [--other-chunks 5000]
        [--queries 200] [--ef-search 40 100 ...] [--exact-limit N ...] [--database-url URL]
        [--json PATH]

One generated corpus in a database of its own: a tenant of `--chunks` chunks (documents of 10
chunks, each chunk four sentences of the bundled samples' prose drawn at random, so chunks
share vocabulary as real documents do) among two other tenants of `--other-chunks` each, all
embedded with the local embedder at the default 512 dimensions, as the pipeline stores them
(the HNSW index built once the rows are in, as `ragstream db migrate` builds it on a loaded
table). Queries are one sentence of a random chunk of the big tenant, or six of its words.

For the big tenant and for one of the others (a tenant that is a sixth of the table, so the
index's graph is mostly other tenants' rows), and for each setting (every `--ef-search` value
with the exact-scan limit below the tenant's size, then every `--exact-limit` value at the
first ef_search), it runs every query through
`Store.search` (the served path, k=10) and through an exact scan of the same rows, and reports
recall@10 (the share of the exact top 10 that the served search returns), how often the served
first hit is the exact first, and the served search's p50/p95 latency. Latency is of this
machine at that moment: the benchmark asserts nothing.

It starts its own PostgreSQL in a temporary directory (or uses the server named by
`--database-url` or RAGSTREAM_DATABASE_URL), creates a database for the run and drops it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import asyncpg
from pgvector.asyncpg import register_vector

from benchmarks.bench_pipeline import _sample_prose, create_database, drop_database
from ragstream.logs import configure_logging
from ragstream.providers.embed.local import LOCAL_MODEL, LocalEmbedder
from ragstream.store import (
    ChunkRow,
    ChunkSet,
    EmbeddingSet,
    StatusChange,
    Store,
    Upload,
    ensure_vector_index,
    migrate,
)
from ragstream.store import _sql as sql

DIMS = 512
K = 10
PER_DOC = 10
CHUNKER = "md-v1"


@dataclass(frozen=True)
class Row:
    setting: str
    ef_search: int
    exact_limit: int
    recall_at_10: float
    first_hit_same: float
    p50_ms: float
    p95_ms: float


def _sentences() -> list[str]:
    paragraphs, _ = _sample_prose()
    out = [s.strip() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p)]
    return [s for s in out if len(s) > 30]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def load_tenant(
    store: Store, tenant: str, chunks: int, rng: random.Random, pool: list[str]
) -> list[str]:
    """`chunks` chunks of the tenant, embedded locally; their texts, in order."""
    embedder = LocalEmbedder(DIMS)
    texts: list[str] = []
    for d in range(chunks // PER_DOC):
        doc = f"{tenant}-{d:05d}"
        body = [" ".join(rng.sample(pool, 4)) for _ in range(PER_DOC)]
        markdown = "\n\n".join(body)
        await store.register_upload(
            Upload(
                document_id=doc,
                tenant_id=tenant,
                filename=f"{doc}.md",
                content_type="text/markdown",
                size_bytes=len(markdown),
                sha256=_sha(markdown),
                source_uri=f"blob://{_sha(markdown)}",
                metadata={},
                correlation_id=f"corr-{doc}",
                uploaded_at=datetime.now(UTC),
            )
        )
        rows = [
            ChunkRow(i, t, _sha(t), ["Doc", f"§{i}"], len(t.split()), 0, len(t), 1)
            for i, t in enumerate(body)
        ]
        await store.save_chunks(ChunkSet(doc, tenant, CHUNKER, {}, rows))
        await store.advance_status(StatusChange(doc, "chunked", current_chunker_version=CHUNKER))
        vectors = embedder.embed_sync(body).vectors
        await store.save_embeddings(
            EmbeddingSet(
                doc,
                tenant,
                CHUNKER,
                LOCAL_MODEL,
                DIMS,
                "local",
                [(r.index, r.text_sha256, v) for r, v in zip(rows, vectors, strict=True)],
            )
        )
        await store.advance_status(
            StatusChange(
                doc,
                "embedded",
                current_embedding_model=LOCAL_MODEL,
                current_embedding_dimensions=DIMS,
            )
        )
        texts.extend(body)
    return texts


def questions(texts: list[str], count: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(count):
        chunk = rng.choice(texts)
        if i % 2 == 0:
            sentences = re.split(r"(?<=[.!?])\s+", chunk)
            out.append(rng.choice(sentences))
        else:
            words = chunk.split()
            start = rng.randrange(max(1, len(words) - 6))
            out.append(" ".join(words[start : start + 6]))
    return out


Key = tuple[str, int]


async def exact_top(
    conn: asyncpg.Connection, tenant: str, vectors: list[list[float]]
) -> list[list[Key]]:
    """The exact top k of every query: every row of the tenant measured."""
    exact_sql = sql.search_sql(DIMS, exact=True)
    out = []
    for q in vectors:
        rows = await conn.fetch(exact_sql, tenant, q, LOCAL_MODEL, K)
        out.append([(r["document_id"], r["chunk_index"]) for r in rows])
    return out


async def measure(
    store: Store,
    tenant: str,
    vectors: list[list[float]],
    truths: list[list[Key]],
    ef_search: int,
    exact_limit: int,
    setting: str,
) -> Row:
    found = same_first = 0
    latencies = []
    for q, truth in zip(vectors, truths, strict=True):
        t0 = time.perf_counter()
        hits = await store.search(
            tenant, q, LOCAL_MODEL, DIMS, K, ef_search=ef_search, exact_limit=exact_limit
        )
        latencies.append((time.perf_counter() - t0) * 1000)
        served = [(h.document_id, h.chunk_index) for h in hits]
        found += len(set(served) & set(truth))
        same_first += bool(served and truth and served[0] == truth[0])
    latencies.sort()
    return Row(
        setting,
        ef_search,
        exact_limit,
        round(found / (K * len(vectors)), 4),
        round(same_first / len(vectors), 4),
        round(statistics.median(latencies), 2),
        round(latencies[max(0, int(len(latencies) * 0.95) - 1)], 2),
    )


async def bench(args: argparse.Namespace, server_dsn: str) -> dict[str, object]:
    name = f"bench_search_{uuid4().hex[:8]}"
    dsn = await create_database(server_dsn, name)
    try:
        await migrate(dsn)
        rng = random.Random(20)
        pool = _sentences()
        big = "bench-big"
        t0 = time.perf_counter()
        async with await Store.connect(dsn, min_size=1, max_size=2) as store:
            texts = await load_tenant(store, big, args.chunks, rng, pool)
            small = "bench-other-a"
            small_texts = await load_tenant(store, small, args.other_chunks, rng, pool)
            await load_tenant(store, "bench-other-b", args.other_chunks, rng, pool)
            load_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            await ensure_vector_index(dsn, DIMS)
            index_s = time.perf_counter() - t1
            conn = await asyncpg.connect(dsn)
            await register_vector(conn)
            await conn.execute("ANALYZE")
            try:
                embedder = LocalEmbedder(DIMS)
                rows: list[Row] = []
                for tenant, pool_texts, size in (
                    (big, texts, args.chunks),
                    (small, small_texts, args.other_chunks),
                ):
                    qs = questions(pool_texts, args.queries, rng)
                    vectors = embedder.embed_sync(qs).vectors
                    truths = await exact_top(conn, tenant, vectors)
                    for ef in args.ef_search:
                        label = f"{size} chunks, hnsw ef={ef}"
                        rows.append(await measure(store, tenant, vectors, truths, ef, 1, label))
                    for limit in args.exact_limit:
                        kind = "exact scan" if limit > size else f"exact below {limit}"
                        label = f"{size} chunks, {kind}"
                        ef = args.ef_search[0]
                        rows.append(await measure(store, tenant, vectors, truths, ef, limit, label))
            finally:
                await conn.close()
    finally:
        await drop_database(server_dsn, name)
    return {
        "tenant_chunks": args.chunks,
        "other_chunks": 2 * args.other_chunks,
        "queries": args.queries,
        "load_s": round(load_s, 1),
        "index_build_s": round(index_s, 1),
        "rows": [asdict(r) for r in rows],
    }


def local_postgres(stack: ExitStack, directory: Path) -> str:
    from ragstream.devstack.postgres import LocalPostgres
    from ragstream.settings import load_settings
    from tests.conftest import free_port

    own = load_settings(devstack={"data_dir": directory, "postgres_port": free_port()})
    postgres = LocalPostgres.from_settings(own)
    stack.callback(postgres.stop)
    postgres.start()
    return postgres.ensure_database("ragstream_bench")


def run_on_postgres(
    bench: Callable[[argparse.Namespace, str], Awaitable[dict[str, object]]],
    args: argparse.Namespace,
    name: str,
) -> dict[str, object]:
    """`bench(args, server_dsn)` on the server `args.database_url` names, or on a PostgreSQL of
    its own in a temporary directory, stopped and removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=f"ragstream-bench-{name}-"))
    directory.chmod(0o711)  # PostgreSQL's system user passes through
    try:
        with ExitStack() as stack:
            server_dsn = args.database_url or local_postgres(stack, directory)
            return asyncio.run(bench(args, server_dsn))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--other-chunks", type=int, default=5_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100, 200, 400])
    parser.add_argument("--exact-limit", type=int, nargs="*", default=[])
    parser.add_argument("--database-url", default=os.environ.get("RAGSTREAM_DATABASE_URL"))
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    report = run_on_postgres(bench, args, "search")
    print(
        f"tenant of {report['tenant_chunks']} chunks among {report['other_chunks']} others, "
        f"{report['queries']} queries, k={K}; load {report['load_s']} s, "
        f"HNSW build {report['index_build_s']} s"
    )
    print(f"{'tenant, setting':<30} {'recall@10':>9} {'same #1':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for row in report["rows"]:  # type: ignore[attr-defined]
        print(
            f"{row['setting']:<30} {row['recall_at_10']:>9.3f} {row['first_hit_same']:>8.3f}"
            f" {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f}"
        )
    sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
