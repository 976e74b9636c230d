"""The one consumer runtime every stage uses: decode, call the stage, publish, commit.

Delivery: at-least-once with exactly-once effect. A record's input offset is committed only
after the stage's PostgreSQL writes are done and its output record (or its retry or dead-letter
copy) is acknowledged by the broker (acks=all, idempotent producer). Stage functions know
nothing of Kafka; they take a typed event and return an `Outcome`.

Ordering: a partition's batch is handled by one task while the partition is paused, and the
loop keeps polling meanwhile, so a slow record never exceeds `max.poll.interval.ms`. With
`concurrency` 1, records are handled one at a time in offset order. With `concurrency` N, up to
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
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from contextvars import Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final, Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from opentelemetry.trace import Span

from consumers.infrastructure import InfrastructureWatch, Waited, until_kafka
from consumers.policy import (
    Action,
    DeadLetter,
    Hold,
    Park,
    Retry,
    WaitForInfrastructure,
    decide,
    retry_or_give_up,
)
from consumers.stage import Outcome, RecordContext
from ragstream import kafkaio, tracing
from ragstream.codec import Codec
from ragstream.cost.meter import CallContext, current_call
from ragstream.errors import KAFKA, POSTGRES, DecodeError
from ragstream.events import DocumentEmbedded, DocumentEvent, Event
from ragstream.headers import (
    MESSAGE_LIMIT,
    correlation_id,
    dead_letter_headers,
    is_replay_copy,
    retry_attempt,
    retry_due_ms,
    retry_headers,
)
from ragstream.kafka_clients import bounded, started
from ragstream.metrics import Metrics, observe_lag
from ragstream.scrub import Scrubber
from ragstream.settings import Settings
from ragstream.topology import Stage, Topology

log = structlog.get_logger(__name__)

T = TypeVar("T")
StageHandler = Callable[[Event, RecordContext], Awaitable[Outcome]]

# After this many waits in which the dependency answered at the first probe, the error is
# taken to be the record's own (a statement that always times out): it spends an attempt.
WAS_UP_LIMIT: Final = 3


class StepRecorder(Protocol):
    """Where each record's handling is written down (the document's journey)."""

    async def step_done(
        self,
        event: DocumentEvent,
        stage: str,
        outcome: Outcome,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
    ) -> None: ...

    async def step_failed(
        self,
        event: DocumentEvent,
        stage: str,
        error: BaseException,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
        *,
        final: bool,
    ) -> None: ...


class BatchScope(Protocol):
    """One transaction around a batch of records (`Store.batch()`); a record's own writes run in
    a savepoint, so one record failing does not undo the others."""

    def savepoint(self) -> AbstractAsyncContextManager[None]: ...


Batching = Callable[[], AbstractAsyncContextManager[BatchScope]]

COMMIT_TIMEOUT_S: Final = 2.0
FETCH_MAX_WAIT_MS: Final = 100


def _now_ms() -> int:
    return int(time.time() * 1000)


class Handled(Enum):
    DONE = "done"  # finished (output, retry or dead letter acknowledged): commit past it
    HOLD = "hold"  # the budget refused it: keep it where it is, try again soon
    RELEASED = "released"  # shutting down or revoked while waiting: hand it back uncommitted


class _Released(BaseException):
    """Raised inside a record's handling when its partition is handed back mid-wait (a
    BaseException, like cancellation, so no handler's `except Exception` takes it)."""


@dataclass
class _Tried:
    """A record's try inside a batch: its outcome, or the error to handle it alone with."""

    record: ConsumerRecord[bytes, bytes]
    event: Event
    ctx: RecordContext
    started: datetime
    t0: float
    span: Span | None = None
    outcome: Outcome | None = None
    error: Exception | None = None


def batches(
    records: Sequence[ConsumerRecord[bytes, bytes]], size: int
) -> Iterator[list[ConsumerRecord[bytes, bytes]]]:
    """A partition's records in runs of at most `size`, a key (document) at most once in each,
    in offset order: a record handled alone after its batch never overtakes its document's
    next record."""
    run: list[ConsumerRecord[bytes, bytes]] = []
    keys: set[bytes | None] = set()
    for record in records:
        if len(run) >= size or record.key in keys:
            yield run
            run, keys = [], set()
        run.append(record)
        keys.add(record.key)
    if run:
        yield run


