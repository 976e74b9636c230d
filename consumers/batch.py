"""A stage runner's micro-batches: records of distinct documents in one transaction (a
savepoint each), outputs flushed together; a record whose try failed is handled alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import Token
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import ConsumerRecord
from opentelemetry.trace import Span

from consumers.handling import (
    WAS_UP_LIMIT,
    BatchScope,
    Handled,
    _Released,
    _Tried,
)
from consumers.infrastructure import Waited
from consumers.policy import (
    WaitForInfrastructure,
    decide,
)
from ragstream import tracing
from ragstream.errors import POSTGRES, DecodeError
from ragstream.events import DocumentEvent, Event
from ragstream.headers import (
    MESSAGE_LIMIT,
)

if TYPE_CHECKING:
    from consumers.runtime import StageRunner

log = structlog.get_logger("consumers.runtime")  # one logger for the runtime's lines


class MicroBatches:
    """A stage runner's micro-batches: records of distinct documents in one transaction (a (a part of StageRunner)."""

    async def _handle_batch(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, records: list[ConsumerRecord[bytes, bytes]]
    ) -> list[Handled]:
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
        stop_ahead = self.ahead([event for _, event in items]) if self.ahead else None
        spans: dict[int, Span | None] = {}  # by offset: each record's span, however it ends
        try:
            return await self._run_batch(records, items, spans)
        finally:
            tracing.end(spans.values())
            if stop_ahead is not None:
                stop_ahead()

    async def _run_batch(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
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

    async def _try_batch(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
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

    def _tried(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
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

    async def _try(self: StageRunner, t: _Tried, scope: BatchScope) -> None:  # type: ignore[misc]  # a part of StageRunner
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

    async def _publish_tried(self: StageRunner, t: _Tried) -> None:  # type: ignore[misc]  # a part of StageRunner
        """Publish a batch record's output (waiting for Kafka as long as it is away)."""
        if t.error is not None or t.outcome is None or t.outcome.output is None:
            return
        output = t.outcome.output
        with tracing.active(t.span):  # the output carries the record's span
            await self._steadily(t.record, lambda: self._publish(output))
