"""The one consumer runtime every stage uses: decode, call the stage, publish, commit.

Delivery: at-least-once with exactly-once effect. A record's input offset is committed only
after the stage's PostgreSQL writes are done and its output record is acknowledged by the broker
(acks=all, idempotent producer). Stage functions know nothing of Kafka; they take a typed event
and return an `Outcome`.

Ordering: records of one partition are handled in order (documents are keyed by document_id, so
one document's events stay in order); `concurrency` partitions are handled at once.

Failures are read here and only here (see ragstream.errors): a DecodeError (poison pill) or a
PermanentError is recorded and the partition goes on; a RetryableError is tried again with
exponential backoff and jitter up to `retry.max_attempts`, then recorded as failed.
"""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from consumers.stage import Outcome, RecordContext
from ragstream.codec import Codec
from ragstream.errors import DecodeError, PermanentError, RetryableError
from ragstream.events import DocumentEvent, Event
from ragstream.settings import RetrySettings, Settings
from ragstream.topology import H_ATTEMPT, H_CORRELATION_ID, H_REPLAY, Stage, Topology

log = structlog.get_logger(__name__)


StageHandler = Callable[[Event, RecordContext], Awaitable[Outcome]]


class StepRecorder(Protocol):
    """Where each record's handling is written down (the document's journey)."""

    async def step_done(
        self,
        event: DocumentEvent,
        stage: Stage,
        outcome: Outcome,
        attempt: int,
        started_at: datetime,
        finished_at: datetime,
    ) -> None: ...

    async def step_failed(
        self,
        event: DocumentEvent,
        stage: Stage,
        error: BaseException,
        attempt: int,
        started_at: datetime,
        finished_at: datetime,
        *,
        final: bool,
    ) -> None: ...


