"""The dead-letter topic, for operators: list, show, count, redrive and purge its records.

    records = await list_records(settings, DlqFilter.build(stages=["parse"], since="2h"))
    shown = await show_record(settings, 0, 42)            # headers + decoded payload
    stats = await dlq_stats(settings)
    report = await redrive(settings, DlqFilter(), dry_run=True)
    plan = await plan_purge(settings, before=parse_time("7d"))
    await purge(settings, plan)

Every read uses a plain consumer (no group: `assign()`, nothing committed) from each partition's
first record up to the end offsets captured when it starts, so it terminates while workers keep
dead-lettering. A DLQ record is what `consumers.runtime` (or the cost accountant) wrote, with
the headers `dead_letter_headers` builds: the original key and value bytes and headers, plus
`ragstream.errors.*` headers saying where it came from and why.

Redrive sends a record back to its original topic (`ragstream.errors.topic`) with its original
key, value and headers (without `ragstream.errors.*` and retry bookkeeping), plus
`ragstream.redrive.of: <dlq partition>:<dlq offset>`. It is idempotent: the producer is
idempotent with acks=all, and once the broker has acknowledged a copy the DLQ position is
recorded in PostgreSQL (`dlq_redrives`, ON CONFLICT DO NOTHING); positions recorded there are
never sent again, and an advisory lock keeps two redrives of one DLQ apart. If recording fails
after the acknowledgement, the next run sends those records once more: the stages are
idempotent (upserts keyed by document and content), so a second copy changes nothing.

Operator input that cannot be used raises `InvalidInput` (a ConfigError: exit code 2 on the
CLI); Kafka's errors come out as RetryableError.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import RecordsToDelete

from ragstream.admin import admin_client
from ragstream.codec import Codec
from ragstream.errors import ConfigError, PermanentError, RagstreamError, RetryableError
from ragstream.events import Event
from ragstream.headers import last_text, redrive_headers
from ragstream.kafkaio import (
    Extent,
    extents,
    group_less_consumer,
    kafka_errors,
    offsets_at,
    read_to_end,
    started_producer,
)
from ragstream.scrub import Scrubber
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store._dlq import RedriveMark
from ragstream.topology import (
    H_CORRELATION_ID,
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_DOCUMENT,
    H_ERR_KIND,
    H_ERR_MESSAGE,
    H_ERR_OFFSET,
    H_ERR_PARTITION,
    H_ERR_PREFIX,
    H_ERR_STAGE,
    H_ERR_TENANT,
    H_ERR_TOPIC,
    H_EVENT_TYPE,
    Stage,
    Topology,
)

POISON = "poison"


class InvalidInput(ConfigError):
    """An operator's argument cannot be used (unknown stage, malformed time or position, a
    partition or offset the DLQ does not have). The message names the option."""


# -- operator input ----------------------------------------------------------------------------

_AGE = re.compile(r"(?:\d+[smhdw])+")
_AGE_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
POSITION = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_time(text: str, *, option: str = "time", now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC) or an age before `now`: `30m`, `2h`, `7d`, `1h30m`."""
    value = text.strip().lower()
    if _AGE.fullmatch(value):
        delta = timedelta()
        for amount, unit in _AGE_PART.findall(value):
            delta += timedelta(**{_UNITS[unit]: int(amount)})
        return (now or datetime.now(UTC)) - delta
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"{option} {text!r}: expected an ISO 8601 time (2025-05-01T12:00:00Z) or an age "
            "like 30m, 2h, 7d"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def parse_stage(text: str, *, option: str = "--stage") -> Stage:
    try:
        return Stage(text.strip().lower())
    except ValueError:
        choices = ", ".join(s.value for s in Stage)
        raise InvalidInput(f"{option} {text!r}: unknown stage; choose one of {choices}") from None


