"""What the consumer runtime's parts share: the stage handler and journey ports, how a
record's handling ended, a record's try in a micro-batch, the runner's counters."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Final, Protocol, TypeVar

from aiokafka import ConsumerRecord
from opentelemetry.trace import Span

from consumers.stage import Outcome, RecordContext
from ragstream.events import DocumentEvent, Event

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
