"""The pipeline end to end in local mode: uploads through parse, chunk and embed to PostgreSQL.

Every test has its own topics, consumer groups and tenant (the `settings` fixture's prefix),
runs real stage workers (in this process through `run_workers`, or as real
`python -m ragstream worker <stage>` processes) against the session's broker and PostgreSQL,
and checks what came out on the topics and in the store.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest
import structlog
from aiokafka import TopicPartition
from pipeline_helpers import (
    Delivered,
    WorkerProcess,
    bundled_originals,
    committed_offsets,
    documents,
    group_members,
    make_corpus,
    make_large_text,
    read_topic,
    reset_group_to_earliest,
    rows_per_document,
    sample_pages,
    variant,
    wait_for_statuses,
    wait_until,
    workers,
)
from typer.testing import CliRunner

from producers.upload import Uploader, UploadRejected, upload_paths
from ragstream.admin import ensure_topics
from ragstream.cli import app
from ragstream.content_types import detect_content_type
from ragstream.events import DocumentChunked, DocumentEmbedded, DocumentParsed
from ragstream.providers.parse.local import LocalParser
from ragstream.search import search_chunks
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store.models import FAILURE_STATUSES
from ragstream.topology import H_CORRELATION_ID, Stage, Topology

pytestmark = pytest.mark.integration

TABLES = ("documents", "parse_results", "chunks", "embeddings")
FAILURE_OUTCOMES = ("failed", "dead-lettered")  # dead-lettered once the runtime has a DLQ


def by_document(delivered: list[Delivered]) -> dict[str, list[Delivered]]:
    out: dict[str, list[Delivered]] = defaultdict(list)
    for d in delivered:
        out[d.document_id].append(d)
    return out


def assert_no_duplicate_rows(duplicates: dict[str, int]) -> None:
    assert duplicates == dict.fromkeys(duplicates, 0), duplicates


# -- 1. the main job ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_hundred_mixed_documents_all_reach_embedded_and_the_store_matches_the_events(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    originals = bundled_originals()  # the sample set: PDF, Markdown, HTML, text
    large = make_large_text(tmp_path / "docs" / "annual-report.txt", 100_000)  # a claim check
    generated = make_corpus(tmp_path / "docs", 200 - len(originals) - 1)
    paths = [*originals, large, *generated]
    assert len(paths) == 200
    assert sum(p.suffix == ".pdf" for p in paths) == 4

    async with workers(settings):
        receipts, rejected = await upload_paths(settings, paths, tenant_id=tenant)
        assert rejected == []
        assert len({r.sha256 for r in receipts}) == 200, "the documents must be distinct"
        assert [r.filename for r in receipts if not r.inline] == [large.name]
        ids = [r.document_id for r in receipts]
        docs = await wait_for_statuses(store, ids, 150)

    assert Counter(d.status for d in docs.values()) == {"embedded": 200}
    by_name = {r.filename: docs[r.document_id] for r in receipts}
    for name, pages in sample_pages().items():
        if name in by_name:
            assert by_name[name].page_count == pages, name

    chunked = by_document(await read_topic(settings, topology.chunked, at_least=200))
    embedded = by_document(await read_topic(settings, topology.embedded, at_least=200))
    rows = await rows_per_document(settings, tenant)
    assert set(chunked) == set(embedded) == set(rows) == set(ids)
    for doc_id in ids:
        doc = docs[doc_id]
        (c,) = {d.event for d in chunked[doc_id]}  # a clean run: one event per document
        (e,) = {d.event for d in embedded[doc_id]}
        assert isinstance(c, DocumentChunked) and isinstance(e, DocumentEmbedded)
        assert rows[doc_id] == {
            "parse_results": 1,
            "chunks": c.chunk_count,
            "embeddings": e.chunk_count,
        }, doc.filename
        assert c.chunk_count == e.chunk_count == doc.chunk_count >= 1
        assert e.new_embeddings + e.cached_embeddings == e.chunk_count
        assert e.chunker_version == c.chunker_version == doc.current_chunker_version
        assert e.dimensions == settings.embed.dimensions
    assert rows[by_name[large.name].document_id]["chunks"] > 10

    summary = await store.summary(tenant)
    total_chunks = sum(r["chunks"] for r in rows.values())
    assert summary["by_status"] == {"embedded": 200}
    assert summary["chunks"] == summary["embeddings"] == total_chunks
    assert_no_duplicate_rows(await store.duplicate_rows(tenant))


# -- 2. a worker killed mid-run ----------------------------------------------------------------


@pytest.mark.slow
async def test_embed_worker_killed_mid_run_and_restarted_loses_and_duplicates_nothing(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    paths = make_corpus(tmp_path / "docs", 80, seed=2)
    # Small batches: many moments between a batch's publish and its commit to catch.
    first = WorkerProcess(
        settings, "embed", tmp_path / "embed-1.log", env={"RAGSTREAM_KAFKA__BATCH_RECORDS": "3"}
    )
    second = WorkerProcess(settings, "embed", tmp_path / "embed-2.log")
    async with workers(settings, [Stage.PARSE, Stage.CHUNK]):
        receipts, _ = await upload_paths(settings, paths, tenant_id=tenant)
        ids = [r.document_id for r in receipts]
        # Every DocumentChunked is on the topic before the embed worker starts, so it has a
        # backlog to work through when it is killed.
        chunked = await read_topic(settings, topology.chunked, at_least=len(ids), timeout_s=90)
        group = topology.group(Stage.EMBED)

        def uncommitted(committed: dict[TopicPartition, int]) -> set[str]:
            return {d.document_id for d in chunked if d.offset >= committed.get(d.partition, 0)}

        async def some_embedded() -> bool:
            return (await store.summary(tenant))["by_status"].get("embedded", 0) >= 1

        # Kill it between publishing some outputs and committing their inputs. It is frozen
        # (SIGSTOP) while that is checked, so it cannot commit in between, then SIGKILLed:
        # no clean-up, no commit, no LeaveGroup.
        published: set[str] = set()
        handled_not_committed: set[str] = set()
        try:
            first.start()
            await wait_until(some_embedded, 60, "the first embeddings", explain=first.tail)
            assert first.alive(), first.tail()
            for _ in range(40):
                first.freeze()
                # A commit already on the wire may still land: read the outputs between two
                # reads of the commits that agree.
                committed: dict[TopicPartition, int] = {}
                while True:
                    published = set(by_document(await read_topic(settings, topology.embedded)))
                    again = await committed_offsets(settings, group)
                    if again == committed:
                        break
                    committed = again
                handled_not_committed = published & uncommitted(committed)
                if handled_not_committed or len(published) == len(ids):
                    break
                first.thaw()
                await asyncio.sleep(random.uniform(0.01, 0.1))  # it runs a random moment
            first.kill()
        finally:
            if first.alive():
                first.kill()
        at_kill = await documents(store, ids)
        embedded_at_kill = {d for d, doc in at_kill.items() if doc and doc.status == "embedded"}
        assert len(published) < len(ids), "the kill came after the run had ended"
        # Their outputs are out but their input offsets are not committed: they must come
        # again, and change nothing.
        assert handled_not_committed, "no moment between publish and commit was caught"

        second.start()
        try:
            docs = await wait_for_statuses(store, ids, 90, running=[second])
        finally:
            code = await second.stop()
        assert code == 0, second.tail()  # stopped cleanly by SIGTERM

    assert Counter(d.status for d in docs.values()) == {"embedded": len(ids)}
    assert_no_duplicate_rows(await store.duplicate_rows(tenant))
    expected_chunks = sum(d.chunk_count or 0 for d in docs.values())
    counts = await store.count_rows(tenant)
    assert {t: counts[t] for t in TABLES} == {
        "documents": len(ids),
        "parse_results": len(ids),
        "chunks": expected_chunks,
        "embeddings": expected_chunks,
    }
    embedded = by_document(await read_topic(settings, topology.embedded, at_least=len(ids)))
    assert set(embedded) == set(ids)
    for doc_id in handled_not_committed:  # redelivered after the crash, published again
        assert len(embedded[doc_id]) >= 2, doc_id
    # The restarted worker did the rest: everything the killed one had not finished.
    done_by_second = {h["document_id"] for h in second.handled()}
    assert set(ids) - embedded_at_kill <= done_by_second


# -- 3. two processes of one group -------------------------------------------------------------


@pytest.mark.slow
async def test_two_parse_processes_in_one_group_split_the_partitions_and_both_work(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    group = topology.group(Stage.PARSE)
    a = WorkerProcess(settings, "parse", tmp_path / "parse-a.log", client_id="parse-a")
    b = WorkerProcess(settings, "parse", tmp_path / "parse-b.log", client_id="parse-b")

    def split() -> bool:
        pa, pb = a.assigned(topology.uploaded), b.assigned(topology.uploaded)
        return bool(pa and pb and not set(pa) & set(pb) and set(pa) | set(pb) == {0, 1, 2})

    def tails() -> str:
        return f"--- parse-a\n{a.tail()}\n--- parse-b\n{b.tail()}"

    try:
        a.start()
        b.start()
        # Both hold partitions before anything is published, so both get work.
        await wait_until(split, 60, "both parse processes to hold partitions", explain=tails)
        state, members = await group_members(settings, group)
        assert state == "Stable"
        assert sorted(m.client_id for m in members) == ["parse-a", "parse-b"]
        held = {m.client_id: set(m.partitions[topology.uploaded]) for m in members}
        assert held == {
            "parse-a": set(a.assigned(topology.uploaded) or []),
            "parse-b": set(b.assigned(topology.uploaded) or []),
        }

        paths = make_corpus(tmp_path / "docs", 45, seed=3)
        # Bigger than the inline limit: the parse processes read it from the shared blob store.
        paths.append(make_large_text(tmp_path / "docs" / "big-notes.txt", 90_000, seed=4))
        async with workers(settings, [Stage.CHUNK, Stage.EMBED]):
            receipts, _ = await upload_paths(settings, paths, tenant_id=tenant)
            ids = [r.document_id for r in receipts]
            docs = await wait_for_statuses(store, ids, 90, running=[a, b])
    finally:
        codes = (await a.stop(), await b.stop())
    assert codes == (0, 0), tails()

    assert Counter(d.status for d in docs.values()) == {"embedded": len(ids)}
    handled_a, handled_b = a.handled(), b.handled()
    assert handled_a and handled_b, "both processes must have handled records"
    parts_a = {h["partition"] for h in handled_a}
    parts_b = {h["partition"] for h in handled_b}
    assert parts_a <= held["parse-a"] and parts_b <= held["parse-b"]
    docs_a = {h["document_id"] for h in handled_a}
    docs_b = {h["document_id"] for h in handled_b}
    assert not docs_a & docs_b
    assert docs_a | docs_b == set(ids)
    for h in [*handled_a, *handled_b]:
        assert h["stage"] == "parse" and h["outcome"] == "ok" and h["level"] == "info"
    assert_no_duplicate_rows(await store.duplicate_rows(tenant))


# -- 4. duplicate uploads ----------------------------------------------------------------------


async def test_the_same_file_twice_is_processed_once_and_again_only_when_forced(
    settings: Settings, tenant: str, store: Store
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    path = next(p for p in bundled_originals() if p.name == "postgres-failover-runbook.md")

    async def upload(force: bool = False) -> str:
        (receipt,), _ = await upload_paths(settings, [path], tenant_id=tenant, force=force)
        await wait_for_statuses(store, [receipt.document_id], 60)
        return receipt.document_id

    async with workers(settings):
        first = await upload()
        second = await upload()
        rows_after_second = await rows_per_document(settings, tenant)
        forced = await upload(force=True)

    original = await store.get_document(first)
    duplicate = await store.get_document(second)
    reprocessed = await store.get_document(forced)
    assert original and duplicate and reprocessed
    assert original.status == "embedded" and original.duplicate_of is None
    assert duplicate.status == "duplicate"
    assert duplicate.duplicate_of == first
    assert first in (duplicate.status_reason or "")
    assert rows_after_second == {
        first: {
            "parse_results": 1,
            "chunks": original.chunk_count,
            "embeddings": original.chunk_count,
        }
    }
    journey = await store.journey(second)
    assert journey is not None
    assert [(s.stage, s.outcome) for s in journey.steps] == [("parse", "duplicate")]

    assert reprocessed.status == "embedded" and reprocessed.forced
    assert reprocessed.duplicate_of is None
    rows = await rows_per_document(settings, tenant)
    assert rows[forced] == rows[first]
    parsed = by_document(await read_topic(settings, topology.parsed, at_least=2))
    assert set(parsed) == {first, forced}, "a duplicate is not parsed"
    embedded = by_document(await read_topic(settings, topology.embedded, at_least=2))
    (again,) = [d.event for d in embedded[forced]]
    assert isinstance(again, DocumentEmbedded)
    # Forced, it is processed again, but its embeddings come from the cache.
    assert again.new_embeddings == 0 and again.cached_embeddings == again.chunk_count
    assert_no_duplicate_rows(await store.duplicate_rows(tenant))


# -- 5. documents that cannot be parsed --------------------------------------------------------


async def test_corrupt_pdf_and_textless_html_fail_clearly_and_the_partition_goes_on(
    settings: Settings, tenant: str, tmp_path: Path
) -> None:
    one = variant(settings, kafka={"partitions": 1})  # every document on the same partition
    await ensure_topics(one)
    topology = Topology(one.kafka.topic_prefix)
    corrupt = tmp_path / "scanned-contract.pdf"
    corrupt.write_bytes(b"%PDF-1.7\n" + random.Random(5).randbytes(3000))
    blank = tmp_path / "landing-page.html"
    blank.write_text(
        "<!DOCTYPE html><html><head><title>Coming soon</title><script>track()</script>"
        "</head><body><div class='hero'> </div><img src='banner.png'></body></html>"
    )
    good = next(p for p in bundled_originals() if p.name == "houseplant-care.txt")

    async with (
        await Store.connect(one.postgres.dsn(), min_size=1, max_size=4) as store,
        workers(one, concurrency=1),  # in one batch, or one at a time: the valid one goes on
    ):
        receipts, rejected = await upload_paths(one, [corrupt, blank, good], tenant_id=tenant)
        assert rejected == []
        ids = [r.document_id for r in receipts]
        docs = await wait_for_statuses(store, ids, 60)
        journeys = {d: await store.journey(d) for d in ids}
    steps = {d: j.steps for d, j in journeys.items() if j is not None}

    uploaded = await read_topic(one, topology.uploaded, at_least=3)
    assert [(d.record.partition, d.document_id) for d in uploaded] == [
        (0, doc_id) for doc_id in ids
    ]  # the valid document comes after the two bad ones on the one partition
    bad_pdf, bad_html, valid = (docs[d] for d in ids)
    expected = {bad_pdf.document_id: "corrupt PDF", bad_html.document_id: "no readable text"}
    for doc in (bad_pdf, bad_html):
        assert doc.status in FAILURE_STATUSES, doc
        assert doc.status_reason is not None
        assert doc.status_reason.startswith("parse: PermanentError: ")
        assert expected[doc.document_id] in doc.status_reason
        (step,) = steps[doc.document_id]  # permanent: one attempt, no retries
        assert (step.stage, step.attempt) == ("parse", 1)
        assert step.outcome in FAILURE_OUTCOMES
        assert step.detail["error_class"] == "PermanentError"
        assert expected[doc.document_id] in step.detail["error"]
    assert valid.status == "embedded"
    assert [s.stage for s in steps[valid.document_id]] == ["parse", "chunk", "embed"]
    parsed = await read_topic(one, topology.parsed, at_least=1)
    assert [d.document_id for d in parsed] == [valid.document_id]


# -- 6. search ---------------------------------------------------------------------------------


def _sentences(markdown: str) -> list[str]:
    """Plain prose sentences of 10+ words (no Markdown syntax, page markers or code)."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.DOTALL)
    text = re.sub(r"<!--.*?-->", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "|", "-", "*", ">")) or line[0].isdigit():
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", line):
            if len(sentence.split()) >= 10 and not re.search(r"[`*_\[\]]", sentence):
                out.append(sentence)
    return out