def backoff_delay(attempt: int, policy: RetrySettings, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: uniform(d/2, d), d = min(cap, base * factor**(attempt-1))."""
    ceiling = min(policy.cap_s, policy.base_s * policy.factor ** max(attempt - 1, 0))
    return (rng or random).uniform(ceiling / 2, ceiling)


def _header(record: ConsumerRecord[bytes, bytes], key: str) -> bytes | None:
    for k, v in record.headers or ():
        if k == key:
            return bytes(v)
    return None


@dataclass
class RunnerStats:
    processed: int = 0
    failed: int = 0
    poison: int = 0
    by_partition: dict[int, int] = field(default_factory=dict)


class StageRunner:
    """Runs one stage as a member of its consumer group until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        stage: Stage,
        handler: StageHandler,
        codec: Codec,
        recorder: StepRecorder,
        *,
        concurrency: int = 1,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.handler = handler
        self.codec = codec
        self.recorder = recorder
        self.concurrency = max(1, concurrency)
        self.topology = Topology(settings.kafka.topic_prefix)
        self.group_id = self.topology.group(stage)
        self.stats = RunnerStats()
        self._sleep = sleep
        self._pending: dict[TopicPartition, int] = {}
        self._commit_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.assigned = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        kafka = self.settings.kafka
        self.producer = AIOKafkaProducer(
            **kafka.client_options(), acks="all", enable_idempotence=True, linger_ms=5
        )
        self.consumer = AIOKafkaConsumer(
            **kafka.client_options(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=kafka.max_poll_interval_ms,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=min(3000, kafka.session_timeout_ms // 3),
            max_poll_records=200,
        )
        self.consumer.subscribe([self.topology.input_topic(self.stage)], listener=_Listener(self))
        await self.producer.start()
        try:
            await self.consumer.start()
            log.info("stage started", stage=self.stage.value, group=self.group_id)
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=500)
                if batch:
                    await self._handle_batch(batch)
                    await self.commit_pending()
        finally:
            await self.commit_pending()
            # Leaving the group at once (LeaveGroup), so a restart hands partitions over fast.
            await self.consumer.stop()
            await self.producer.stop()
            log.info("stage stopped", stage=self.stage.value, **self.stats.__dict__)

    async def commit_pending(self) -> None:
        async with self._commit_lock:
            if not self._pending or self.consumer is None:
                return
            offsets = {tp: OffsetAndMetadata(off, "") for tp, off in self._pending.items()}
            self._pending.clear()
            try:
                await self.consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # The group moved on: the new owner re-reads these records; writes are idempotent.
                log.warning("commit failed; records will be redelivered", error=str(exc))

    # -- records ---------------------------------------------------------------------------

    async def _handle_batch(
        self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> None:
        self._idle.clear()
        try:
            gate = asyncio.Semaphore(self.concurrency)

            async def one_partition(
                tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
            ) -> None:
                async with gate:
                    for record in records:
                        await self._handle_record(record)
                        self._pending[tp] = record.offset + 1

            await asyncio.gather(*(one_partition(tp, recs) for tp, recs in batch.items()))
        finally:
            self._idle.set()

    async def _handle_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        corr = (_header(record, H_CORRELATION_ID) or b"").decode(errors="replace") or None
        with structlog.contextvars.bound_contextvars(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=self.stage.value,
            correlation_id=corr,
        ):
            try:
                event = self.codec.decode(record.value or b"")
            except DecodeError as exc:
                self.stats.poison += 1
                log.error("undecodable record skipped", error=str(exc))
                return
            if not isinstance(event, DocumentEvent):
                self.stats.poison += 1
                log.error("unexpected event type on stage input", event_type=type(event).__name__)
                return
            with structlog.contextvars.bound_contextvars(
                document_id=event.document_id,
                tenant_id=event.tenant_id,
                correlation_id=event.correlation_id,
            ):
                await self._attempts(record, event)

    async def _attempts(self, record: ConsumerRecord[bytes, bytes], event: DocumentEvent) -> None:
        first = int((_header(record, H_ATTEMPT) or b"1").decode() or 1)
        policy = self.settings.retry
        attempt = first
        while True:
            ctx = RecordContext(
                record.topic,
                record.partition,
                record.offset,
                attempt,
                replay=_header(record, H_REPLAY) is not None,
            )
            started = datetime.now(UTC)
            t0 = time.perf_counter()
            try:
                outcome = await self.handler(event, ctx)
                if outcome.output is not None:
                    await self._publish(outcome.output)
                await self.recorder.step_done(
                    event, self.stage, outcome, attempt, started, datetime.now(UTC)
                )
            except PermanentError as exc:
                await self._failed(event, exc, attempt, started, final=True)
                return
            except (RetryableError, KafkaError, OSError) as exc:
                final = attempt >= policy.max_attempts
                await self._failed(event, exc, attempt, started, final=final)
                if final:
                    return
                delay = getattr(exc, "retry_after", None) or backoff_delay(attempt, policy)
                log.warning("retrying", attempt=attempt, delay_s=round(delay, 3), error=str(exc))
                await self._sleep(delay)
                attempt += 1
                continue
            self.stats.processed += 1
            self.stats.by_partition[record.partition] = (
                self.stats.by_partition.get(record.partition, 0) + 1
            )
            log.info(
                "record handled",
                outcome=outcome.status,
                attempt=attempt,
                duration_ms=round((time.perf_counter() - t0) * 1000, 1),
            )
            return

    async def _failed(
        self,
        event: DocumentEvent,
        exc: BaseException,
        attempt: int,
        started: datetime,
        *,
        final: bool,
    ) -> None:
        if final:
            self.stats.failed += 1
            log.error(
                "record failed",
                attempt=attempt,
                error_class=type(exc).__name__,
                error=str(exc),
                stack="".join(traceback.format_exception(exc)[-3:]),
            )
        try:
            await self.recorder.step_failed(
                event, self.stage, exc, attempt, started, datetime.now(UTC), final=final
            )
        except RetryableError as rec_exc:
            log.error("could not record failure", error=str(rec_exc))

    async def _publish(self, event: Event) -> None:
        assert self.producer is not None
        key = event.document_id.encode() if isinstance(event, DocumentEvent) else None
        await self.producer.send_and_wait(
            self.topology.output_topic(self.stage),
            self.codec.encode(event),
            key=key,
            headers=self.codec.headers_for(event),
        )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish the records in hand and commit them before giving partitions away."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.runner._idle.wait()
        await self.runner.commit_pending()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info(
            "partitions assigned",
            stage=self.runner.stage.value,
            partitions=sorted(tp.partition for tp in assigned),
        )
        if assigned:
            self.runner.assigned.set()
