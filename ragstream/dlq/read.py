"""Reading the DLQ topic: `DeadLetters` (a plain consumer bounded by the ends captured on entry),
and list, show and stats on top of it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiokafka import TopicPartition

from ragstream.admin import admin_client
from ragstream.codec import Codec
from ragstream.dlq.records import DlqFilter, DlqRecord, decode_value
from ragstream.errors import ConfigError, RetryableError
from ragstream.events import Event
from ragstream.kafkaio import (
    Extent,
    extents,
    group_less_consumer,
    kafka_errors,
    offsets_at,
    read_to_end,
)
from ragstream.operator_input import InvalidInput
from ragstream.scrub import Scrubber
from ragstream.settings import Settings
from ragstream.topology import (
    Topology,
)

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
