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

Failures are read here and only here (see ragstream.errors):
- RetryableError (and any unexpected exception): the record goes to `<prefix>.retry.<stage>`
  with its next attempt number and the time it becomes due (exponential backoff with jitter);
  the input offset is committed, so the partition it came from goes on at once. The same
  consumer reads the retry topic and pauses a retry partition until its head record is due.
  When attempts are used up, the record goes to the dead-letter topic.
- PermanentError: to the dead-letter topic at once.
- DecodeError (a poison pill): to the dead-letter topic with its bytes untouched.
- CircuitOpenError (the call was not made): the record waits on the retry topic until the
  circuit lets a probe through, its attempt number unchanged, so an outage does not use up
  attempts.
- BudgetExceeded is not a failure: the record waits in Kafka. Service-wide, its partition is
  held at that record (uncommitted, paused) and tried again every few seconds; for a tenant's
  own budget, the record is parked on the retry topic until the tenant's window ends, with its
  attempt number unchanged, so other tenants on the partition go on.

Budget gate: while `gate()` names a reason (the stage's paid service is THROTTLED in real
mode), every assigned partition is paused; the consumer keeps polling, so the group does not
rebalance, nothing is lost and lag grows. When the gate opens, the partitions resume.
A dead-letter record keeps the original key, value and headers and adds `ragstream.errors.*`
headers saying where it came from and why.
"""

from __future__ import annotations

import asyncio
import random
import time
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
from ragstream.cost.meter import CallContext, current_call
from ragstream.dlq import MESSAGE_LIMIT, dead_letter_headers, failure_headers, header
from ragstream.errors import BudgetExceeded, DecodeError, PermanentError
from ragstream.events import DocumentEmbedded, DocumentEvent, Event
from ragstream.metrics import Metrics, observe_lag
from ragstream.providers.circuit import CircuitOpenError
from ragstream.settings import RetrySettings, Settings
from ragstream.topology import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DUE_AT,
    H_ERR_DOCUMENT,
    H_ERR_TENANT,
    H_REPLAY,
    Stage,
    Topology,
)

log = structlog.get_logger(__name__)

StageHandler = Callable[[Event, RecordContext], Awaitable[Outcome]]


class StepRecorder(Protocol):
    """Where each record's handling is written down (the document's journey)."""

    async def step_done(
        self,
        event: DocumentEvent,
        stage: Stage,
        outcome: Outcome,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
    ) -> None: ...

    async def step_failed(
        self,
        event: DocumentEvent,
        stage: Stage,
        error: BaseException,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
        *,
        final: bool,
    ) -> None: ...


def backoff_delay(attempt: int, policy: RetrySettings, rng: random.Random | None = None) -> float:
    """Delay before `attempt + 1`: uniform(d/2, d) with d = min(cap, base * factor**(attempt-1))."""
    ceiling = min(policy.cap_s, policy.base_s * policy.factor ** max(attempt - 1, 0))
    return (rng or random).uniform(ceiling / 2, ceiling)


WAIT_RECHECK_S = 2.0  # how soon a record that was refused without a call is tried again


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RunnerStats:
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
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
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        gate: Callable[[], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.handler = handler
        self.codec = codec
        self.recorder = recorder
        self.concurrency = max(1, concurrency)
        self.metrics = metrics or Metrics(process_metrics=False)
        self.joined = False  # holds group membership (readiness), with or without partitions
        self.topology = Topology(settings.kafka.topic_prefix)
        self.group_id = self.topology.group(stage)
        self.input_topic = self.topology.input_topic(stage)
        self.retry_topic = self.topology.retry(stage)
        self.stats = RunnerStats()
        self._rng = rng or random.Random()
        self._pending: dict[TopicPartition, int] = {}
        self._waiting: dict[TopicPartition, int] = {}  # paused retry partition -> due (ms)
        self._commit_lock = asyncio.Lock()
        self._inflight: dict[TopicPartition, asyncio.Task[None]] = {}
        self._stopping: set[TopicPartition] = set()  # finishing what is in hand, nothing more
        self._gate = asyncio.Semaphore(self.concurrency)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.assigned = asyncio.Event()
        self.assignment: set[TopicPartition] = set()
        self.gate = gate  # a reason while the stage must not call its paid service
        self.blocked: str | None = None

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
        self.consumer.subscribe([self.input_topic, self.retry_topic], listener=_Listener(self))
        await self.producer.start()
        try:
            await self.consumer.start()
            log.info("stage started", stage=self.stage.value, group=self.group_id)
            while not stop.is_set():
                self._apply_gate()
                timeout_ms = self._resume_due()
                if self._inflight:
                    timeout_ms = min(timeout_ms, 50)
                batch = await self.consumer.getmany(timeout_ms=timeout_ms)
                for tp, records in batch.items():
                    self._dispatch(tp, records)
                await self._reap()
                await self.commit_pending()
                await observe_lag(self.metrics, self.stage.value, self.consumer)
        finally:
            await self._drain(self.settings.kafka.shutdown_grace_s)
            await self.commit_pending()
            # Leaving the group at once (LeaveGroup), so a restart hands partitions over fast.
            await self.consumer.stop()
            await self.producer.stop()
            self.joined = False
            self.metrics.stage_stopped(self.stage.value)
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

    def _apply_gate(self) -> None:
        """Pause every assigned partition while the gate is closed; resume when it opens."""
        assert self.consumer is not None
        reason = self.gate() if self.gate is not None else None
        was, self.blocked = self.blocked, reason
        if bool(reason) == bool(was):
            return
        if reason:
            log.warning("stage paused by its budget", stage=self.stage.value, reason=reason)
            self.consumer.pause(*self.consumer.assignment())
        else:
            log.info("stage resumed: budget open", stage=self.stage.value)
            for tp in self.consumer.assignment():
                self._resume(tp)
        self.metrics.set_stage_paused(self.stage.value, bool(reason))

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
                for record in records:
                    if tp in self._stopping:
                        return  # revoked or shutting down: the rest go back uncommitted
                    if tp.topic == self.retry_topic and self._not_yet_due(tp, record):
                        return
                    if not await self._handle_record(record):
                        self._hold(tp, record)
                        return
                    self._pending[tp] = record.offset + 1
            return
        await self._run_by_key(tp, records)

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
                    if not await self._handle_record(record):
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
            task.result()  # a failure here is a bug or lost infrastructure: stop the worker
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
        due = int((header(record.headers, H_DUE_AT) or b"0").decode() or 0)
        if due <= _now_ms():
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
        self._waiting[tp] = _now_ms() + int(WAIT_RECHECK_S * 1000)

    async def _handle_record(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Handle one record; False when the budget refused it and it must wait in place."""
        with self.metrics.inflight(self.stage.value):
            return await self._handle_one(record)

    async def _handle_one(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        corr = (header(record.headers, H_CORRELATION_ID) or b"").decode(errors="replace") or None
        with structlog.contextvars.bound_contextvars(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=self.stage.value,
            correlation_id=corr,
        ):
            try:
                event = self.codec.decode(record.value or b"")
                if not isinstance(event, DocumentEvent):
                    raise DecodeError(f"{type(event).__name__} is not a document event")
            except DecodeError as exc:
                self.stats.poison += 1
                log.error("undecodable record dead-lettered", error=str(exc))
                await self._dead_letter(record, None, exc, attempt=1, kind="poison")
                self.metrics.record_handled(self.stage.value, "poison", 0.0)
                return True
            with structlog.contextvars.bound_contextvars(
                document_id=event.document_id,
                tenant_id=event.tenant_id,
                correlation_id=event.correlation_id,
            ):
                return await self._attempt(record, event)

    async def _attempt(self, record: ConsumerRecord[bytes, bytes], event: DocumentEvent) -> bool:
        attempt = int((header(record.headers, H_ATTEMPT) or b"1").decode() or 1)
        ctx = RecordContext(
            record.topic,
            record.partition,
            record.offset,
            attempt,
            replay=header(record.headers, H_REPLAY) is not None,
        )
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        token = current_call.set(
            CallContext(
                stage=self.stage.value,
                document_id=event.document_id,
                tenant_id=event.tenant_id,
                correlation_id=event.correlation_id,
            )
        )
        try:
            outcome = await self.handler(event, ctx)
            if outcome.output is not None:
                await self._publish(outcome.output)
            await self.recorder.step_done(
                event, self.stage, outcome, ctx, started, datetime.now(UTC)
            )
        except BudgetExceeded as exc:
            self.metrics.record_handled(self.stage.value, "waiting", time.perf_counter() - t0)
            if exc.tenant_id is None:
                log.info("waiting for budget", service=exc.service, reason=str(exc))
                return False
            await self._park(record, exc, attempt, exc.retry_after)
            log.info("parked until the tenant's budget allows", tenant_id=exc.tenant_id)
            return True
        except CircuitOpenError as exc:
            # The service was not called: waiting for it to come back spends no attempt.
            self.metrics.record_handled(self.stage.value, "waiting", time.perf_counter() - t0)
            await self._park(record, exc, attempt, exc.retry_after)
            log.info("parked until the circuit lets calls through", circuit=exc.name)
            return True
        except PermanentError as exc:
            await self._record_failure(event, exc, ctx, started, final=True)
            await self._dead_letter(record, event, exc, attempt, kind="permanent")
            self.metrics.record_handled(self.stage.value, "dead-lettered", time.perf_counter() - t0)
            return True
        except Exception as exc:  # retryable, or unexpected: retried, then dead-lettered
            final = attempt >= self.settings.retry.max_attempts
            await self._record_failure(event, exc, ctx, started, final=final)
            if final:
                await self._dead_letter(record, event, exc, attempt, kind="exhausted")
                self.metrics.record_handled(
                    self.stage.value, "dead-lettered", time.perf_counter() - t0
                )
            else:
                await self._retry(record, exc, attempt)
                self.metrics.record_handled(self.stage.value, "retried", time.perf_counter() - t0)
            return True
        finally:
            current_call.reset(token)
        seconds = time.perf_counter() - t0
        self.stats.processed += 1
        self.stats.by_partition[record.partition] = (
            self.stats.by_partition.get(record.partition, 0) + 1
        )
        self.metrics.record_handled(self.stage.value, outcome.status, seconds)
        if isinstance(outcome.output, DocumentEmbedded):
            self.metrics.record_embedded(outcome.output)
        log.info(
            "record handled",
            outcome=outcome.status,
            attempt=attempt,
            duration_ms=round(seconds * 1000, 1),
        )
        return True

    async def _record_failure(
        self,
        event: DocumentEvent,
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
        try:
            await self.recorder.step_failed(
                event, self.stage, exc, ctx, started, datetime.now(UTC), final=final
            )
        except Exception as rec_exc:  # the journey is best effort; the record still moves on
            log.error("could not record the failure", error=str(rec_exc))

    async def _park(
        self,
        record: ConsumerRecord[bytes, bytes],
        exc: Exception,
        attempt: int,
        delay: float | None,
    ) -> None:
        """Wait on the retry topic without spending an attempt: the call was never made (a
        tenant over its own budget, until its window ends; an open circuit, until it lets a
        probe through)."""
        await self._send_retry(record, exc, attempt, max(delay or 0.0, WAIT_RECHECK_S))

    async def _retry(
        self, record: ConsumerRecord[bytes, bytes], exc: BaseException, attempt: int
    ) -> None:
        retry_after = getattr(exc, "retry_after", None)
        delay = max(retry_after or 0.0, backoff_delay(attempt, self.settings.retry, self._rng))
        await self._send_retry(record, exc, attempt + 1, delay)
        self.stats.retried += 1
        self.metrics.record_retry(self.stage.value, type(exc).__name__)
        log.info("sent to retry", next_attempt=attempt + 1, delay_s=round(delay, 3))

    async def _send_retry(
        self, record: ConsumerRecord[bytes, bytes], exc: BaseException, attempt: int, delay: float
    ) -> None:
        headers = [
            *failure_headers(record, exc, stage=self.stage.value, group=self.group_id),
            (H_ATTEMPT, str(attempt).encode()),
            (H_DUE_AT, str(_now_ms() + int(delay * 1000)).encode()),
        ]
        assert self.producer is not None
        await self.producer.send_and_wait(
            self.retry_topic, record.value, key=record.key, headers=headers
        )

    async def _dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        event: DocumentEvent | None,
        exc: BaseException,
        attempt: int,
        *,
        kind: str,
    ) -> None:
        headers = dead_letter_headers(
            record, exc, stage=self.stage.value, group=self.group_id, kind=kind, attempts=attempt
        )
        if event is not None:
            headers += [
                (H_ERR_TENANT, event.tenant_id.encode()),
                (H_ERR_DOCUMENT, event.document_id.encode()),
            ]
        assert self.producer is not None
        # Key and value exactly as they came: a poison pill stays the bytes it was.
        await self.producer.send_and_wait(
            self.topology.dlq, record.value, key=record.key, headers=headers
        )
        self.stats.dead_lettered += 1
        self.metrics.record_dead_letter(self.stage.value, type(exc).__name__)
        log.error("dead-lettered", kind=kind, attempts=attempt, error_class=type(exc).__name__)

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
        runner = self.runner
        await runner._drain(runner.settings.kafka.shutdown_grace_s, only=set(revoked))
        await runner.commit_pending()
        for tp in revoked:
            self.runner._waiting.pop(tp, None)
        self.runner.assignment -= set(revoked)
        runner.metrics.drop_lag(runner.stage.value, revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self.runner.consumer
        if self.runner.blocked and consumer is not None and assigned:
            consumer.pause(*assigned)  # a paused stage takes over partitions paused
        self.runner.assignment = set(assigned)
        self.runner.joined = True
        self.runner.metrics.set_member(self.runner.stage.value, len(assigned))
        log.info(
            "partitions assigned",
            stage=self.runner.stage.value,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )
        self.runner.assigned.set()
