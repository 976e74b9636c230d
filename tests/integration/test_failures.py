"""Failures in the one consumer runtime: non-blocking retries, the dead-letter topic, poison pills."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from typer.testing import CliRunner

from consumers.compose import Providers
from consumers.runtime import StageRunner
from consumers.worker import run_workers
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.cli import app
from ragstream.dlq import DlqFilter, redrive
from ragstream.errors import PermanentError, RetryableError
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.embed.port import Embedder, EmbedResult
from ragstream.providers.parse.port import Parser, ParseResult
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_DOCUMENT,
    H_ERR_FIRST_FAILURE,
    H_ERR_GROUP,
    H_ERR_KIND,
    H_ERR_LAST_FAILURE,
    H_ERR_MESSAGE,
    H_ERR_OFFSET,
    H_ERR_PARTITION,
    H_ERR_STACKTRACE,
    H_ERR_STAGE,
    H_ERR_TIMESTAMP,
    H_ERR_TOPIC,
    Stage,
    Topology,
)
from tests.integration.pipeline_helpers import caught_up, end_offsets, wait_until

pytestmark = [pytest.mark.integration]

ALL_ERR_HEADERS = (
    H_ERR_TOPIC,
    H_ERR_PARTITION,
    H_ERR_OFFSET,
    H_ERR_TIMESTAMP,
    H_ERR_STAGE,
    H_ERR_GROUP,
    H_ERR_CLASS,
    H_ERR_KIND,
    H_ERR_MESSAGE,
    H_ERR_STACKTRACE,
    H_ERR_ATTEMPTS,
    H_ERR_FIRST_FAILURE,
    H_ERR_LAST_FAILURE,
    H_CORRELATION_ID,
)


def fast_retries(settings: Settings, base_s: float = 0.2, cap_s: float = 1.0) -> Settings:
    retry = settings.retry.model_copy(update={"base_s": base_s, "cap_s": cap_s})
    return settings.model_copy(update={"retry": retry})


class FlakyEmbedder(Embedder):
    """Fails the first `failures` calls for texts containing `marker`, then embeds for real."""

    def __init__(
        self, dimensions: int, marker: str, failures: int, error: Callable[[], Exception]
    ) -> None:
        self.inner = LocalEmbedder(dimensions)
        self.marker, self.failures, self.error = marker, failures, error
        self.calls = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def dimensions(self) -> int:
        return self.inner.dimensions

    async def embed(self, texts: list[str]) -> EmbedResult:
        if any(self.marker in t for t in texts):
            self.calls += 1
            if self.calls <= self.failures:
                raise self.error()
        return await self.inner.embed(texts)


@asynccontextmanager
async def pipeline(
    settings: Settings,
    providers: Providers | None = None,
    stages: list[Stage] | None = None,
    started: Callable[[list[StageRunner]], None] | None = None,
) -> AsyncIterator[None]:
    await ensure_topics(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_workers(
            settings,
            stages or list(Stage),
            stop=stop,
            providers=providers,
            started=started,
        )
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def wait_status(
    store: Store, document_id: str, statuses: set[str], within_s: float = 60
) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        doc = await store.get_document(document_id)
        if doc is not None and doc.status in statuses:
            return doc.status
        await asyncio.sleep(0.2)
    doc = await store.get_document(document_id)
    raise AssertionError(f"{document_id} did not reach {statuses}: {doc}")


async def read_all(
    settings: Settings, topic: str, want: int, within_s: float = 30
) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + within_s
        while len(out) < want and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                out += recs
        return out
    finally:
        await consumer.stop()


async def dlq_depth(settings: Settings) -> int:
    consumer = AIOKafkaConsumer(**settings.kafka.client_options())
    await consumer.start()
    try:
        topic = Topology(settings.kafka.topic_prefix).dlq
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()


async def test_fails_twice_then_succeeds_without_the_dlq(settings: Settings) -> None:
    settings = fast_retries(settings)
    marker = f"flaky-{uuid.uuid4().hex[:8]}"
    flaky = FlakyEmbedder(
        settings.embed.dimensions, marker, 2, lambda: RetryableError("embedder timed out")
    )
    async with pipeline(settings, Providers(embedder=flaky)), Uploader(settings) as up:
        receipt = await up.upload_bytes(
            f"# Flaky\n\nThis text has {marker} in it.".encode(), "flaky.md", tenant_id="t1"
        )
        async with await Store.connect(settings.postgres.dsn()) as store:
            assert (
                await wait_status(store, receipt.document_id, {"embedded", "dead-lettered"})
                == "embedded"
            )

            async def embed_steps() -> list[tuple[int, str]]:
                journey = await store.journey(receipt.document_id)
                assert journey is not None
                return [(s.attempt, s.outcome) for s in journey.steps if s.stage == "embed"]

            # The last step is written just after the status says embedded.
            await wait_until(lambda: _ends_ok(embed_steps()), 15, "the embed step")
            steps = await embed_steps()
    assert steps == [(1, "retry"), (2, "retry"), (3, "ok")]
    assert await dlq_depth(settings) == 0


async def test_permanent_failure_is_dead_lettered_at_once_with_every_header(
    settings: Settings,
) -> None:
    marker = f"refused-{uuid.uuid4().hex[:8]}"
    bad = FlakyEmbedder(
        settings.embed.dimensions,
        marker,
        99,
        lambda: PermanentError("input rejected by the provider"),
    )
    async with pipeline(settings, Providers(embedder=bad)), Uploader(settings) as up:
        receipt = await up.upload_bytes(
            f"# Bad\n\nThis has {marker}.".encode(), "bad.md", tenant_id="t1"
        )
        async with await Store.connect(settings.postgres.dsn()) as store:
            assert (
                await wait_status(store, receipt.document_id, {"embedded", "dead-lettered"})
                == "dead-lettered"
            )
            doc = await store.get_document(receipt.document_id)
    assert bad.calls == 1  # no retries for a permanent failure
    assert (
        doc is not None
        and doc.status_reason
        and "input rejected by the provider" in doc.status_reason
    )
    topology = Topology(settings.kafka.topic_prefix)
    (record,) = await read_all(settings, topology.dlq, 1)
    headers = {k: v.decode() for k, v in record.headers}
    for key in ALL_ERR_HEADERS:
        assert key in headers, key
    assert headers[H_ERR_TOPIC] == topology.chunked
    assert headers[H_ERR_STAGE] == "embed"
    assert headers[H_ERR_GROUP] == topology.group(Stage.EMBED)
    assert headers[H_ERR_CLASS] == "PermanentError"
    assert headers[H_ERR_KIND] == "permanent"
    assert headers[H_ERR_ATTEMPTS] == "1"
    assert headers[H_ERR_DOCUMENT] == receipt.document_id
    assert headers[H_CORRELATION_ID] == receipt.correlation_id
    assert "Traceback" in headers[H_ERR_STACKTRACE]
    # The original record, byte for byte: key and value as they were on the chunked topic.
    (original,) = [
        r
        for r in await read_all(settings, topology.chunked, 1)
        if r.partition == int(headers[H_ERR_PARTITION]) and r.offset == int(headers[H_ERR_OFFSET])
    ]
    assert (record.key, record.value) == (original.key, original.value)

    # kcat, a third-party client, shows those headers.
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed (make test installs Debian's kcat)"
    out = await asyncio.to_thread(
        subprocess.run,
        [
            kcat,
            "-b",
            settings.kafka.bootstrap_servers,
            "-C",
            "-t",
            topology.dlq,
            "-e",
            "-q",
            "-f",
            "%h\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    for key in ALL_ERR_HEADERS:
        assert key + "=" in out.stdout, key


async def test_poison_pills_are_dead_lettered_and_the_partition_goes_on(settings: Settings) -> None:
    # One partition per topic: the valid records are behind the pills on the same partition.
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"partitions": 1})}
    )
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    random_bytes = os.urandom(64)
    unknown_fingerprint = b"\xc3\x01" + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00" * 16
    producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
    await producer.start()
    try:
        for value in (random_bytes, unknown_fingerprint):
            await producer.send_and_wait(topology.uploaded, value, key=b"poison", partition=0)
    finally:
        await producer.stop()
    async with pipeline(settings), Uploader(settings) as up:
        receipts = []
        for i in range(3):
            receipts.append(
                await up.upload_bytes(
                    f"# Valid {i}\n\nBehind the poison.".encode(), f"v{i}.md", tenant_id="t1"
                )
            )
        async with await Store.connect(settings.postgres.dsn()) as store:
            for r in receipts:
                assert await wait_status(store, r.document_id, {"embedded"}) == "embedded"
    dlq = await read_all(settings, topology.dlq, 2)
    assert sorted(r.value for r in dlq) == sorted([random_bytes, unknown_fingerprint])
    for record in dlq:
        headers = {k: v.decode() for k, v in record.headers}
        assert headers[H_ERR_KIND] == "poison"
        assert headers[H_ERR_CLASS] == "DecodeError"
        assert headers[H_ERR_TOPIC] == topology.uploaded and headers[H_ERR_PARTITION] == "0"
    assert (
        "unknown schema fingerprint"
        in {k: v.decode() for k, v in dlq[1].headers}[H_ERR_MESSAGE]
        + {k: v.decode() for k, v in dlq[0].headers}[H_ERR_MESSAGE]
    )


async def test_a_failing_record_and_a_poison_pill_inside_a_batch_fail_alone(
    settings: Settings,
) -> None:
    """The embed stage finds ten records waiting on its one partition: one batch. One document
    cannot be embedded and one record cannot be decoded: both are dead-lettered, and the other
    eight are embedded in that batch, their stage call made once."""
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"partitions": 1})}
    )
    topology = Topology(settings.kafka.topic_prefix)
    marker = f"unembeddable-{uuid.uuid4().hex[:8]}"
    flaky = FlakyEmbedder(
        settings.embed.dimensions, marker, 99, lambda: PermanentError("the text cannot be embedded")
    )
    async with pipeline(settings, stages=[Stage.PARSE, Stage.CHUNK]), Uploader(settings) as up:
        receipts = [
            await up.upload_bytes(
                f"# Batch {i}\n\n{marker if i == 4 else 'Nothing wrong here.'}".encode(),
                f"batch{i}.md",
                tenant_id="t1",
            )
            for i in range(9)
        ]
        assert len(await read_all(settings, topology.chunked, 9)) == 9
    producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topology.chunked, b"\x00not an event", key=b"junk")
    finally:
        await producer.stop()
    poison = receipts[4].document_id
    runners: list[StageRunner] = []
    async with (
        pipeline(settings, Providers(embedder=flaky), stages=[Stage.EMBED], started=runners.extend),
        await Store.connect(settings.postgres.dsn()) as store,
    ):
        for r in receipts:
            want = "dead-lettered" if r.document_id == poison else "embedded"
            assert await wait_status(store, r.document_id, {want}) == want
        (runner,) = runners
        await wait_until(lambda: runner.stats.dead_lettered == 2, 30, "two dead letters")
    assert runner.stats.largest_batch == 10, runner.stats
    assert runner.stats.processed == 8
    assert flaky.calls == 1  # its try in the batch failed; handled from that error, not again
    dlq = {dict(r.headers)[H_ERR_KIND]: r for r in await read_all(settings, topology.dlq, 2)}
    assert set(dlq) == {b"permanent", b"poison"}
    assert dict(dlq[b"permanent"].headers)[H_ERR_DOCUMENT] == poison.encode()
    assert dlq[b"poison"].value == b"\x00not an event"


async def test_a_record_in_retry_does_not_hold_up_its_partition(settings: Settings) -> None:
    # One partition per topic: the failing record and the valid ones share it.
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"partitions": 1})}
    )
    settings = fast_retries(settings, base_s=20.0, cap_s=20.0)  # the retry is due in 10-20 s
    marker = f"slow-{uuid.uuid4().hex[:8]}"
    flaky = FlakyEmbedder(
        settings.embed.dimensions, marker, 99, lambda: RetryableError("service unavailable")
    )
    async with pipeline(settings, Providers(embedder=flaky)), Uploader(settings) as up:
        failing = await up.upload_bytes(
            f"# Failing\n\n{marker}".encode(), "failing.md", tenant_id="t1"
        )
        t0 = time.monotonic()
        valid = [
            await up.upload_bytes(
                f"# Fine {i}\n\nNothing wrong here.".encode(), f"fine{i}.md", tenant_id="t1"
            )
            for i in range(3)
        ]
        async with await Store.connect(settings.postgres.dsn()) as store:
            for r in valid:
                assert (
                    await wait_status(store, r.document_id, {"embedded"}, within_s=8) == "embedded"
                )
            elapsed = time.monotonic() - t0
            failing_doc = await store.get_document(failing.document_id)
    # The valid records went through while the failing one waited in the retry topic.
    assert elapsed < 8
    assert flaky.calls == 1
    assert failing_doc is not None and failing_doc.status == "chunked"
    retry = await read_all(settings, Topology(settings.kafka.topic_prefix).retry(Stage.EMBED), 1)
    assert [dict(r.headers)[H_ATTEMPT] for r in retry] == [b"2"]


class BrokenParser(Parser):
    """A parser with a bug: every document fails permanently (until it is 'fixed')."""

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult:
        raise PermanentError("parser bug: cannot read this document")


async def test_redrive_after_the_fix_completes_the_documents_once(settings: Settings) -> None:
    async with pipeline(settings, Providers(parser=BrokenParser())), Uploader(settings) as up:
        receipts = [
            await up.upload_bytes(
                f"# Doc {i}\n\nRedrive me, number {i}.".encode(), f"d{i}.md", tenant_id="t1"
            )
            for i in range(3)
        ]
        async with await Store.connect(settings.postgres.dsn()) as store:
            for r in receipts:
                assert await wait_status(store, r.document_id, {"dead-lettered"}) == "dead-lettered"
    # The fix is deployed (the local parser); the operator sends the parse dead letters back.
    topology = Topology(settings.kafka.topic_prefix)
    runner = CliRunner()
    env = {
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "RAGSTREAM_DATABASE_URL": settings.postgres.dsn(),
    }
    async with pipeline(settings):
        first = await asyncio.to_thread(
            runner.invoke, app, ["dlq", "redrive", "--stage", "parse"], env=env
        )
        assert first.exit_code == 0, first.output
        async with await Store.connect(settings.postgres.dsn()) as store:
            for r in receipts:
                assert await wait_status(store, r.document_id, {"embedded"}) == "embedded"
            # The embed step is recorded just after the status, and the commit after both:
            # once every group has committed its input, the rows are final.
            await wait_until(lambda: caught_up(settings), 30, "the groups to commit everything")
            counts = await store.count_rows("t1")
        uploads = await end_offsets(settings, topology.uploaded)
        second = await asyncio.to_thread(
            runner.invoke, app, ["dlq", "redrive", "--stage", "parse"], env=env
        )
        assert second.exit_code == 0, second.output
        assert "nothing to redrive" in second.output
        assert await end_offsets(settings, topology.uploaded) == uploads, "a record was sent back"
        # Anything sent back would have gone through every stage by the time they have all
        # committed their input again.
        await wait_until(lambda: caught_up(settings), 30, "the groups to commit everything")
        async with await Store.connect(settings.postgres.dsn()) as store:
            assert await store.count_rows("t1") == counts
            assert not any((await store.duplicate_rows("t1")).values())
    report = await redrive(settings, DlqFilter.build(stages=["parse"]), dry_run=True)
    assert report.selected == []


async def test_bad_operator_input_gets_a_message_not_a_traceback(settings: Settings) -> None:
    await ensure_topics(settings)
    env = {
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "RAGSTREAM_DATABASE_URL": settings.postgres.dsn(),
    }
    runner = CliRunner()
    for args, code, text in (
        (["dlq", "list", "--stage", "index"], 2, "stage"),
        (["dlq", "list", "--since", "yesterday-ish"], 2, "since"),
        (["dlq", "stats"], 0, "the DLQ is empty"),
        (["worker", "index"], 2, "unknown stage"),  # a usage error, as the others
        (["services", "mode", "openai", "mock"], 2, "unknown mode"),
    ):
        result = await asyncio.to_thread(runner.invoke, app, args, env=env)
        assert result.exit_code == code, (args, result.output)
        assert text in result.output.lower() or text in result.output, (args, result.output)
        assert "Traceback" not in result.output


async def _ends_ok(steps: Awaitable[list[tuple[int, str]]]) -> bool:
    found = await steps
    return bool(found) and found[-1][1] == "ok"