async def test_search_finds_the_document_a_sentence_comes_from_and_never_another_tenants(
    settings: Settings, prefix: str, store: Store
) -> None:
    await ensure_topics(settings)
    ours, theirs, empty = f"{prefix}-ours", f"{prefix}-theirs", f"{prefix}-empty"
    originals = bundled_originals()
    parser = LocalParser(settings.parse)
    async with workers(settings):
        mine, _ = await upload_paths(settings, originals, tenant_id=ours)
        other, _ = await upload_paths(settings, originals, tenant_id=theirs)
        docs = await wait_for_statuses(store, [r.document_id for r in [*mine, *other]], 90)
    assert {d.status for d in docs.values()} == {"embedded"}
    mine_by_name = {r.filename: r.document_id for r in mine}
    other_by_name = {r.filename: r.document_id for r in other}

    for path in originals:
        data = path.read_bytes()
        parsed = await parser.parse(
            data, filename=path.name, content_type=detect_content_type(path.name, data)
        )
        sentences = _sentences(parsed.markdown)
        assert sentences, path.name
        sentence = sentences[len(sentences) // 2]
        hits = await search_chunks(settings, sentence, ours, k=5)
        assert hits and hits[0].document_id == mine_by_name[path.name], (path.name, sentence)
        assert " ".join(sentence.split()) in " ".join(hits[0].text.split())  # its very chunk
        # The other tenant holds the same text under its own documents; a search there
        # returns only its own.
        theirs_hits = await search_chunks(settings, sentence, theirs, k=50)
        assert theirs_hits[0].document_id == other_by_name[path.name]
        assert not {h.document_id for h in theirs_hits} & set(mine_by_name.values())
    assert await search_chunks(settings, "how to water a fern", empty) == []


# -- 7. refused uploads ------------------------------------------------------------------------

PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def _refusal_files(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "missing": directory / "not-there.pdf",
        "empty": directory / "empty.txt",
        "too-big": directory / "huge-log.txt",
        "png": directory / "pixel.png",
        "binary": directory / "firmware.bin",
        "good-md": directory / "meeting-notes.md",
        "good-txt": directory / "todo.txt",
    }
    files["empty"].write_bytes(b"")
    files["too-big"].write_text("log line with some words\n" * 400)  # 10,000 bytes
    files["png"].write_bytes(PNG_1X1)
    files["binary"].write_bytes(bytes(range(256)) * 8)
    files["good-md"].write_text("# Meeting notes\n\nWe agreed to ship the parser on Friday.\n")
    files["good-txt"].write_text("Buy coffee beans. Water the ferns. Call the plumber.\n")
    return files


async def test_upload_refuses_bad_files_with_clear_reasons_and_publishes_the_rest(
    settings: Settings, tenant: str, tmp_path: Path
) -> None:
    small = variant(settings, blobs={"max_upload_bytes": 4096})
    await ensure_topics(small)
    files = _refusal_files(tmp_path / "in")
    order = ["good-md", "missing", "empty", "too-big", "png", "binary", "good-txt"]
    receipts, rejected = await upload_paths(small, [files[k] for k in order], tenant_id=tenant)
    reasons = {Path(r.path).name: r.reason for r in rejected}
    assert set(reasons) == {files[k].name for k in order if not k.startswith("good")}
    assert "not-there.pdf: no such file" in reasons["not-there.pdf"]
    assert reasons["empty.txt"] == "empty.txt: file is empty"
    assert reasons["huge-log.txt"] == (
        "huge-log.txt: 10000 bytes is over the upload limit of 4096 bytes"
    )
    for name in ("pixel.png", "firmware.bin"):
        assert reasons[name].startswith(f"{name}: unsupported content type"), reasons[name]
    assert [r.filename for r in receipts] == ["meeting-notes.md", "todo.txt"]

    published = await read_topic(small, Topology(small.kafka.topic_prefix).uploaded, at_least=2)
    assert sorted(d.document_id for d in published) == sorted(r.document_id for r in receipts)

    async with Uploader(small) as uploader:  # the same refusals, as the exception other code sees
        for key, message in [("missing", "no such file"), ("png", "unsupported content type")]:
            with pytest.raises(UploadRejected, match=message):
                await uploader.upload_file(files[key], tenant_id=tenant)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures logging for its process; put this process's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def test_cli_upload_prints_refusals_and_exits_non_zero_when_nothing_is_published(
    settings: Settings,
    tenant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    files = _refusal_files(tmp_path / "in")
    env = {
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "RAGSTREAM_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "RAGSTREAM_POSTGRES__URL": settings.postgres.dsn(),
        "RAGSTREAM_DEVSTACK__DATA_DIR": str(settings.devstack.data_dir),
        "RAGSTREAM_BLOBS__MAX_UPLOAD_BYTES": "4096",
        "RAGSTREAM_OBSERVABILITY__LOG_LEVEL": "ERROR",
        "COLUMNS": "200",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    created = runner.invoke(app, ["topics", "create"])
    assert created.exit_code == 0, created.output

    bad = [files[k] for k in ("missing", "empty", "too-big", "png", "binary")]
    result = runner.invoke(app, ["upload", *map(str, bad), "--tenant", tenant])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())  # rich may wrap long lines
    assert "published 0 document(s)" in out
    assert len(re.findall(r"^refused ", result.output, re.MULTILINE)) == 5
    assert f"refused {files['missing']}: no such file" in out
    assert "refused empty.txt: file is empty" in out
    assert "refused huge-log.txt: 10000 bytes is over the upload limit of 4096 bytes" in out
    assert "refused pixel.png: unsupported content type" in out
    assert "refused firmware.bin: unsupported content type" in out
    assert "Traceback" not in out

    mixed = runner.invoke(
        app, ["upload", str(files["good-md"]), str(files["empty"]), "--tenant", tenant]
    )
    assert mixed.exit_code == 0, mixed.output
    assert "refused empty.txt: file is empty" in mixed.output
    assert f"published 1 document(s) for tenant '{tenant}'" in mixed.output
    assert "meeting-notes.md" in mixed.output


# -- 8. redelivery -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_parse_group_reset_to_earliest_reprocesses_everything_without_duplicates(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    paths = [*bundled_originals(), *make_corpus(tmp_path / "docs", 20, seed=8)]
    async with workers(settings):
        receipts, _ = await upload_paths(settings, paths, tenant_id=tenant)
        ids = [r.document_id for r in receipts]
        before = await wait_for_statuses(store, ids, 90)
    assert {d.status for d in before.values()} == {"embedded"}
    counts_before = await store.count_rows(tenant)
    rows_before = await rows_per_document(settings, tenant)
    n = len(ids)
    assert len(await read_topic(settings, topology.embedded, at_least=n)) == n

    # The group is stopped: rewind it, as `kafka-consumer-groups --reset-offsets
    # --to-earliest` would.
    group = topology.group(Stage.PARSE)
    await reset_group_to_earliest(settings, group, topology.uploaded)
    rewound = await committed_offsets(settings, group)
    assert {o for tp, o in rewound.items() if tp.topic == topology.uploaded} == {0}

    async with workers(settings):
        # Every upload goes through every stage again: a second DocumentEmbedded each.
        again = await read_topic(settings, topology.embedded, at_least=2 * n, timeout_s=90)
    assert Counter(len(v) for v in by_document(again).values()) == {2: n}

    after = await wait_for_statuses(store, ids, 5)
    assert {d.status for d in after.values()} == {"embedded"}
    for doc_id in ids:
        assert after[doc_id].chunk_count == before[doc_id].chunk_count
        assert after[doc_id].current_parse_sha256 == before[doc_id].current_parse_sha256
    counts_after = await store.count_rows(tenant)
    assert {t: counts_after[t] for t in TABLES} == {t: counts_before[t] for t in TABLES}
    assert await rows_per_document(settings, tenant) == rows_before
    assert_no_duplicate_rows(await store.duplicate_rows(tenant))
    # The replay cost nothing: every vector came from the embedding cache.
    second_pass = [max(v, key=lambda d: d.record.timestamp) for v in by_document(again).values()]
    for d in second_pass:
        assert isinstance(d.event, DocumentEmbedded)
        assert d.event.new_embeddings == 0, d.event
    # Redelivered parse input is the same event: its journey step is not written twice.
    for doc_id in ids:
        journey = await store.journey(doc_id)
        assert journey is not None
        assert [s.stage for s in journey.steps].count("parse") == 1


# -- 9. correlation ids ------------------------------------------------------------------------


async def test_the_upload_correlation_id_is_on_every_stage_output_journey_step_and_log_line(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    sources = [p for p in bundled_originals() if p.suffix in (".pdf", ".html")][:2]
    worker = WorkerProcess(settings, "all", tmp_path / "all.log").start()
    try:
        correlation: dict[str, str] = {}
        async with Uploader(settings) as uploader:
            for path in sources:
                corr = f"corr-{uuid4()}"
                receipt = await uploader.upload_file(path, tenant_id=tenant, correlation_id=corr)
                assert receipt.correlation_id == corr
                correlation[receipt.document_id] = corr
        docs = await wait_for_statuses(store, list(correlation), 60, running=[worker])
    finally:
        code = await worker.stop()
    assert code == 0, worker.tail()
    assert {d.status for d in docs.values()} == {"embedded"}

    expected_types = {
        topology.uploaded: "DocumentUploaded",
        topology.parsed: DocumentParsed.__name__,
        topology.chunked: DocumentChunked.__name__,
        topology.embedded: DocumentEmbedded.__name__,
    }
    for topic, event_type in expected_types.items():
        delivered = by_document(await read_topic(settings, topic, at_least=len(sources)))
        assert set(delivered) == set(correlation), topic
        for doc_id, corr in correlation.items():
            (d,) = delivered[doc_id]
            assert type(d.event).__name__ == event_type
            assert d.headers[H_CORRELATION_ID] == corr.encode(), topic
            assert getattr(d.event, "correlation_id", None) == corr
            assert d.record.key == doc_id.encode()

    for doc_id, corr in correlation.items():
        journey = await store.journey(corr)  # found by correlation id
        assert journey is not None and journey.document.document_id == doc_id
        assert journey.document.correlation_id == corr
        assert [(s.stage, s.outcome) for s in journey.steps] == [
            ("parse", "ok"),
            ("chunk", "ok"),
            ("embed", "ok"),
        ]
        assert {s.correlation_id for s in journey.steps} == {corr}
        handled = [h for h in worker.handled() if h.get("document_id") == doc_id]
        assert sorted(h["stage"] for h in handled) == ["chunk", "embed", "parse"]
        assert {h["correlation_id"] for h in handled} == {corr}