def parse_position(text: str, *, option: str = "position") -> tuple[int, int]:
    """`PARTITION:OFFSET` → (partition, offset)."""
    match = POSITION.fullmatch(text)
    if match is None:
        raise InvalidInput(f"{option} {text!r}: expected PARTITION:OFFSET, for example 0:42")
    return int(match[1]), int(match[2])


def parse_positions(text: str, *, option: str = "--up-to") -> dict[int, int]:
    """`P:O[,P:O...]` → {partition: offset}, each partition at most once."""
    out: dict[int, int] = {}
    for item in text.split(","):
        match = POSITION.fullmatch(item)
        if match is None:
            raise InvalidInput(
                f"{option} {text!r}: expected PARTITION:OFFSET[,PARTITION:OFFSET...], "
                "for example 0:42,1:7"
            )
        partition, offset = int(match[1]), int(match[2])
        if partition in out:
            raise InvalidInput(f"{option} {text!r}: partition {partition} is given twice")
        out[partition] = offset
    return out


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def format_ms(ms: int | None) -> str:
    """Epoch milliseconds as a UTC ISO time (seconds), or '' for None."""
    if ms is None:
        return ""
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


# -- records and filters -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """One record of the DLQ topic, as it is on the broker."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_consumer(cls, record: Any, scrub: Scrubber | None = None) -> DlqRecord:
        """The record as read; with `scrub`, its error headers scrubbed of secrets (a dead
        letter written by an older version, or by another system, may hold one)."""
        headers = tuple((k, bytes(v or b"")) for k, v in record.headers or ())
        if scrub is not None:
            headers = tuple(
                (k, scrub.bytes(v) if k.startswith(H_ERR_PREFIX) else v) for k, v in headers
            )
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=headers,
        )

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, key: str) -> str | None:
        """A header's value as text (the last one if repeated), or None."""
        return last_text(self.headers, key)

    @property
    def stage(self) -> str | None:
        return self.header(H_ERR_STAGE)

    @property
    def error_class(self) -> str | None:
        return self.header(H_ERR_CLASS)

    @property
    def kind(self) -> str | None:
        return self.header(H_ERR_KIND)

    @property
    def message(self) -> str:
        return self.header(H_ERR_MESSAGE) or ""

    @property
    def tenant(self) -> str | None:
        return self.header(H_ERR_TENANT)

    @property
    def document(self) -> str | None:
        return self.header(H_ERR_DOCUMENT)

    @property
    def origin_topic(self) -> str | None:
        return self.header(H_ERR_TOPIC) or None

    @property
    def attempts(self) -> int | None:
        text = self.header(H_ERR_ATTEMPTS)
        return int(text) if text and text.isdigit() else None

    def summary(self) -> dict[str, Any]:
        """What `list --json` prints for the record."""
        origin = None
        if self.origin_topic:
            origin = (
                f"{self.origin_topic}:{self.header(H_ERR_PARTITION)}:{self.header(H_ERR_OFFSET)}"
            )
        return {
            "position": self.position,
            "partition": self.partition,
            "offset": self.offset,
            "time": format_ms(self.timestamp_ms),
            "stage": self.stage,
            "error_class": self.error_class,
            "kind": self.kind,
            "attempts": self.attempts,
            "tenant": self.tenant,
            "document": self.document,
            "event_type": self.header(H_EVENT_TYPE),
            "correlation_id": self.header(H_CORRELATION_ID),
            "origin": origin,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which DLQ records an operation takes; an empty field takes all. Times are epoch ms of the
    DLQ record: since inclusive, until exclusive."""

    stages: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()  # compared case-insensitively
    tenants: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    @classmethod
    def build(
        cls,
        *,
        stages: Iterable[str] = (),
        error_classes: Iterable[str] = (),
        tenants: Iterable[str] = (),
        since: str | None = None,
        until: str | None = None,
        now: datetime | None = None,
    ) -> DlqFilter:
        """A filter from operator text; InvalidInput names the option that cannot be used."""
        now = now or datetime.now(UTC)
        since_ms = epoch_ms(parse_time(since, option="--since", now=now)) if since else None
        until_ms = epoch_ms(parse_time(until, option="--until", now=now)) if until else None
        if since_ms is not None and until_ms is not None and since_ms >= until_ms:
            raise InvalidInput(f"--since {since!r} is not before --until {until!r}")
        return cls(
            stages=frozenset(parse_stage(s).value for s in stages),
            error_classes=frozenset(c.strip().lower() for c in error_classes if c.strip()),
            tenants=frozenset(t for t in tenants if t),
            since_ms=since_ms,
            until_ms=until_ms,
        )

    def matches(self, record: DlqRecord) -> bool:
        if self.stages and record.stage not in self.stages:
            return False
        if self.error_classes and (record.error_class or "").lower() not in self.error_classes:
            return False
        if self.tenants and record.tenant not in self.tenants:
            return False
        if self.since_ms is not None and record.timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or record.timestamp_ms < self.until_ms


def is_poison(record: DlqRecord, codec: Codec) -> bool:
    """Dead-lettered as undecodable, or bytes that do not decode now."""
    return record.kind == POISON or decode_value(record, codec)[0] is None


def decode_value(record: DlqRecord, codec: Codec) -> tuple[Event | None, str | None]:
    """(event, None) when the value decodes, else (None, why not)."""
    if record.value is None:
        return None, "no value (null)"
    try:
        return codec.decode(record.value), None
    except PermanentError as exc:  # DecodeError, or a record that builds no event
        return None, str(exc)


# -- reading the topic -------------------------------------------------------------------------


class DeadLetters:
    """The DLQ topic, read with a plain consumer. `async with DeadLetters(settings) as dlq:`;
    `dlq.extents` is captured on entry and bounds every read."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = Topology(settings.kafka.topic_prefix).dlq
        self.extents: dict[int, Extent] = {}
        self.topics: set[str] = set()
        self._stall_s = settings.kafka.request_timeout_ms / 1000
        self._consumer: Any = None
        self._stack = AsyncExitStack()
        self.scrub = Scrubber.from_settings(settings)

    async def __aenter__(self) -> DeadLetters:
        bootstrap = self.settings.kafka.bootstrap_servers
        async with admin_client(self.settings) as admin:  # unreachable: RetryableError
            with kafka_errors(f"describing {self.topic}"):
                self.topics = set(await admin.list_topics())
                if self.topic not in self.topics:
                    raise ConfigError(
                        f"kafka.topic_prefix: there is no DLQ topic {self.topic!r} on {bootstrap}"
                        " (run `ragstream topics create`, or check the prefix)"
                    )
                (described,) = await admin.describe_topics([self.topic])
        partitions = sorted(p["partition"] for p in described["partitions"])
        async with AsyncExitStack() as stack:
            self._consumer = await stack.enter_async_context(group_less_consumer(self.settings))
            self.extents = await extents(self._consumer, self.topic, partitions)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    @property
    def total(self) -> int:
        """Records between the first offsets and the ends (the DLQ is never compacted)."""
        return sum(e.count for e in self.extents.values())

    async def first_offsets_at(self, moment_ms: int) -> dict[int, int]:
        """Per partition, the first offset whose record is at or after `moment_ms` (its end when
        there is none)."""
        return await offsets_at(self._consumer, self.topic, self.extents, moment_ms)

    async def scan(self, flt: DlqFilter | None = None) -> AsyncIterator[DlqRecord]:
        """Every record up to the captured ends that `flt` takes, partition by partition in
        offset order (partitions interleaved)."""
        flt = flt or DlqFilter()
        starts = {p: e.low for p, e in self.extents.items()}
        if flt.since_ms is not None:
            starts = await self.first_offsets_at(flt.since_ms)
        ranges = {
            TopicPartition(self.topic, p): Extent(start, self.extents[p].end)
            for p, start in starts.items()
            if start < self.extents[p].end
        }
        if not ranges:
            return
        self._consumer.assign(list(ranges))
        async for batch in read_to_end(self._consumer, ranges, self._stall_s):
            for record in batch:
                dead = DlqRecord.from_consumer(record, self.scrub)
                if flt.matches(dead):
                    yield dead

    async def get(self, partition: int, offset: int) -> DlqRecord:
        """The record at `partition:offset`; InvalidInput when the DLQ does not hold it."""
        where = f"{partition}:{offset}"
        extent = self.extents.get(partition)
        if extent is None:
            raise InvalidInput(
                f"{where}: {self.topic} has partitions 0..{len(self.extents) - 1}, not {partition}"
            )
        if not extent.low <= offset < extent.end:
            held = (
                f"offsets {extent.low}..{extent.end - 1}"
                if extent.count
                else "no records (the partition is empty)"
            )
            raise InvalidInput(f"no record at {where}: partition {partition} holds {held}")
        async for record in self._read_from(partition, offset):
            if record.offset == offset:
                return record
            break
        raise InvalidInput(f"no record at {where}")

    async def _read_from(self, partition: int, offset: int) -> AsyncIterator[DlqRecord]:
        tp = TopicPartition(self.topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        deadline = time.monotonic() + self._stall_s
        while time.monotonic() < deadline:
            with kafka_errors(f"reading {self.topic}"):
                batch = await self._consumer.getmany(tp, timeout_ms=500, max_records=1)
            for record in batch.get(tp, ()):
                yield DlqRecord.from_consumer(record, self.scrub)
                return
        raise RetryableError(f"reading {partition}:{offset} of {self.topic} timed out")


# -- list, show, stats -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listing:
    records: list[DlqRecord]  # oldest first (DLQ time, then position), at most the limit
    matched: int  # records the filter took
    total: int  # records in the DLQ


async def list_records(
    settings: Settings, flt: DlqFilter | None = None, limit: int | None = None
) -> Listing:
    """The records `flt` takes, oldest first, at most `limit`."""
    async with DeadLetters(settings) as dlq:
        found = [r async for r in dlq.scan(flt)]
        total = dlq.total
    found.sort(key=lambda r: (r.timestamp_ms, r.partition, r.offset))
    return Listing(found[:limit] if limit is not None else found, len(found), total)


async def newest_of_document(settings: Settings, document: str) -> tuple[int, int]:
    """The position of the newest dead letter of the document whose id is `document` or
    starts with it; InvalidInput when no dead letter is of such a document, or several
    documents' ids start with it."""
    listing = await list_records(settings)
    exact = [r for r in listing.records if r.document == document]
    found = exact or [r for r in listing.records if (r.document or "").startswith(document)]
    documents = sorted({r.document or "" for r in found})
    if not found:
        raise InvalidInput(
            f"no dead letter of a document {document!r}: give a PARTITION:OFFSET (for example "
            "0:42) or a document id, as `dlq list` shows them"
        )
    if len(documents) > 1:
        shown = ", ".join(documents[:5]) + (", ..." if len(documents) > 5 else "")
        raise InvalidInput(
            f"{document!r} is the start of several dead-lettered documents' ids ({shown}): "
            "give more of it"
        )
    newest = found[-1]  # the listing is oldest first
    return newest.partition, newest.offset


@dataclass(frozen=True, slots=True)
class ShownRecord:
    record: DlqRecord
    event: Event | None
    undecodable: str | None  # why the value does not decode, when it does not


async def show_record(
    settings: Settings, partition: int, offset: int, codec: Codec | None = None
) -> ShownRecord:
    """One record with its decoded payload (or why it does not decode)."""
    async with DeadLetters(settings) as dlq:
        record = await dlq.get(partition, offset)
    event, why = decode_value(record, codec or Codec())
    return ShownRecord(record, event, why)


@dataclass
class DlqStats:
    total: int = 0
    by_stage_and_class: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    oldest_ms: int | None = None
    newest_ms: int | None = None


async def dlq_stats(settings: Settings, flt: DlqFilter | None = None) -> DlqStats:
    """Counts by stage and error class, and by kind; the oldest and newest record times."""
    stats = DlqStats()
    async with DeadLetters(settings) as dlq:
        async for r in dlq.scan(flt):
            stats.total += 1
            stats.by_stage_and_class[(r.stage or "?", r.error_class or "?")] += 1
            stats.by_kind[r.kind or "?"] += 1
            if stats.oldest_ms is None or r.timestamp_ms < stats.oldest_ms:
                stats.oldest_ms = r.timestamp_ms
            if stats.newest_ms is None or r.timestamp_ms > stats.newest_ms:
                stats.newest_ms = r.timestamp_ms
    return stats


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


# -- purge -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgePartition:
    partition: int
    low: int  # the first offset now
    end: int
    delete_before: int  # the first offset after the purge

    @property
    def count(self) -> int:
        return max(0, self.delete_before - self.low)


@dataclass(frozen=True, slots=True)
class PurgePlan:
    dlq_topic: str
    partitions: tuple[PurgePartition, ...]

    @property
    def total(self) -> int:
        return sum(p.count for p in self.partitions)


async def plan_purge(
    settings: Settings,
    *,
    before: datetime | None = None,
    up_to: Mapping[int, int] | None = None,
) -> PurgePlan:
    """What a purge would delete: records older than `before`, or, per partition in `up_to`,
    the records below the given offset (which becomes the partition's first record)."""
    if (before is None) == (up_to is None):
        raise InvalidInput("give one of --before TIME or --up-to PARTITION:OFFSET[,...]")
    async with DeadLetters(settings) as dlq:
        if before is not None:
            cut = await dlq.first_offsets_at(epoch_ms(before))
        else:
            assert up_to is not None
            cut = {}
            for partition, offset in up_to.items():
                extent = dlq.extents.get(partition)
                if extent is None:
                    raise InvalidInput(
                        f"--up-to {partition}:{offset}: {dlq.topic} has partitions "
                        f"0..{len(dlq.extents) - 1}"
                    )
                if offset > extent.end:
                    raise InvalidInput(
                        f"--up-to {partition}:{offset}: partition {partition} ends at offset "
                        f"{extent.end} (its last record is {extent.end - 1})"
                    )
                cut[partition] = offset
        parts = tuple(
            PurgePartition(p, e.low, e.end, max(e.low, cut.get(p, e.low)))
            for p, e in sorted(dlq.extents.items())
        )
    return PurgePlan(dlq.topic, parts)


async def purge(settings: Settings, plan: PurgePlan) -> dict[int, int]:
    """Delete what `plan` says (Kafka's DeleteRecords); each partition's new first offset."""
    todo = {
        TopicPartition(plan.dlq_topic, p.partition): RecordsToDelete(p.delete_before)
        for p in plan.partitions
        if p.count
    }
    if not todo:
        return {}
    async with admin_client(settings) as admin:
        with kafka_errors(f"deleting records from {plan.dlq_topic}"):
            lows = await admin.delete_records(todo, timeout_ms=settings.kafka.request_timeout_ms)
    return {tp.partition: low for tp, low in lows.items()}


__all__ = [
    "DeadLetters",
    "DlqFilter",
    "DlqRecord",
    "DlqStats",
    "Extent",
    "InvalidInput",
    "Listing",
    "PurgePartition",
    "PurgePlan",
    "RedriveReport",
    "ShownRecord",
    "decode_value",
    "dlq_stats",
    "is_poison",
    "list_records",
    "parse_position",
    "parse_positions",
    "parse_stage",
    "parse_time",
    "plan_purge",
    "purge",
    "redrive",
    "show_record",
]
