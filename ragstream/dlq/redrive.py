"""Redrive: dead letters back to their original topic, each DLQ position at most once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ragstream.codec import Codec
from ragstream.dlq.read import DeadLetters
from ragstream.dlq.records import DlqFilter, DlqRecord, is_poison
from ragstream.errors import RagstreamError, RetryableError
from ragstream.headers import redrive_headers
from ragstream.kafkaio import (
    started_producer,
)
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store._dlq import RedriveMark
from ragstream.topology import (
    H_ERR_TOPIC,
)

# -- redrive -----------------------------------------------------------------------------------

SKIP_REDRIVEN = "already redriven"
SKIP_POISON = "poison (undecodable; --include-poison sends it)"

Progress = Callable[[int, int], None]  # (sent so far, to send)


@dataclass
class RedriveReport:
    dlq_topic: str
    dry_run: bool
    selected: list[DlqRecord] = field(default_factory=list)  # what moves (or would)
    skipped: Counter[str] = field(default_factory=Counter)  # reason → count
    unroutable: list[tuple[DlqRecord, str]] = field(default_factory=list)  # cannot be sent
    sent: int = 0


async def redrive(
    settings: Settings,
    flt: DlqFilter | None = None,
    *,
    include_poison: bool = False,
    dry_run: bool = False,
    codec: Codec | None = None,
    on_progress: Progress | None = None,
    batch_size: int = 200,
) -> RedriveReport:
    """Send the records `flt` takes back to their original topics, each at most once."""
    codec = codec or Codec()
    async with DeadLetters(settings) as dlq:
        report = RedriveReport(dlq.topic, dry_run)
        if dlq.total == 0:
            return report
        async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2) as store:
            await store.migrate()
            lock: AbstractAsyncContextManager[None] = (
                nullcontext() if dry_run else store.redrive_lock(dlq.topic)
            )
            async with lock:
                done = await store.redriven_positions(dlq.topic)
                async for record in dlq.scan(flt):
                    origin = record.origin_topic
                    if (record.partition, record.offset) in done:
                        report.skipped[SKIP_REDRIVEN] += 1
                    elif not include_poison and is_poison(record, codec):
                        report.skipped[SKIP_POISON] += 1
                    elif origin is None:
                        report.unroutable.append((record, f"no {H_ERR_TOPIC} header"))
                    elif origin not in dlq.topics:
                        report.unroutable.append((record, f"topic {origin} does not exist"))
                    else:
                        report.selected.append(record)
                # DLQ order: one document's records share a DLQ partition, so they go back in
                # the order they failed.
                report.selected.sort(key=lambda r: (r.partition, r.offset))
                if not dry_run and report.selected:
                    await _send(settings, store, report, on_progress, batch_size)
    return report


async def _send(
    settings: Settings,
    store: Store,
    report: RedriveReport,
    on_progress: Progress | None,
    batch_size: int,
) -> None:
    total = len(report.selected)
    producer: Any = await started_producer(settings, linger_ms=5)
    try:
        for start in range(0, total, batch_size):
            batch = report.selected[start : start + batch_size]
            results = await asyncio.gather(
                *(_produce(producer, r) for r in batch), return_exceptions=True
            )
            marks = [
                _mark(r, meta) for r, meta in zip(batch, results, strict=True) if not _failed(meta)
            ]
            try:
                await store.mark_redriven(report.dlq_topic, marks)
            except RagstreamError as exc:
                raise RetryableError(
                    f"{len(marks)} record(s) were sent but could not be recorded as redriven "
                    f"({exc}); a later redrive sends them again, which the idempotent stages "
                    "absorb"
                ) from exc
            report.sent += len(marks)
            if on_progress is not None:
                on_progress(report.sent, total)
            failed = [(r, e) for r, e in zip(batch, results, strict=True) if _failed(e)]
            if failed:
                record, error = failed[0]
                if not isinstance(error, Exception):  # cancellation, interrupt: as they are
                    raise error
                raise RetryableError(
                    f"redrive stopped at {record.position}: {type(error).__name__}: {error}; "
                    f"{report.sent} of {total} record(s) were sent; run it again for the rest"
                ) from error
    finally:
        await producer.stop()


def _failed(result: object) -> bool:
    return isinstance(result, BaseException)


async def _produce(producer: Any, record: DlqRecord) -> Any:
    """Send one copy and wait for the broker's acknowledgement (its RecordMetadata)."""
    future = await producer.send(
        record.origin_topic,
        record.value,
        key=record.key,
        headers=redrive_headers(record.headers, record.position),
    )
    return await future


def _mark(record: DlqRecord, meta: Any) -> RedriveMark:
    return RedriveMark(
        dlq_partition=record.partition,
        dlq_offset=record.offset,
        target_topic=meta.topic,
        target_partition=meta.partition,
        target_offset=meta.offset,
        stage=record.stage,
        error_class=record.error_class,
        document_id=record.document,
        tenant_id=record.tenant,
    )
