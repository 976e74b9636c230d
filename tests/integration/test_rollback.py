"""`ragstream rollback` against the real broker and PostgreSQL.

Documents go through the pipeline (workers in this process, embeddings from a local server
that speaks OpenAI's API, so every embedding request is counted) with one chunker version or
embedding size, then get another by a replay; the rollback points them back. What it did is
read back from the documents' pointers, the rows search returns, the journey steps and the
requests the API server saw. The CLI runs through typer's CliRunner.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from pipeline_helpers import variant, wait_for_statuses, wait_until, workers
from typer.testing import CliRunner

from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.blobs import sha256_hex
from ragstream.cli import app
from ragstream.replay import ReplayRequest, plan_replay, run_replay
from ragstream.search import search
from ragstream.settings import Settings
from ragstream.store import ChunkRow, ChunkSet, Document, EmbeddingSet, StatusChange, Store, Upload
from tests.integration.test_dlq_tools import cli_env
from tests.integration.test_replay import caught_up, ids, tenant_rows, upload
from tests.integration.test_services_pipeline import real_openai
from tests.servers.openai_server import OpenAIServer, vector_for

pytestmark = pytest.mark.integration

MODEL = "text-embedding-3-small"
ROOT = Path(__file__).resolve().parents[2]


async def rollback_cli(settings: Settings, *args: str) -> tuple[int, str]:
    """`ragstream rollback ARGS`: the exit code and the output on one line (no table borders)."""
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["rollback", *args], env=cli_env(settings)
    )
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, " ".join(result.output.split())


async def journeys(store: Store, document_ids: list[str]) -> dict[str, Counter[str]]:
    out = {}
    for d in document_ids:
        journey = await store.journey(d)
        assert journey is not None
        out[d] = Counter((s.stage, s.input_event_id, s.attempt, s.replay) for s in journey.steps)
    return out


async def document(store: Store, document_id: str) -> Document:
    doc = await store.get_document(document_id)
    assert doc is not None
    return doc


async def on_version(store: Store, document_ids: list[str], version: str) -> bool:
    docs = [await store.get_document(d) for d in document_ids]
    return all(
        d is not None and d.status == "embedded" and d.searchable_chunker_version == version
        for d in docs
    )


# -- chunker -----------------------------------------------------------------------------------


async def test_a_chunker_rollback_points_documents_back_with_no_work_and_search_follows(
    settings: Settings, store: Store
) -> None:
    mine, other = f"acme-{settings.kafka.topic_prefix}", f"globex-{settings.kafka.topic_prefix}"
    with OpenAIServer() as server:
        a = real_openai(variant(settings, chunk={"max_tokens": 200, "overlap_tokens": 20}), server)
        await ensure_topics(a)
        async with workers(a), Uploader(a) as up:
            kept = ids(await upload(up, mine, ["k0", "k1", "k2"]))
            theirs = ids(await upload(up, other, ["o0"]))
            await wait_for_statuses(store, kept + theirs, 60)
            await wait_until(lambda: caught_up(a), 30, "the groups to commit everything")
        version_a = (await document(store, kept[0])).current_chunker_version
        assert version_a

        # Version B: new chunk settings, the chunk stage replayed; one document only ever has B.
        b = real_openai(variant(settings, chunk={"max_tokens": 60, "overlap_tokens": 0}), server)
        await run_replay(b, await plan_replay(b, ReplayRequest.build("chunk", earliest=True)))
        async with workers(b), Uploader(b) as up:
            (late,) = ids(await upload(up, mine, ["late"]))
            everyone = [*kept, *theirs, late]
            await wait_until(
                lambda: on_version_b(store, everyone, version_a), 60, "every document on B"
            )
            await wait_until(lambda: caught_up(b), 30, "the groups to commit everything")
        version_b = (await document(store, late)).current_chunker_version
        assert version_b and version_b != version_a

        steps_before = await journeys(store, everyone)
        calls_before = len(server.calls)
        mine_before, theirs_before = await tenant_rows(b, mine), await tenant_rows(b, other)
        late_before = await document(store, late)

        code, out = await rollback_cli(
            b, "chunker", "--to", version_a, "--tenant", mine, "--dry-run"
        )
        assert code == 0, out
        assert f"rollback to chunker version {version_a} for tenant {mine}: 4 document(s)" in out
        assert "would point at it: 3 already at it: 0" in out, out
        assert f"lacking its results, left as they are: 1 ({late})" in out, out
        assert f"ragstream replay chunk --live --earliest --document {late}" in out, out
        assert "dry run: nothing changed" in out
        assert await tenant_rows(b, mine) == mine_before

        # One document, named by the start of its id as the tables show it.
        code, out = await rollback_cli(b, "chunker", "--to", version_a, "--document", kept[0][:8])
        assert code == 0, out
        assert "1 document(s) pointed at it: 1" in out, out
        assert (await document(store, kept[0])).searchable_chunker_version == version_a
        assert (await document(store, kept[1])).searchable_chunker_version == version_b

        code, out = await rollback_cli(b, "chunker", "--to", version_a, "--tenant", mine)
        assert code == 0, out
        assert "pointed at it: 2" in out and "already at it: 1" in out, out
        assert "search reads its rows now" in out
        assert f"lacking its results, left as they are: 1 ({late})" in out, out

        # The documents point at A; the one without A's rows and the other tenant are as they were.
        for d in kept:
            doc = await document(store, d)
            chunks = await store.load_chunks(d, version_a)
            assert (doc.current_chunker_version, doc.searchable_chunker_version) == (
                version_a,
                version_a,
            )
            assert (doc.status, doc.chunk_count) == ("embedded", len(chunks))
            assert doc.status_reason == f"rolled back to chunker version {version_a}"
            assert (doc.current_embedding_model, doc.current_embedding_dimensions) == (
                MODEL,
                settings.embed.dimensions,
            )
        assert await document(store, late) == late_before
        assert await tenant_rows(b, other) == theirs_before
        # No stage worked: no journey step, no embedding request; no row but the documents'.
        assert await journeys(store, everyone) == steps_before
        assert len(server.calls) == calls_before
        after = await tenant_rows(b, mine)
        assert {t: after[t] for t in after if t != "documents"} == {
            t: mine_before[t] for t in mine_before if t != "documents"
        }

        # The very next search reads A's rows: a text only version A cut is found, at A.
        dims = settings.embed.dimensions
        b_texts = {c.text for d in kept for c in await store.load_chunks(d, version_b)}
        only_a = [c for c in await store.load_chunks(kept[1], version_a) if c.text not in b_texts]
        assert only_a, "the long section is cut differently at 200 and at 60 tokens"
        vector = vector_for(MODEL, only_a[0].text, dims)
        hits = await store.search(mine, vector, MODEL, dims, k=20)
        assert (hits[0].document_id, hits[0].chunker_version, hits[0].chunk_index) == (
            kept[1],
            version_a,
            only_a[0].index,
        )
        assert {(h.document_id, h.chunker_version) for h in hits} <= {
            *((d, version_a) for d in kept),
            (late, version_b),
        }
        # The CLI's path: the question embedded (one request), and full-text search of the chunks.
        served = await search(b, only_a[0].text, mine, k=3, mode="vector")
        assert (served.hits[0].document_id, served.hits[0].chunker_version) == (kept[1], version_a)
        words = await search(b, only_a[0].text, mine, k=20, mode="text")
        assert words.hits and {(h.document_id, h.chunker_version) for h in words.hits} <= {
            *((d, version_a) for d in kept),
            (late, version_b),
        }

        # The command it printed fills the document lacking A, once the workers run A's settings.
        async with workers(a):
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "ragstream", "replay", "chunk", "--live", "--earliest",
                 "--document", late],
                env={**os.environ, **cli_env(a)}, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            await wait_until(lambda: on_version(store, [late], version_a), 60, "late on A")


async def on_version_b(store: Store, document_ids: list[str], version_a: str) -> bool:
    docs = [await store.get_document(d) for d in document_ids]
    return all(
        d is not None
        and d.status == "embedded"
        and d.searchable_chunker_version not in (None, version_a)
        for d in docs
    )


# -- embedding ---------------------------------------------------------------------------------


async def test_an_embedding_rollback_points_documents_back_to_the_older_size_with_no_calls(
    settings: Settings, store: Store
) -> None:
    mine, other = f"acme-{settings.kafka.topic_prefix}", f"globex-{settings.kafka.topic_prefix}"
    dims = settings.embed.dimensions
    with OpenAIServer() as server:
        a = real_openai(settings, server)
        await ensure_topics(a)
        async with workers(a), Uploader(a) as up:
            kept = ids(await upload(up, mine, ["k0", "k1"]))
            theirs = ids(await upload(up, other, ["o0"]))
            await wait_for_statuses(store, kept + theirs, 60)
            await wait_until(lambda: caught_up(a), 30, "the groups to commit everything")

        b = real_openai(variant(settings, embed={"dimensions": 256}), server)
        await run_replay(b, await plan_replay(b, ReplayRequest.build("embed", earliest=True)))
        async with workers(b), Uploader(b) as up:
            (late,) = ids(await upload(up, mine, ["late"]))

            async def all_at_256() -> bool:
                docs = [await store.get_document(d) for d in [*kept, *theirs, late]]
                return all(
                    d is not None
                    and d.status == "embedded"
                    and d.current_embedding_dimensions == 256
                    for d in docs
                )

            await wait_until(all_at_256, 60, "every document embedded at 256 dimensions")
            await wait_until(lambda: caught_up(b), 30, "the groups to commit everything")
        steps_before = await journeys(store, [*kept, *theirs, late])
        calls_before = len(server.calls)
        theirs_before = await tenant_rows(b, other)
        target = f"{MODEL}:{dims}"

        code, out = await rollback_cli(
            b, "embedding", "--to", target, "--tenant", mine, "--dry-run"
        )
        assert code == 0, out
        assert "would point at it: 2 already at it: 0" in out, out
        assert f"ragstream replay embed --live --earliest --document {late}" in out, out
        assert f"run the embed workers with model {MODEL} at {dims} dimensions" in out, out
        assert {m.dimensions for m in await store.embedding_models(mine)} == {256}

        code, out = await rollback_cli(b, "embedding", "--to", target, "--tenant", mine)
        assert code == 0, out
        assert "pointed at it: 2" in out and "left as they are: 1" in out, out
        for d in kept:
            doc = await document(store, d)
            assert (doc.current_embedding_model, doc.current_embedding_dimensions) == (MODEL, dims)
            assert doc.status_reason == f"rolled back to embedding {target}"
        assert (await document(store, late)).current_embedding_dimensions == 256
        assert await tenant_rows(b, other) == theirs_before
        assert await journeys(store, [*kept, *theirs, late]) == steps_before
        assert len(server.calls) == calls_before

        # Search embeds the question at each size the tenant's documents use, and finds A's rows.
        models = await store.embedding_models(mine)
        assert [(m.model, m.dimensions, m.documents) for m in models] == [
            (MODEL, dims, 2),
            (MODEL, 256, 1),
        ]
        version = (await document(store, kept[0])).searchable_chunker_version or ""
        chunk = (await store.load_chunks(kept[0], version))[0]
        hits = await store.search(mine, vector_for(MODEL, chunk.text, dims), MODEL, dims, k=5)
        assert (hits[0].document_id, hits[0].chunk_index) == (kept[0], chunk.index)
        assert {h.document_id for h in hits} <= set(kept)
        served = await search(b, chunk.text, mine, k=3, mode="vector")
        assert {m.dimensions for m in served.models} == {dims, 256}
        assert (served.hits[0].document_id, served.hits[0].chunk_index) == (kept[0], chunk.index)


# -- built through the store: the cases, and operator errors -------------------------------------

V1, V2 = "md-1:cl100k_base:t200:o20", "md-1:cl100k_base:t60:o0"


async def put_document(
    store: Store, tenant: str, doc_id: str, parse: str, versions: dict[str, bool]
) -> None:
    """A document whose chunks of each version in `versions` (cut from parse content `parse`)
    are stored, embedded at MODEL:8 when the value is True; it points at the last version
    (embedded there, or on its way: chunked)."""
    await store.register_upload(Upload(
        doc_id, tenant, f"{doc_id}.md", "text/markdown", 10, sha256_hex(doc_id.encode()),
        None, {}, None, None,
    ))  # fmt: skip
    await store.advance_status(
        StatusChange(doc_id, "parsed", tenant_id=tenant, current_parse_sha256=parse)
    )
    for version, embedded in versions.items():
        texts = [f"{doc_id} {version} chunk {i}" for i in range(3)]
        rows = [
            ChunkRow(i, t, sha256_hex(t.encode()), ["h"], 5, 0, len(t), None)
            for i, t in enumerate(texts)
        ]
        await store.save_chunks(ChunkSet(doc_id, tenant, version, {}, rows, parse_sha256=parse))
        await store.advance_status(StatusChange(
            doc_id, "chunked", tenant_id=tenant, current_parse_sha256=parse,
            current_chunker_version=version, chunk_count=len(rows),
        ))  # fmt: skip
        if embedded:
            vectors = [(r.index, r.text_sha256, [1.0] + [0.0] * 7) for r in rows]
            await store.save_embeddings(
                EmbeddingSet(doc_id, tenant, version, MODEL, 8, "openai", vectors)
            )
            await store.advance_status(StatusChange(
                doc_id, "embedded", tenant_id=tenant, current_chunker_version=version,
                current_embedding_model=MODEL, current_embedding_dimensions=8,
            ))  # fmt: skip


async def test_only_documents_holding_the_version_move_and_bad_input_is_one_line(
    settings: Settings, store: Store, tenant: str
) -> None:
    both, unembedded, only_new, on_the_way = (f"{tenant}-{n}" for n in ("b", "u", "n", "w"))
    await put_document(store, tenant, both, "p", {V1: True, V2: True})
    await put_document(store, tenant, unembedded, "p", {V1: False, V2: True})
    await put_document(store, tenant, only_new, "p", {V2: True})
    await put_document(store, tenant, on_the_way, "p", {V1: True, V2: False})  # chunked at V2
    reparsed = f"{tenant}-r"  # V1 was cut from a parse the document has since left
    await put_document(store, tenant, reparsed, "old", {V1: True})
    await store.advance_status(
        StatusChange(reparsed, "parsed", tenant_id=tenant, current_parse_sha256="new")
    )
    await put_document(store, tenant, reparsed, "new", {V2: True})
    assert (await document(store, on_the_way)).status == "chunked"

    dry = await store.point_at_chunker_version(V1, tenants=[tenant], dry_run=True)
    assert (dry.documents, dry.ready, dry.moved, dry.already, dry.lacking) == (5, 2, 0, 0, 3)
    assert dry.lacking_ids == sorted([unembedded, only_new, reparsed])
    assert (await document(store, both)).searchable_chunker_version == V2

    move = await store.point_at_chunker_version(V1, tenants=[tenant])
    assert (move.moved, move.lacking) == (2, 3)
    for d in (both, on_the_way):
        doc = await document(store, d)
        assert (doc.status, doc.current_chunker_version, doc.searchable_chunker_version) == (
            "embedded",
            V1,
            V1,
        )
    for d in (unembedded, only_new, reparsed):
        assert (await document(store, d)).current_chunker_version == V2
    again = await store.point_at_chunker_version(V1, tenants=[tenant])
    assert (again.moved, again.already, again.lacking) == (0, 2, 3)
    # A stage event of the version the document has left is skipped: nothing points at B now.
    assert not await store.advance_status(StatusChange(
        both, "embedded", tenant_id=tenant, current_chunker_version=V2,
        current_embedding_model=MODEL, current_embedding_dimensions=8,
    ))  # fmt: skip

    for args, code, text in (
        (["chunker", "--to", "md-9:none", "--tenant", tenant], 1,
         f"error: chunker version md-9:none was never produced for tenant {tenant}; kept there: "
         f"{V2} (5 documents), {V1} (4 documents)"),
        (["embedding", "--to", f"{MODEL}:1536", "--tenant", tenant], 1,
         f"error: embedding {MODEL}:1536 was never produced for tenant {tenant}; kept there: "
         f"{MODEL}:8 (5 documents)"),
        (["chunker", "--to", V1, "--tenant", f"{tenant}-nobody"], 1,
         "error: no documents to roll back: none of tenant"),
        (["chunker", "--to", V1, "--document", "no-such-document"], 1,
         "error: no documents to roll back: none of document no-such-document"),
        (["embedding", "--to", MODEL, "--tenant", tenant], 2, "expected MODEL:DIMS"),
        (["embedding", "--to", f"{MODEL}:0"], 2, "expected MODEL:DIMS"),
        (["chunker", "--tenant", tenant], 2, "Missing option '--to'"),
    ):  # fmt: skip
        before = await tenant_rows(settings, tenant)
        got, out = await rollback_cli(settings, *args)
        assert got == code, (args, out)
        assert text in out, (args, out)
        if code == 1:
            assert out.startswith("error: ") and out.count("error:") == 1, out
        assert await tenant_rows(settings, tenant) == before


async def test_the_rollback_benchmark_runs_and_reports_its_time(database_url: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "benchmarks" / "bench_rollback.py"), "--documents", "200",
         "--database-url", database_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"rolled back 200 documents .* in \d+\.\d+ s", done.stdout), done.stdout
