"""The one consumer runtime every stage uses: decode, call the stage, publish, commit.

Delivery: at-least-once with exactly-once effect. A record's input offset is committed only
after the stage's PostgreSQL writes are done and its output record (or its retry or dead-letter
copy) is acknowledged by the broker (acks=all, idempotent producer). Stage functions know
nothing of Kafka; they take a typed event and return an `Outcome`.

Ordering: a partition's records are handled by one task at a time, and the loop keeps polling
meanwhile, so a slow record never exceeds `max.poll.interval.ms`. Records fetched for a
partition while its task runs queue behind it (the task takes them next, in offset order); the
partition is paused only while that queue is full. With
`concurrency` 1, a partition's records are handled one at a time in offset order, in
micro-batches; up to `kafka.concurrent_batches` batches of different partitions (so of different
documents) run at once, each in its own transaction. With `concurrency` N, up to
N records are handled at once in the process, across partitions and across keys within a
batch: records are keyed by document_id and each key's records run in offset order, so one
document's events keep their order (retry topics stay sequential: they wait on due times).
On shutdown or revocation, in-flight records get `kafka.shutdown_grace_s` to finish; the rest
are handed back uncommitted.

Failures are decided by one pure function, `consumers.policy.decide` (its docstring has the
table), and carried out here and only here:
- Retry: the record goes to `<prefix>.retry.<stage>` with its next attempt number and the time
  it becomes due (exponential backoff with jitter); the input offset is committed, so the
  partition it came from goes on at once. The same consumer reads the retry topic and pauses a
  retry partition until its head record is due. When attempts are used up: the DLQ.
- DeadLetter: the document's failure is written first (its status says dead-lettered with the
  reason), then the record goes to the dead-letter topic; a failure that cannot be written yet
  is not dead-lettered until it is. A poison pill keeps its bytes untouched.
- Park: on the retry topic with its attempt number unchanged (an open circuit, a tenant over
  its own budget: the call was never made).
- Hold: the service-wide budget said no: the partition is held at that record (uncommitted,
  paused) and it is tried again every few seconds.
- WaitForInfrastructure: our own PostgreSQL or Kafka does not answer. The record is held where
  it is, every partition of the stage is paused (the consumer keeps polling, so the group does
  not rebalance), the dependency is probed with backoff (`consumers.infrastructure`), and the
  record is tried again when it answers. No attempt is spent and readiness is false meanwhile,
  so an outage of any length dead-letters nothing. The same wait guards every write after the
  stage's own work (the output record, the journey, the retry and DLQ copies): once a record's
  output is published, nothing after it can dead-letter the record.

Budget gate: while `gate()` names a reason (the stage's paid service is THROTTLED in real
mode), every assigned partition is paused; the consumer keeps polling, so the group does not
rebalance, nothing is lost and lag grows. When the gate opens, the partitions resume.

The same runtime runs the cost accountant (`consumers.cost`): a consumer whose events are
CostUsage rather than document events and which publishes nothing downstream.
A dead-letter record keeps the original key, value and headers and adds `ragstream.errors.*`
headers saying where it came from and why.

Traces (`ragstream.tracing`, while tracing is on): each record's handling is one span, a child
of the context in its `traceparent` header, however it ends (in a batch, or alone after its
try in a batch failed); its output, retry copy and dead letter carry that span's context in
place of the trace headers it came with.

The runner's parts: `consumers.partitions` (tasks per partition, ordering, commits, waits),
`consumers.batch` (micro-batches), `consumers.failures` (carrying out the policy's decisions and
the copies that leave the runner), `consumers.handling` (what they share); headers are read and
built by `ragstream.headers`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from opentelemetry.trace import Span

from consumers.batch import MicroBatches
from consumers.failures import Failures
from consumers.handling import (
    WAS_UP_LIMIT,
    Batching,
    Handled,
    RunnerStats,
    StageHandler,
    StepRecorder,
    _Released,
)
from consumers.infrastructure import InfrastructureWatch, Waited, until_kafka
from consumers.partitions import Listener, PartitionWork
from consumers.policy import (
    WaitForInfrastructure,
    decide,
    retry_or_give_up,
)
from consumers.stage import Ahead, Outcome, RecordContext
from ragstream import kafkaio, tracing
from ragstream.codec import Codec
from ragstream.cost.meter import CallContext, current_call
from ragstream.errors import DecodeError
from ragstream.events import DocumentEmbedded, DocumentEvent, Event
from ragstream.headers import (
    correlation_id,
    is_replay_copy,
    retry_attempt,
)
from ragstream.kafka_clients import bounded, started
from ragstream.metrics import Metrics, observe_lag
from ragstream.scrub import Scrubber
from ragstream.settings import Settings
from ragstream.topology import Stage, Topology

log = structlog.get_logger(__name__)

COMMIT_TIMEOUT_S: Final = 2.0


class StageRunner(PartitionWork, MicroBatches, Failures):
    """Runs one consumer (a stage, or the cost accountant) as a member of its group until
    `stop` is set.

    `stage` names the consumer (`Stage.PARSE`, ..., or `topology.COST`); `accepts` is the event
    type its input topic carries; `recorder` writes document journeys (None: no journey).
    `watch` is the process's view of its dependencies (shared by its runners)."""

    def __init__(
        self,
        settings: Settings,
        stage: Stage | str,
        handler: StageHandler,
        codec: Codec,
        recorder: StepRecorder | None,
        *,
        concurrency: int = 1,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        gate: Callable[[], str | None] | None = None,
        accepts: type[Event] = DocumentEvent,
        watch: InfrastructureWatch | None = None,
        max_poll_records: int = 200,
        batching: Batching | None = None,
        ahead: Ahead | None = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.name = str(stage)
        self.handler = handler
        self.codec = codec
        self.recorder = recorder
        self.accepts = accepts
        self.concurrency = max(1, concurrency)
        self.metrics = metrics or Metrics(process_metrics=False)
        self.watch = watch or InfrastructureWatch(metrics=self.metrics)
        self.max_poll_records = max_poll_records
        # With `batching` and concurrency 1, a partition's records run as micro-batches: one
        # transaction, one flush of the producer and one commit for up to
        # `kafka.batch_records` records; up to `kafka.concurrent_batches` of them (of
        # different partitions) at once.
        self.batching = batching if self.concurrency == 1 else None
        self.batch_size = settings.kafka.batch_records
        self.ahead = ahead  # starts a batch's work ahead; what it returns stops that work
        self.scrub = Scrubber.from_settings(settings)  # error text leaves this process scrubbed
        self.joined = False  # holds group membership (readiness), with or without partitions
        self.topology = Topology(settings.kafka.topic_prefix)
        self.group_id = self.topology.group(stage)
        self.input_topic = self.topology.input_topic(stage)
        self.retry_topic = self.topology.retry(stage)
        self.output_topic = self.topology.output_topic(stage)
        self.stats = RunnerStats()
        self._rng = rng or random.Random()
        self._commit_lock = asyncio.Lock()
        # Units of work at once: records (lanes), or micro-batches and retried records.
        self._gate = asyncio.Semaphore(
            settings.kafka.concurrent_batches if self.batching is not None else self.concurrency
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.assigned = asyncio.Event()
        self.gate = gate  # a reason while the stage must not call its paid service
        self._reset()

    def _reset(self) -> None:
        """Fresh per-run state (a supervisor may run the same runner again after a crash)."""
        self._pending: dict[TopicPartition, int] = {}
        self._waiting: dict[TopicPartition, int] = {}  # paused partition -> due (ms)
        self._inflight: dict[TopicPartition, asyncio.Task[None]] = {}
        # records fetched for a partition while its task runs: the task takes them next
        self._queued: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        self._stopping: set[TopicPartition] = set()  # finishing what is in hand, nothing more
        self._stop: asyncio.Event | None = None
        self.assignment: set[TopicPartition] = set()
        self.blocked: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self._reset()
        self._stop = stop
        kafka = self.settings.kafka

        def make_producer() -> AIOKafkaProducer:
            # No linger: a batch's outputs are all handed to the producer before it sends
            # (one request), and a record alone should not wait for company.
            return kafkaio.producer(self.settings)

        def make_consumer() -> AIOKafkaConsumer:
            consumer = AIOKafkaConsumer(
                **kafka.client_options(),
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_interval_ms=kafka.max_poll_interval_ms,
                session_timeout_ms=kafka.session_timeout_ms,
                heartbeat_interval_ms=min(3000, kafka.session_timeout_ms // 3),
                max_poll_records=self.max_poll_records,
                # A partition that has just delivered, or was resumed, is fetched with the next
                # request: the long poll in flight for the other partitions holds it back at
                # most this (see the setting). A partition being worked on is not paused (its
                # records queue), so under load the fetches return at once.
                fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            )
            consumer.subscribe([self.input_topic, self.retry_topic], listener=Listener(self))
            return consumer

        self.producer = await until_kafka(kafka, lambda: started(make_producer), stop)
        if self.producer is None:
            return
        producer = self.producer
        try:
            self.consumer = await until_kafka(kafka, lambda: started(make_consumer), stop)
        except BaseException:
            await producer.stop()
            raise
        if self.consumer is None:
            await producer.stop()
            return
        consumer = self.consumer
        try:
            log.info("consumer started", stage=self.name, group=self.group_id)
            while not stop.is_set():
                self._apply_gate()
                timeout_ms = self._resume_due()
                if self._inflight:
                    timeout_ms = min(timeout_ms, 50)
                batch = await consumer.getmany(timeout_ms=timeout_ms)
                for tp, records in batch.items():
                    self._dispatch(tp, records)
                await self._reap()
                await self.commit_pending()
                await observe_lag(self.metrics, self.name, consumer)
        finally:
            await self._drain(self.settings.kafka.shutdown_grace_s)
            # Each step is bounded: with the broker away, shutdown must not wait for it (what
            # is not committed is handed to the next owner; every write is idempotent).
            await bounded(self._close(consumer, producer), "commit and leave the group", 2.0)
            self.joined = False
            self.metrics.stage_stopped(self.name)
            log.info("consumer stopped", stage=self.name, **self.stats.__dict__)

    async def _close(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        await self.commit_pending()
        # Leaving the group at once (LeaveGroup), so a restart hands partitions over fast.
        await asyncio.gather(consumer.stop(), producer.stop())

    async def commit_pending(self) -> None:
        async with self._commit_lock:
            if not self._pending or self.consumer is None:
                return
            pending, self._pending = self._pending, {}
            offsets = {tp: OffsetAndMetadata(off, "") for tp, off in pending.items()}
            try:
                # Bounded: with the coordinator away aiokafka waits for it indefinitely, and
                # the poll loop (which sees `stop`) must go on.
                async with asyncio.timeout(COMMIT_TIMEOUT_S):
                    await self.consumer.commit(offsets)
            except TimeoutError:
                for tp, off in pending.items():  # try again with the next commit
                    self._pending.setdefault(tp, off)
                log.warning("commit timed out; will try again", partitions=len(pending))
            except (CommitFailedError, KafkaError) as exc:
                # The group moved on, or the coordinator is away: whoever reads these
                # partitions next re-reads the records; every write is idempotent.
                log.warning("commit failed; records will be redelivered", error=str(exc))

    async def _handle_record(
        self,
        record: ConsumerRecord[bytes, bytes],
        first: Exception | None = None,
        span: Span | None = None,
    ) -> Handled:
        """Handle one record to its end; `first` is the error its try in a batch ended with
        (handled as the first attempt's, without calling the stage again), `span` the span
        of that try (its batch ends it)."""
        with self.metrics.inflight(self.name):
            try:
                return await self._handle_one(record, first, span)
            except _Released:
                return Handled.RELEASED

    def _decode(self, record: ConsumerRecord[bytes, bytes]) -> Event:
        event = self.codec.decode(record.value or b"")
        if not isinstance(event, self.accepts):
            raise DecodeError(f"{type(event).__name__} is not a {self.accepts.__name__} event")
        return event

    @contextmanager
    def _bound(self, record: ConsumerRecord[bytes, bytes]) -> Iterator[None]:
        """The record's place (and correlation id) on every log line of its handling."""
        with structlog.contextvars.bound_contextvars(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=self.name,
            correlation_id=correlation_id(record.headers),
        ):
            yield

    @staticmethod
    def _ids(event: Event) -> dict[str, object]:
        return {
            k: getattr(event, k)
            for k in ("document_id", "tenant_id", "correlation_id")
            if getattr(event, k, None) is not None
        }

    async def _handle_one(
        self, record: ConsumerRecord[bytes, bytes], first: Exception | None, span: Span | None
    ) -> Handled:
        own = span is None
        if own:
            span = tracing.record_span(self.name, self.group_id, record)
        with self._bound(record), tracing.active(span, end=own):
            try:
                event = self._decode(record)
            except DecodeError as exc:
                tracing.outcome("poison", exc)
                self.stats.poison += 1
                log.error("undecodable record dead-lettered", error=str(exc))
                poison = exc
                await self._steadily(
                    record,
                    lambda: self._dead_letter(record, None, poison, attempt=1, kind="poison"),
                )
                self.metrics.record_handled(self.name, "poison", 0.0)
                return Handled.DONE
            tracing.describe(span, event)
            with structlog.contextvars.bound_contextvars(**self._ids(event)):
                return await self._attempt(record, event, first)

    @contextmanager
    def _call_context(self, event: Event) -> Iterator[None]:
        """Name the document behind every paid call the handler makes (for cost usage)."""
        if not isinstance(event, DocumentEvent):
            yield
            return
        token = current_call.set(
            CallContext(
                stage=self.name,
                document_id=event.document_id,
                tenant_id=event.tenant_id,
                correlation_id=event.correlation_id,
            )
        )
        try:
            yield
        finally:
            current_call.reset(token)

    @staticmethod
    def _context(record: ConsumerRecord[bytes, bytes]) -> RecordContext:
        return RecordContext(
            record.topic,
            record.partition,
            record.offset,
            retry_attempt(record.headers),
            replay=is_replay_copy(record.headers),
            key=record.key,
        )

    async def _attempt(
        self, record: ConsumerRecord[bytes, bytes], event: Event, first: Exception | None = None
    ) -> Handled:
        ctx = self._context(record)
        attempt = ctx.attempt
        was_up = 0
        while True:
            started = datetime.now(UTC)
            t0 = time.perf_counter()
            try:
                if first is not None:  # the record's try in a batch ended so: take it from there
                    error, first = first, None
                    raise error
                with self._call_context(event):
                    outcome = await self.handler(event, ctx)
                if outcome.output is not None:
                    await self._publish(outcome.output)
                break
            except Exception as exc:
                action = decide(exc, attempt, self.settings.retry, self._rng)
                if isinstance(action, WaitForInfrastructure):
                    waited = await self._wait_for(record, action.dependency, exc)
                    was_up = was_up + 1 if waited is Waited.WAS_UP else 0
                    if was_up < WAS_UP_LIMIT:
                        continue  # the same record again, same attempt
                    action = retry_or_give_up(exc, attempt, self.settings.retry, self._rng)
                return await self._carry_out(action, record, event, exc, ctx, started, t0)
        if self.recorder is not None and isinstance(event, DocumentEvent):
            recorder = self.recorder
            await self._steadily(
                record,
                lambda: recorder.step_done(
                    event, self.name, outcome, ctx, started, datetime.now(UTC)
                ),
                what="journey step",
            )
        self._finished(event, outcome, ctx, t0)
        return Handled.DONE

    def _finished(self, event: Event, outcome: Outcome, ctx: RecordContext, t0: float) -> None:
        seconds = time.perf_counter() - t0
        self.stats.processed += 1
        self.stats.by_partition[ctx.partition] = self.stats.by_partition.get(ctx.partition, 0) + 1
        self.metrics.record_handled(self.name, outcome.status, seconds)
        tracing.outcome(outcome.status)
        if isinstance(outcome.output, DocumentEmbedded):
            self.metrics.record_embedded(outcome.output)
        log.info(
            "record handled",
            outcome=outcome.status,
            attempt=ctx.attempt,
            duration_ms=round(seconds * 1000, 1),
        )
