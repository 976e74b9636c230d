"""Kafka I/O that ragstream does in more than one place, done once (the clients' start and
shutdown at the edges are `ragstream.kafka_clients`'s):

    producer(settings, **overrides)          the producer every writer uses: acks=all, idempotent
    started_producer(settings, **overrides)  one, started (a broker that refuses us, explained)
    consumer(settings, **overrides)          a consumer of no group: assign(), nothing committed
    group_less_consumer(settings)            one, started, and stopped at the end (async with)
    kafka_errors(what)                       Kafka's errors as RetryableError naming the work
    extents / offsets_at                     where partitions begin and end; offsets by time
    read_to_end(consumer, ranges, stall_s)   every record of given offset ranges, then stop
    patiently(call)                          a call retried while Kafka's error is retriable

Every client takes the connection and security settings from `kafka.client_options()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from ragstream.errors import RetryableError
from ragstream.kafka_clients import bounded, started_or_explained

if TYPE_CHECKING:
    from ragstream.settings import Settings

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
T = TypeVar("T")


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer (not started) whose every send is acknowledged by all in-sync replicas and
    written once however often it is retried; `overrides` add to that (`linger_ms=5`)."""
    options = {"acks": "all", "enable_idempotence": True, **overrides}
    return AIOKafkaProducer(**settings.kafka.client_options(), **options)


async def started_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """`producer(...)` started; a broker that cannot be reached or refuses us is explained
    (`kafka_clients.unreachable`)."""
    return await started_or_explained(settings.kafka, lambda: producer(settings, **overrides))


def consumer(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer (not started) of no group: it reads what it is assigned, from the earliest
    record unless told where, and commits nothing."""
    options = {
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        **overrides,
    }
    return AIOKafkaConsumer(**settings.kafka.client_options(), **options)


@asynccontextmanager
async def group_less_consumer(settings: Settings, **overrides: Any) -> AsyncIterator[Any]:
    """`consumer(...)` started (a broker that cannot be reached or refuses us, explained) and
    stopped at the end, within a bounded time."""
    client = await started_or_explained(settings.kafka, lambda: consumer(settings, **overrides))
    try:
        yield client
    finally:
        await bounded(client.stop(), "stop a reading consumer")


@contextmanager
def kafka_errors(what: str) -> Iterator[None]:
    """Kafka's errors as RetryableError naming what was being done."""
    try:
        yield
    except KafkaError as exc:
        raise RetryableError(f"{what}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Extent:
    """A partition's first offset and its end (the offset the next record will get); as a
    range to read, its records from `low` up to `end`."""

    low: int
    end: int

    @property
    def count(self) -> int:
        return max(0, self.end - self.low)


async def extents(client: Any, topic: str, partitions: Iterable[int]) -> dict[int, Extent]:
    """Each partition's first offset and end, as the broker has them now."""
    tps = [TopicPartition(topic, p) for p in partitions]
    with kafka_errors(f"reading the extents of {topic}"):
        lows = await client.beginning_offsets(tps)
        ends = await client.end_offsets(tps)
    return {tp.partition: Extent(lows[tp], ends[tp]) for tp in tps}


async def offsets_at(
    client: Any, topic: str, held: Mapping[int, Extent], moment_ms: int
) -> dict[int, int]:
    """Per partition, the first offset whose record is at or after `moment_ms` (its end when
    there is none). Records before it are all older (Kafka's time index holds the maximum
    timestamp so far, so it never skips a later record)."""
    tps = {TopicPartition(topic, p): moment_ms for p in held}
    with kafka_errors(f"looking up times in {topic}"):
        found = await client.offsets_for_times(tps)
    out = {}
    for tp, hit in found.items():
        extent = held[tp.partition]
        offset = extent.end if hit is None else hit.offset
        out[tp.partition] = min(max(offset, extent.low), extent.end)
    return out


async def read_to_end(
    client: Any, ranges: Mapping[TopicPartition, Extent], stall_s: float
) -> AsyncIterator[list[Record]]:
    """Every record of each partition's range (`low` up to `end`, exclusive), batch by batch,
    each partition in offset order (partitions interleaved); then it stops, however much the
    topic has grown meanwhile. The partitions must be assigned to `client`; it is left at each
    range's end, its partitions not paused, so a caller may go on reading from there.

    RetryableError when no record comes for `stall_s` while records are still due."""
    remaining = {tp: r.end for tp, r in ranges.items() if r.low < r.end}
    for tp in remaining:
        client.seek(tp, ranges[tp].low)
    topics = ", ".join(sorted({tp.topic for tp in remaining}))
    done: list[TopicPartition] = []
    last_progress = time.monotonic()
    try:
        while remaining:
            with kafka_errors(f"reading {topics}"):
                fetched = await client.getmany(*remaining, timeout_ms=500)
            for tp, records in fetched.items():
                end = remaining.get(tp)
                taken = [r for r in records if end is not None and r.offset < end]
                if taken:
                    yield taken
            for tp in list(remaining):
                with kafka_errors(f"reading {topics}"):
                    position = await client.position(tp)
                if position >= remaining[tp]:
                    client.pause(tp)  # nothing past the end is fetched meanwhile
                    done.append(tp)
                    del remaining[tp]
            if fetched:
                last_progress = time.monotonic()
            elif remaining and time.monotonic() - last_progress > stall_s:
                stuck = ", ".join(str(tp.partition) for tp in remaining)
                raise RetryableError(
                    f"reading {topics} made no progress for {stall_s:g}s (partitions {stuck})"
                )
    finally:
        assigned = client.assignment()
        client.resume(*(tp for tp in done if tp in assigned))


async def patiently(call: Callable[[], Awaitable[T]], timeout_s: float = 30.0) -> T:
    """Retry a call while Kafka answers with a retriable error: a group coordinator that is
    not ready yet, just after the broker or the offsets topic started, or a broker of a
    cluster that just died, until the cluster notices and moves its partitions (a broker's
    session timeout, 9 s by default)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