@dataclass
class RunnerStats:
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    poison: int = 0
    held_for_infrastructure: int = 0
    batches: int = 0  # micro-batches written (each one transaction)
    largest_batch: int = 0
    by_partition: dict[int, int] = field(default_factory=dict)


class StageRunner:
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
        # `kafka.batch_records` records.
        self.batching = batching if self.concurrency == 1 else None
        self.batch_size = settings.kafka.batch_records
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
        self._gate = asyncio.Semaphore(self.concurrency)
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
        self._stopping: set[TopicPartition] = set()  # finishing what is in hand, nothing more
        self._stop: asyncio.Event | None = None
        self.assignment: set[TopicPartition] = set()
        self.blocked: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._reset()
        self._stop = stop
        kafka = self.settings.kafka

        def make_producer() -> AIOKafkaProducer:
            return kafkaio.producer(self.settings, linger_ms=5)

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
                # A partition resumed after its batch is fetched with the next request; a
                # long poll in flight for the other partitions holds that back at most this.
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            )
            consumer.subscribe([self.input_topic, self.retry_topic], listener=_Listener(self))
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

    def _apply_gate(self) -> None:
        """Pause every assigned partition while the budget gate is closed or a dependency is
        away; resume when both allow."""
        assert self.consumer is not None
        budget = self.gate() if self.gate is not None else None
        reason = self.watch.reason or budget
        was, self.blocked = self.blocked, reason
        self.metrics.set_stage_paused(self.name, bool(budget))
        if bool(reason) == bool(was):
            return
        if reason:
            log.warning("consumer paused", stage=self.name, reason=reason)
            self.consumer.pause(*self.consumer.assignment())
        else:
            log.info("consumer resumed", stage=self.name)
            for tp in self.consumer.assignment():
                self._resume(tp)

    def _resume(self, tp: TopicPartition) -> None:
        """Resume a partition unless a task holds it, it waits for a due time, or the gate is
        closed."""
        assert self.consumer is not None
        if (
            self.blocked is None
            and tp not in self._inflight
            and tp not in self._waiting
            and tp in self.consumer.assignment()
        ):
            self.consumer.resume(tp)

    def _resume_due(self) -> int:
        """Resume partitions whose wait is over; return how long to poll (ms)."""
        now = _now_ms()
        for tp, due in list(self._waiting.items()):
            if due <= now:
                del self._waiting[tp]
                self._resume(tp)
        if not self._waiting:
            return 500
        return max(10, min(500, min(self._waiting.values()) - now))

    # -- records ---------------------------------------------------------------------------

    def _dispatch(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Hand a partition's records to a task of their own; the partition is paused until
        the task is done, so the loop keeps polling (no max.poll.interval.ms breach, however
        long a record takes) while one document's records stay in order."""
        assert self.consumer is not None
        self.consumer.pause(tp)
        self._inflight[tp] = asyncio.create_task(self._run_partition(tp, records))

    async def _run_partition(
        self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        if tp.topic == self.retry_topic or self.concurrency == 1:
            async with self._gate:
                if tp.topic != self.retry_topic and self.batching is not None:
                    await self._run_batches(tp, records)
                    return
                for record in records:
                    if tp in self._stopping:
                        return  # revoked or shutting down: the rest go back uncommitted
                    if tp.topic == self.retry_topic and self._not_yet_due(tp, record):
                        return
                    if not self._settle(tp, record, await self._handle_record(record)):
                        return
            return
        await self._run_by_key(tp, records)

    async def _run_batches(
        self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Run a partition's records as micro-batches (see `_handle_batch`); the committed offset
        is the end of the finished prefix, as record by record."""
        for run in batches(records, self.batch_size):
            if tp in self._stopping:
                return  # revoked or shutting down: the rest go back uncommitted
            for record, handled in zip(run, await self._handle_batch(run), strict=True):
                if not self._settle(tp, record, handled):
                    return

    def _settle(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], handled: Handled
    ) -> bool:
        """Move the partition's commit past a finished record; False when the partition stops
        at it (handed back, or held by the budget)."""
        if handled is Handled.RELEASED:
            return False
        if handled is Handled.HOLD:
            self._hold(tp, record)
            return False
        self._pending[tp] = record.offset + 1
        return True

    async def _run_by_key(
        self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Run a batch as one lane per key (document): lanes run at once, up to `concurrency`
        records in the process, and each lane in offset order, so one document's records keep
        their order. The committed offset is the end of the batch's finished prefix; if the
        budget held a record, the partition is held at the first unfinished one (records after
        it that finished are handled again later: every write is idempotent)."""
        lanes: dict[bytes | None, list[ConsumerRecord[bytes, bytes]]] = {}
        for record in records:
            lanes.setdefault(record.key, []).append(record)
        done: set[int] = set()
        held = asyncio.Event()

        async def lane(queue: list[ConsumerRecord[bytes, bytes]]) -> None:
            for record in queue:
                if held.is_set() or tp in self._stopping:
                    return  # the budget said no, or the partition is being handed back
                async with self._gate:
                    handled = await self._handle_record(record)
                if handled is not Handled.DONE:
                    held.set()
                    return
                done.add(record.offset)

        await asyncio.gather(*(lane(queue) for queue in lanes.values()))
        for record in records:
            if record.offset not in done:
                if tp not in self._stopping:  # held by the budget: wait here
                    self._hold(tp, record)
                break
            self._pending[tp] = record.offset + 1

    async def _reap(self) -> None:
        """Collect finished partition tasks; resume their partitions (unless waiting on a retry)."""
        assert self.consumer is not None
        for tp, task in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[tp]
            task.result()  # a failure here is a bug: the supervisor restarts this consumer
            self._resume(tp)

    async def _drain(self, grace_s: float, only: set[TopicPartition] | None = None) -> None:
        """Let the records in hand finish for up to `grace_s` and start no more of the batch;
        then hand the rest back (cancel). Offsets of records not finished stay uncommitted, so
        the next owner processes them."""
        tasks = {tp: t for tp, t in self._inflight.items() if only is None or tp in only}
        if not tasks:
            return
        self._stopping |= set(tasks)
        try:
            _, late = await asyncio.wait(tasks.values(), timeout=grace_s)
        finally:
            self._stopping -= set(tasks)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for tp in tasks:
            self._inflight.pop(tp, None)
        if late:
            log.warning("in-flight records handed back", records=len(late))

    def _not_yet_due(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Pause a retry partition at a record that is not due yet (other partitions go on)."""
        due = retry_due_ms(record.headers, _now_ms())
        if due is None:
            return False
        assert self.consumer is not None
        self.consumer.seek(tp, record.offset)
        self.consumer.pause(tp)
        self._waiting[tp] = due
        return True

    def _hold(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        """Keep a record the budget refused where it is: uncommitted, its partition paused,
        and try it again in a few seconds (sooner than the gate would reopen is harmless)."""
        assert self.consumer is not None
        self.consumer.seek(tp, record.offset)
        self.consumer.pause(tp)
        self._waiting[tp] = _now_ms() + int(Hold().recheck_s * 1000)

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

    # -- micro-batches -----------------------------------------------------------------------

    async def _handle_batch(self, records: list[ConsumerRecord[bytes, bytes]]) -> list[Handled]:
        """Handle records of distinct documents as one batch: each record's stage work in a
        savepoint of one transaction, with its journey step; the transaction committed once;
        the outputs sent together and flushed once. A record whose try failed (or that cannot
        be decoded) is then handled alone from that error (its retry, dead letter or wait), so
        it never fails its neighbours. When the batch itself cannot be written (PostgreSQL
        away) it waits and runs again; any other failure of the batch as a whole runs its
        records one at a time. On shutdown or revocation the batch starts no more records:
        those done are written and committed, the rest are handed back."""
        items: list[tuple[ConsumerRecord[bytes, bytes], Event]] = []
        for record in records:
            with contextlib.suppress(DecodeError):  # a poison pill: dead-lettered alone below
                items.append((record, self._decode(record)))
        if not items:  # a batch of one is still one transaction instead of one per write
            return [await self._handle_record(record) for record in records]
        spans: dict[int, Span | None] = {}  # by offset: each record's span, however it ends
        try:
            return await self._run_batch(records, items, spans)
        finally:
            tracing.end(spans.values())

    async def _run_batch(
        self,
        records: list[ConsumerRecord[bytes, bytes]],
        items: list[tuple[ConsumerRecord[bytes, bytes], Event]],
        spans: dict[int, Span | None],
    ) -> list[Handled]:
        was_up = 0
        while True:
            try:
                with self.metrics.inflight(self.name):
                    tried = {t.record.offset: t for t in await self._try_batch(items, spans)}
                break
            except Exception as exc:
                action = decide(exc, 1, self.settings.retry)
                if isinstance(action, WaitForInfrastructure) and was_up < WAS_UP_LIMIT:
                    try:
                        waited = await self._wait_for(records[0], action.dependency, exc)
                    except _Released:
                        return [Handled.RELEASED] * len(records)
                    was_up = was_up + 1 if waited is Waited.WAS_UP else 0
                    continue
                log.warning(
                    "batch failed; handling its records one at a time",
                    stage=self.name,
                    records=len(records),
                    error_class=type(exc).__name__,
                    error=str(exc)[:MESSAGE_LIMIT],
                )
                return [
                    await self._handle_record(record, span=spans.get(record.offset))
                    for record in records
                ]
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(records))
        self.metrics.record_batch(self.name, len(records))
        published = await asyncio.gather(
            *(self._publish_tried(t) for t in tried.values()), return_exceptions=True
        )
        results = dict(zip(tried, published, strict=True))
        handled: list[Handled] = []
        decoded = {record.offset for record, _ in items}
        for record in records:
            t, result = tried.get(record.offset), results.get(record.offset)
            if handled and handled[-1] is not Handled.DONE:
                handled.append(Handled.RELEASED)  # after a held record: handed back
            elif t is None and record.offset in decoded:
                handled.append(Handled.RELEASED)  # not tried: the batch stopped before it
            elif isinstance(result, _Released):
                handled.append(Handled.RELEASED)
            elif isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            elif t is not None and t.outcome is not None and result is None:
                with (
                    self._bound(record),
                    structlog.contextvars.bound_contextvars(**self._ids(t.event)),
                    tracing.active(t.span),
                ):
                    self._finished(t.event, t.outcome, t.ctx, t.t0)
                handled.append(Handled.DONE)
            else:  # undecodable, or its try failed: alone, from that error
                error = t.error or result if t is not None else None
                assert error is None or isinstance(error, Exception)
                handled.append(await self._handle_record(record, error, spans.get(record.offset)))
        return handled

    async def _try_batch(
        self,
        items: list[tuple[ConsumerRecord[bytes, bytes], Event]],
        spans: dict[int, Span | None],
    ) -> list[_Tried]:
        """Each record's stage work and journey step in one transaction (see _handle_batch);
        a record's span is made at its first try and kept in `spans`."""
        assert self.batching is not None
        tried: list[_Tried] = []
        commit: Token[Any] | None = None
        try:
            async with self.batching() as scope:
                for record, event in items:
                    if tried and self._released(record):
                        break  # revoked or shutting down: what is done commits, the rest goes back
                    tried.append(self._tried(record, event, spans))
                    await self._try(tried[-1], scope)
                commit = tracing.batch_parent([t.span for t in tried])  # the commit's parent
        finally:
            tracing.detach(commit)
        return tried

    def _tried(
        self,
        record: ConsumerRecord[bytes, bytes],
        event: Event,
        spans: dict[int, Span | None],
    ) -> _Tried:
        if record.offset not in spans:
            spans[record.offset] = span = tracing.record_span(self.name, self.group_id, record)
            tracing.describe(span, event)
        return _Tried(
            record,
            event,
            self._context(record),
            datetime.now(UTC),
            time.perf_counter(),
            spans[record.offset],
        )

    async def _try(self, t: _Tried, scope: BatchScope) -> None:
        """A record's stage work in its savepoint of the batch, and its journey step."""
        record, event = t.record, t.event
        with (
            self._bound(record),
            structlog.contextvars.bound_contextvars(**self._ids(event)),
            tracing.active(t.span),
        ):
            try:
                async with scope.savepoint():
                    with self._call_context(event):
                        t.outcome = await self.handler(event, t.ctx)
            except Exception as exc:
                action = decide(exc, t.ctx.attempt, self.settings.retry)
                if isinstance(action, WaitForInfrastructure) and action.dependency == POSTGRES:
                    raise  # the batch's connection: the batch waits as a whole
                t.error = exc
                return
            if self.recorder is not None and isinstance(event, DocumentEvent):
                await self.recorder.step_done(
                    event, self.name, t.outcome, t.ctx, t.started, datetime.now(UTC)
                )

    async def _publish_tried(self, t: _Tried) -> None:
        """Publish a batch record's output (waiting for Kafka as long as it is away)."""
        if t.error is not None or t.outcome is None or t.outcome.output is None:
            return
        output = t.outcome.output
        with tracing.active(t.span):  # the output carries the record's span
            await self._steadily(t.record, lambda: self._publish(output))

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

    async def _carry_out(
        self,
        action: Action,
        record: ConsumerRecord[bytes, bytes],
        event: Event,
        exc: Exception,
        ctx: RecordContext,
        started: datetime,
        t0: float,
    ) -> Handled:
        """Do what the policy decided for a record whose handling failed."""
        elapsed = time.perf_counter() - t0
        if isinstance(action, Hold):
            self.metrics.record_handled(self.name, "waiting", elapsed)
            tracing.outcome("waiting", exc)
            log.info("waiting for budget", reason=str(exc))
            return Handled.HOLD
        if isinstance(action, Park):
            self.metrics.record_handled(self.name, "waiting", elapsed)
            tracing.outcome("waiting", exc)
            delay = action.delay_s
            await self._steadily(record, lambda: self._send_retry(record, exc, ctx.attempt, delay))
            log.info("parked: the call was not made", reason=str(exc), delay_s=delay)
            return Handled.DONE
        if isinstance(action, Retry):
            await self._record_failure(record, event, exc, ctx, started, final=False)
            nxt, delay = action.attempt, action.delay_s
            await self._steadily(record, lambda: self._send_retry(record, exc, nxt, delay))
            self.stats.retried += 1
            self.metrics.record_retry(self.name, type(exc).__name__)
            self.metrics.record_handled(self.name, "retried", elapsed)
            tracing.outcome("retried", exc)
            log.info("sent to retry", next_attempt=nxt, delay_s=round(delay, 3))
            return Handled.DONE
        assert isinstance(action, DeadLetter)
        # The failure is written before the record reaches the DLQ: the document's status
        # never lags behind a dead letter.
        await self._record_failure(record, event, exc, ctx, started, final=True)
        kind = action.kind
        await self._steadily(
            record, lambda: self._dead_letter(record, event, exc, ctx.attempt, kind=kind)
        )
        self.metrics.record_handled(self.name, "dead-lettered", elapsed)
        tracing.outcome("dead-lettered", exc)
        return Handled.DONE

    # -- waiting for our own dependencies ----------------------------------------------------

    def _released(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        tp = TopicPartition(record.topic, record.partition)
        return tp in self._stopping or (self._stop is not None and self._stop.is_set())

    async def _wait_for(
        self, record: ConsumerRecord[bytes, bytes], dependency: str, exc: BaseException
    ) -> Waited:
        """Hold `record` until `dependency` answers again; raise _Released when the partition
        is handed back meanwhile."""
        self.stats.held_for_infrastructure += 1
        log.warning(
            "dependency unavailable: record held, no attempt spent",
            dependency=dependency or "infrastructure",
            error_class=type(exc).__name__,
            error=str(exc)[:MESSAGE_LIMIT],
        )
        probe = self._probe_kafka if dependency == KAFKA else None
        waited = await self.watch.wait(dependency, exc, lambda: self._released(record), probe)
        if waited is Waited.ABANDONED:
            raise _Released
        return waited

    async def _probe_kafka(self) -> bool:
        """Does the broker answer a metadata request (through this runner's own producer)?"""
        if self.producer is None:
            return False
        return bool(await self.producer.client.force_metadata_update())

    async def _steadily(
        self,
        record: ConsumerRecord[bytes, bytes],
        write: Callable[[], Awaitable[T]],
        *,
        what: str | None = None,
    ) -> T | None:
        """Run a write that follows the record's handling (publish a copy, write the journey)
        until it gets through, waiting for our own dependencies as long as they are away.

        With `what` the write is best effort once the dependency answers: another error is
        logged and the record goes on (None). Without it, that error is raised."""
        was_up = 0
        while True:
            try:
                return await write()
            except Exception as exc:
                action = decide(exc, 1, self.settings.retry)
                if isinstance(action, WaitForInfrastructure) and was_up < WAS_UP_LIMIT:
                    waited = await self._wait_for(record, action.dependency, exc)
                    was_up = was_up + 1 if waited is Waited.WAS_UP else 0
                    continue
                if what is None:
                    raise
                log.error(f"could not write the {what}", error=str(exc)[:MESSAGE_LIMIT])
                return None

    async def _record_failure(
        self,
        record: ConsumerRecord[bytes, bytes],
        event: Event,
        exc: BaseException,
        ctx: RecordContext,
        started: datetime,
        *,
        final: bool,
    ) -> None:
        log.warning(
            "record failed" if final else "record will be retried",
            attempt=ctx.attempt,
            error_class=type(exc).__name__,
            error=str(exc)[:MESSAGE_LIMIT],
        )
        if self.recorder is None or not isinstance(event, DocumentEvent):
            return
        recorder = self.recorder
        await self._steadily(
            record,
            lambda: recorder.step_failed(
                event, self.name, exc, ctx, started, datetime.now(UTC), final=final
            ),
            what="failure",
        )

    # -- publishing --------------------------------------------------------------------------

    async def _send_retry(
        self, record: ConsumerRecord[bytes, bytes], exc: BaseException, attempt: int, delay: float
    ) -> None:
        headers = retry_headers(
            record,
            exc,
            stage=self.name,
            group=self.group_id,
            scrub=self.scrub,
            attempt=attempt,
            due_ms=_now_ms() + int(delay * 1000),
        )
        assert self.producer is not None
        await self.producer.send_and_wait(
            self.retry_topic, record.value, key=record.key, headers=tracing.inject(headers)
        )

    async def _dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        event: Event | None,
        exc: BaseException,
        attempt: int,
        *,
        kind: str,
    ) -> None:
        tenant, document = getattr(event, "tenant_id", None), getattr(event, "document_id", None)
        headers = dead_letter_headers(
            record,
            exc,
            stage=self.name,
            group=self.group_id,
            kind=kind,
            attempts=attempt,
            scrub=self.scrub,
            tenant=None if tenant is None else str(tenant),
            document=None if document is None else str(document),
        )
        assert self.producer is not None
        # Key and value exactly as they came: a poison pill stays the bytes it was.
        await self.producer.send_and_wait(
            self.topology.dlq, record.value, key=record.key, headers=tracing.inject(headers)
        )
        self.stats.dead_lettered += 1
        self.metrics.record_dead_letter(self.name, type(exc).__name__)
        log.error("dead-lettered", kind=kind, attempts=attempt, error_class=type(exc).__name__)

    async def _publish(self, event: Event) -> None:
        assert self.producer is not None and self.output_topic is not None
        key = event.document_id.encode() if isinstance(event, DocumentEvent) else None
        await self.producer.send_and_wait(
            self.output_topic,
            self.codec.encode(event),
            key=key,
            headers=tracing.inject(self.codec.headers_for(event)),
        )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish the records in hand and commit them before giving partitions away."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        runner = self.runner
        await runner._drain(runner.settings.kafka.shutdown_grace_s, only=set(revoked))
        await runner.commit_pending()
        for tp in revoked:
            self.runner._waiting.pop(tp, None)
        self.runner.assignment -= set(revoked)
        runner.metrics.drop_lag(runner.name, revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self.runner.consumer
        if self.runner.blocked and consumer is not None and assigned:
            consumer.pause(*assigned)  # a paused consumer takes over partitions paused
        self.runner.assignment = set(assigned)
        self.runner.joined = True
        self.runner.metrics.set_member(self.runner.name, len(assigned))
        log.info(
            "partitions assigned",
            stage=self.runner.name,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )
        self.runner.assigned.set()
