"""Carrying out what the failure policy decided for a record (hold, park, retry, dead-letter),
waiting for our own dependencies meanwhile, and the copies that leave the runner: outputs,
retry copies and dead letters.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from aiokafka import ConsumerRecord, TopicPartition

from consumers.handling import (
    WAS_UP_LIMIT,
    Handled,
    T,
    _now_ms,
    _Released,
)
from consumers.infrastructure import Waited
from consumers.policy import (
    Action,
    DeadLetter,
    Hold,
    Park,
    Retry,
    WaitForInfrastructure,
    decide,
)
from consumers.stage import RecordContext
from ragstream import tracing
from ragstream.errors import KAFKA
from ragstream.events import DocumentEvent, Event
from ragstream.headers import (
    MESSAGE_LIMIT,
    dead_letter_headers,
    retry_headers,
)

if TYPE_CHECKING:
    from consumers.runtime import StageRunner

log = structlog.get_logger("consumers.runtime")  # one logger for the runtime's lines


class Failures:
    """Carrying out what the failure policy decided for a record (hold, park, retry, dead-letter), (a part of StageRunner)."""

    async def _carry_out(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
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

    def _released(self: StageRunner, record: ConsumerRecord[bytes, bytes]) -> bool:  # type: ignore[misc]  # a part of StageRunner
        tp = TopicPartition(record.topic, record.partition)
        return tp in self._stopping or (self._stop is not None and self._stop.is_set())

    async def _wait_for(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, record: ConsumerRecord[bytes, bytes], dependency: str, exc: BaseException
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

    async def _probe_kafka(self: StageRunner) -> bool:  # type: ignore[misc]  # a part of StageRunner
        """Does the broker answer a metadata request (through this runner's own producer)?"""
        if self.producer is None:
            return False
        return bool(await self.producer.client.force_metadata_update())

    async def _steadily(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
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

    async def _record_failure(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
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

    async def _send_retry(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
        record: ConsumerRecord[bytes, bytes],
        exc: BaseException,
        attempt: int,
        delay: float,
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

    async def _dead_letter(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
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

    async def _publish(self: StageRunner, event: Event) -> None:  # type: ignore[misc]  # a part of StageRunner
        assert self.producer is not None and self.output_topic is not None
        key = event.document_id.encode() if isinstance(event, DocumentEvent) else None
        await self.producer.send_and_wait(
            self.output_topic,
            self.codec.encode(event),
            key=key,
            headers=tracing.inject(self.codec.headers_for(event)),
        )
