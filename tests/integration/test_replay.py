"""`ragstream replay` against the real broker and PostgreSQL.

Workers run in this process (`run_workers`); the CLI runs as a real `python -m ragstream`
process (its exit code, its stderr) or through typer's CliRunner. What a replay did is read back
from the journey steps and rows in PostgreSQL, the consumer groups' committed offsets and the
records on the topics.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import pytest
from aiokafka import TopicPartition
from pipeline_helpers import (
    caught_up,
    committed_offsets,
    end_offsets,
    read_topic,
    variant,
    wait_for_statuses,
    wait_until,
    workers,
)
from typer.testing import CliRunner

from producers.upload import Uploader, UploadReceipt
from ragstream.admin import ensure_topics
from ragstream.cli import app
from ragstream.replay import ReplayRequest, plan_replay, run_replay
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import H_REPLAY, Stage, Topology
from tests.integration.test_dlq_tools import cli_env
from tests.integration.test_services_pipeline import real_openai
from tests.servers.openai_server import OpenAIServer, vector_for

pytestmark = pytest.mark.integration

_WORDS = (
    "amber basin cedar delta ember fjord granite harbor iris juniper kestrel lagoon meadow "
    "nickel ochre pebble quartz raven saffron thistle umber velvet willow yarrow zephyr"
).split()


def _sentence(rng: random.Random, tag: str, words: int) -> str:
    return " ".join([tag, *(rng.choice(_WORDS) for _ in range(words))]).capitalize() + "."


def field_notes(n: int, tag: str) -> bytes:
    """Markdown with three short sections and one long one; every sentence names `tag`, so no
    two documents share a chunk. Cut at 200 tokens and at 60, the short sections come out the
    same and the long one differently."""
    rng = random.Random(f"{tag}-{n}")
    long = " ".join(_sentence(rng, tag, 14) for _ in range(16))
    return (
        f"# Field notes {n}\n\n{_sentence(rng, tag, 12)}\n\n"
        f"## Tools {tag}\n\n{_sentence(rng, tag, 15)}\n\n"
        f"## Long walk {tag}\n\n{long}\n\n"
        f"## Weather {tag}\n\n{_sentence(rng, tag, 10)} {_sentence(rng, tag, 8)}\n"
    ).encode()


async def upload(up: Uploader, tenant: str, names: Iterable[str]) -> list[UploadReceipt]:
    return [
        await up.upload_bytes(field_notes(i, f"{tenant}{name}"), f"{name}.md", tenant_id=tenant)
        for i, name in enumerate(names)
    ]


def ids(receipts: Sequence[UploadReceipt]) -> list[str]:
    return [r.document_id for r in receipts]


# -- the CLI -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def flat(self) -> str:
        """stdout on one line, without table borders."""
        return " ".join(re.sub(r"[│┃]", " ", self.out).split())


async def replay_cli(settings: Settings, *args: str) -> Ran:
    """`python -m ragstream replay ARGS` as a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ragstream",
        "replay",
        *args,
        env={**os.environ, **cli_env(settings)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    ran = Ran(int(proc.returncode or 0), out.decode(), err.decode())
    assert "Traceback" not in ran.out + ran.err, ran
    return ran


# -- reading back ------------------------------------------------------------------------------


async def steps(store: Store, document_id: str) -> Counter[str]:
    journey = await store.journey(document_id)
    assert journey is not None
    return Counter(s.stage for s in journey.steps)


async def tenant_rows(settings: Settings, tenant: str) -> dict[str, list[str]]:
    """Every row of the tenant, whole, as JSON text."""
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        out = {}
        for table in ("documents", "document_events", "parse_results", "chunks", "embeddings"):
            rows = await conn.fetch(
                f"SELECT row_to_json(t)::text AS j FROM {table} t WHERE tenant_id = $1", tenant
            )
            out[table] = sorted(r["j"] for r in rows)
        return out
    finally:
        await conn.close()


def no_duplicates(duplicates: dict[str, int]) -> None:
    assert duplicates == dict.fromkeys(duplicates, 0), duplicates


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- offset reset ------------------------------------------------------------------------------


async def test_parse_replay_from_a_time_for_a_stopped_group_reprocesses_exactly_the_later_uploads(
    settings: Settings, store: Store
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    tenant = f"tenant-{settings.kafka.topic_prefix}"
    async with workers(settings), Uploader(settings) as up:
        early = await upload(up, tenant, ["e0", "e1", "e2", "e3"])
        await wait_for_statuses(store, ids(early), 60)
        await asyncio.sleep(0.05)  # record times are milliseconds: the cut falls between them
        cut = datetime.now(UTC)
        await asyncio.sleep(0.05)
        late = await upload(up, tenant, ["l0", "l1", "l2"])
        await wait_for_statuses(store, ids(late), 60)
        await wait_until(lambda: caught_up(settings), 30, "the groups to commit everything")
    group = topology.group(Stage.PARSE)
    before = await committed_offsets(settings, group)
    ends = await end_offsets(settings, topology.uploaded)
    rows = await store.count_rows(tenant)
    since = cut.isoformat(timespec="milliseconds")

    dry = await replay_cli(settings, "parse", "--from", since, "--dry-run")
    assert dry.code == 0, dry
    assert "group " + group + " would process 3 record(s) again" in dry.flat, dry.out
    assert "nothing moved" in dry.flat
    assert await committed_offsets(settings, group) == before
    assert await end_offsets(settings, topology.uploaded) == ends

    reset = await replay_cli(settings, "parse", "--from", since)
    assert reset.code == 0, reset
    assert "processes 3 record(s) again" in reset.flat, reset.out
    uploads = await read_topic(settings, topology.uploaded, at_least=7)
    assert len(uploads) == 7, "a reset writes no record"
    first_late: dict[TopicPartition, int] = {}
    for d in uploads:
        if d.document_id in ids(late):
            first_late[d.partition] = min(first_late.get(d.partition, d.offset), d.offset)
    assert await committed_offsets(settings, group) == {**before, **first_late}

    replayed_at = datetime.now(UTC)
    async with workers(settings):

        async def late_done_again() -> bool:
            counts = [await steps(store, d) for d in ids(late)]
            return all(c["embed"] == 2 for c in counts)

        await wait_until(late_done_again, 60, "the later uploads to be processed again")
        await wait_until(lambda: caught_up(settings), 30, "the groups to commit everything")

    for doc_id in ids(late):
        # The very same upload records again: the parse step is recorded again in place; the
        # parse published new events, so chunk and embed have a second step each.
        assert await steps(store, doc_id) == {"parse": 1, "chunk": 2, "embed": 2}
        journey = await store.journey(doc_id)
        assert journey is not None
        (parse_step,) = [s for s in journey.steps if s.stage == "parse"]
        assert parse_step.started_at > replayed_at
    for doc_id in ids(early):
        assert await steps(store, doc_id) == {"parse": 1, "chunk": 1, "embed": 1}
        journey = await store.journey(doc_id)
        assert journey is not None
        assert all(s.started_at < cut for s in journey.steps)
    statuses = await wait_for_statuses(store, ids(early) + ids(late), 5)
    assert {d.status for d in statuses.values()} == {"embedded"}
    after = await store.count_rows(tenant)
    assert after == {**rows, "document_events": rows["document_events"] + 2 * len(late)}
    no_duplicates(await store.duplicate_rows())


async def test_an_offset_reset_is_refused_while_the_group_has_live_members(
    settings: Settings, store: Store
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    group = topology.group(Stage.PARSE)
    async with workers(settings, [Stage.PARSE]), Uploader(settings) as up:
        (receipt,) = await upload(up, "solo", ["only"])
        await wait_for_statuses(store, [receipt.document_id], 30, statuses=frozenset({"parsed"}))
        await wait_until(lambda: caught_up(settings, [Stage.PARSE]), 30, "the parse commit")
        before = await committed_offsets(settings, group)
        refused = await replay_cli(settings, "parse", "--earliest")
        refused_dry = await replay_cli(settings, "parse", "--shift-by", "-1", "--dry-run")
        after = await committed_offsets(settings, group)
    for ran in (refused, refused_dry):
        assert ran.code == 1, ran
        assert f"error: consumer group {group} has 1 live member(s)" in ran.err, ran.err
        assert "stop its workers first, or add --live" in " ".join(ran.err.split())
        assert ran.out == ""  # refused before any plan is shown
    assert before and after == before


# -- live republish ----------------------------------------------------------------------------


async def test_a_live_replay_of_one_tenant_reprocesses_it_and_leaves_the_others_untouched(
    settings: Settings, store: Store
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    mine, other = f"acme-{settings.kafka.topic_prefix}", f"globex-{settings.kafka.topic_prefix}"
    async with workers(settings), Uploader(settings) as up:
        a = await upload(up, mine, ["a0", "a1", "a2"])
        b = await upload(up, other, ["b0", "b1", "b2"])
        await wait_for_statuses(store, ids(a) + ids(b), 60)
        await wait_until(lambda: caught_up(settings), 30, "the groups to commit everything")
        others_before = await tenant_rows(settings, other)
        mine_before = await store.count_rows(mine)
        ends = await end_offsets(settings, topology.uploaded)

        dry = await replay_cli(
            settings, "parse", "--live", "--earliest", "--tenant", mine, "--dry-run"
        )
        assert dry.code == 0, dry
        assert "would republish 3 of 6 record(s)" in dry.flat, dry.out
        assert "left out 3: not taken by the filter" in dry.flat
        assert await end_offsets(settings, topology.uploaded) == ends, "a dry run writes nothing"
        # A document as the tables show it: the start of its id.
        one = await replay_cli(
            settings, "parse", "--live", "--earliest", "--document", ids(b)[0][:8], "--dry-run"
        )
        assert one.code == 0, one
        assert "would republish 1 of 6 record(s)" in one.flat, one.out

        ran = await replay_cli(settings, "parse", "--live", "--earliest", "--tenant", mine)
        assert ran.code == 0, ran
        found = re.search(rf"republished 3 record\(s\) to \S+ with {H_REPLAY}: (\w+)", ran.flat)
        assert found, ran.out
        replay_id = found[1]

        async def mine_done_again() -> bool:
            counts = [await steps(store, d) for d in ids(a)]
            return all(c == {"parse": 2, "chunk": 2, "embed": 2} for c in counts)

        await wait_until(mine_done_again, 60, "tenant's documents to be processed again")
        await wait_until(lambda: caught_up(settings), 30, "the groups to commit everything")

    uploads = await read_topic(settings, topology.uploaded, at_least=9)
    copies = [d for d in uploads if H_REPLAY in d.headers]
    originals = {d.document_id: d for d in uploads if H_REPLAY not in d.headers}
    assert sorted(d.document_id for d in copies) == sorted(ids(a))
    for copy in copies:
        original = originals[copy.document_id]
        assert copy.headers[H_REPLAY] == replay_id.encode()
        assert (copy.record.key, copy.record.value) == (original.record.key, original.record.value)
        assert {k: v for k, v in copy.headers.items() if k != H_REPLAY} == original.headers
    for doc_id in ids(a):
        journey = await store.journey(doc_id)
        assert journey is not None
        replayed = [s for s in journey.steps if s.replay]
        assert [s.stage for s in replayed] == ["parse"]
        assert replayed[0].replay.startswith(f"{topology.uploaded}:")
        assert replayed[0].detail["replay"] == replayed[0].replay
    assert await tenant_rows(settings, other) == others_before
    assert await store.count_rows(mine) == {
        **mine_before,
        "document_events": mine_before["document_events"] + 3 * len(a),
    }
    no_duplicates(await store.duplicate_rows())


# -- new settings ------------------------------------------------------------------------------


async def test_a_chunk_replay_with_new_settings_moves_every_document_and_embeds_only_new_text(
    settings: Settings, store: Store
) -> None:
    tenant = f"notes-{settings.kafka.topic_prefix}"
    with OpenAIServer() as server:
        first = real_openai(
            variant(settings, chunk={"max_tokens": 200, "overlap_tokens": 20}), server
        )
        await ensure_topics(first)
        async with workers(first), Uploader(first) as up:
            receipts = await upload(up, tenant, ["n0", "n1", "n2", "n3"])
            await wait_for_statuses(store, ids(receipts), 60)
            await wait_until(lambda: caught_up(first), 30, "the groups to commit everything")
        docs = {d: await store.get_document(d) for d in ids(receipts)}
        (old,) = {d.current_chunker_version for d in docs.values() if d is not None}
        old_texts = {c.text_sha256 for d in ids(receipts) for c in await store.load_chunks(d, old)}
        calls_before = len(server.ok_calls())

        # The operator changes the chunk settings and replays the chunk stage (group stopped).
        new_chunks = {"max_tokens": 60, "overlap_tokens": 0}
        second = real_openai(variant(settings, chunk=new_chunks), server)
        plan = await plan_replay(second, ReplayRequest.build("chunk", earliest=True))
        assert plan.again == len(receipts)
        report = await run_replay(second, plan)
        assert len(report.committed) == len(plan.moving) >= 1
        async with workers(second):

            async def all_on_new_version() -> bool:
                now = [await store.get_document(d) for d in ids(receipts)]
                return all(
                    d is not None
                    and d.status == "embedded"
                    and d.searchable_chunker_version not in (None, old)
                    for d in now
                )

            await wait_until(all_on_new_version, 60, "every document on the new chunker version")
            await wait_until(lambda: caught_up(second), 30, "the groups to commit everything")

        sent = [text for call in server.ok_calls()[calls_before:] for text in call.inputs]
        new_version = ""
        new_texts: set[str] = set()
        kept = 0
        for doc_id in ids(receipts):
            doc = await store.get_document(doc_id)
            assert doc is not None
            new_version = doc.current_chunker_version or ""
            assert new_version != old and doc.searchable_chunker_version == new_version
            chunks = await store.load_chunks(doc_id, new_version)
            assert doc.chunk_count == len(chunks) > 0
            new_texts |= {c.text_sha256 for c in chunks}
            # The rule: rows of the old version are kept; the document points at the new one.
            kept += len(await store.load_chunks(doc_id, old))
        assert kept == len(old_texts)
        # Only text never embedded before went to the API, each text once.
        assert sorted(sha(t) for t in sent) == sorted(new_texts - old_texts)
        assert new_texts & old_texts, "unchanged sections reuse their cached embeddings"
        model, dims = "text-embedding-3-small", settings.embed.dimensions
        hits = await store.search(tenant, vector_for(model, sent[0], dims), model, dims, k=10)
        assert hits and {h.chunker_version for h in hits} == {new_version}
        rows = await store.count_rows(tenant)
        assert rows["embeddings"] == len(old_texts) + len(new_texts)

        # A new embedding size, the embed stage replayed from the start: every current text is
        # embedded again at the new size, and the documents move to it. The events of the old
        # chunker version are skipped (nothing points at what they would make): not paid for.
        third = real_openai(variant(settings, chunk=new_chunks, embed={"dimensions": 256}), server)
        calls_before = len(server.ok_calls())
        plan = await plan_replay(third, ReplayRequest.build("embed", earliest=True))
        assert plan.again == 2 * len(receipts)  # the old version's events and the new
        await run_replay(third, plan)
        async with workers(third):

            async def all_at_256() -> bool:
                now = [await store.get_document(d) for d in ids(receipts)]
                return all(d is not None and d.current_embedding_dimensions == 256 for d in now)

            await wait_until(all_at_256, 60, "every document embedded at 256 dimensions")
            await wait_until(lambda: caught_up(third), 30, "the groups to commit everything")
        sent = [text for call in server.ok_calls()[calls_before:] for text in call.inputs]
        assert sorted(sha(t) for t in sent) == sorted(new_texts)
        assert {c.dimensions for c in server.ok_calls()[calls_before:]} == {256}
        hits = await store.search(tenant, vector_for(model, sent[0], 256), model, 256, k=10)
        assert hits and {h.chunker_version for h in hits} == {new_version}
    no_duplicates(await store.duplicate_rows())


# -- operator input ----------------------------------------------------------------------------


async def test_bad_operator_input_gets_one_line_and_a_non_zero_exit(settings: Settings) -> None:
    await ensure_topics(settings)
    env = cli_env(settings)
    runner = CliRunner()
    for args, code, text in (
        (["parse", "--from", "2099-01-01T00:00"], 2, "'2099-01-01T00:00' is in the future"),
        (["parse", "--from", "-2h30"], 2, "expected an ISO 8601 time"),
        (["index", "--earliest"], 2, "unknown stage; choose one of parse, chunk, embed"),
        (["parse", "--earliest"], 2, "is not known to"),  # the group never ran
        (["parse", "--live", "--offsets", "0:5-10"], 2, "offset 5 is beyond the end"),
        (["parse", "--live", "--offsets", "9:0"], 2, "has partitions 0..2"),
        (["parse", "--earliest", "--tenant", "acme"], 2, "add --live"),
        (["parse", "--shift-by", "3"], 2, "give a negative number"),
        (["parse"], 2, "say where the replay starts"),
    ):
        result = await asyncio.to_thread(runner.invoke, app, ["replay", *args], env=env)
        assert result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        flat = " ".join(result.output.split())
        assert flat.startswith("error: ") and text in flat, (args, result.output)
    # A prefix with no topics at all: the message says what to do.
    missing = variant(settings, kafka={"topic_prefix": f"{settings.kafka.topic_prefix}-none"})
    result = await asyncio.to_thread(
        runner.invoke, app, ["replay", "embed", "--live", "--earliest"], env=cli_env(missing)
    )
    assert result.exit_code == 2 and "ragstream topics create" in result.output, result.output
