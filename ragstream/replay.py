"""Replay: process one stage's input again, from a time or an offset range.

    request = ReplayRequest.build("parse", from_="2h")                 # reset a stopped group
    request = ReplayRequest.build("chunk", live=True, earliest=True, tenants=["acme"])
    plan = await plan_replay(settings, request)                        # reads; moves nothing
    report = await run_replay(settings, plan)                          # or dry_run=True

Two ways to replay a stage, one plan for both:

- **reset** (the default), like `kafka-consumer-groups --reset-offsets` (to a time, to the
  earliest record, by a shift, or to given offsets): the stage's consumer group gets new
  committed offsets on its input topic, and reprocesses from there when its workers start. It
  is refused while the group has live members (a running member would overwrite the offsets
  with its own commits). It moves whole partitions, so it cannot select tenants, documents or
  correlation ids. A replay never moves a group forward: a partition the group has not yet
  reached at the asked position keeps its offset, so a replay never skips a record.
- **live**: the range is read from the stage's input topic (a plain consumer, no group) and each
  record a filter takes is written back to the same topic with its key, value and headers and
  the header `ragstream.replay: <replay id>`, so the running group processes it again. Copies an
  earlier replay wrote are not copied again (their originals are, when in the range), and bytes
  that do not decode are left out (they would only be dead-lettered again). The range ends at
  the log ends captured when the plan is made, so the replay ends while the topic grows.

Downstream every write is an idempotent upsert (see ragstream.store), so a replay adds no
duplicate row; a replayed copy is a journey step of its own (`replay` = the copy's position).

Operator input that cannot be used raises `InvalidInput` (exit code 2 on the CLI); a reset while
the group runs raises `ReplayRefused`; Kafka's errors come out as RetryableError.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from ragstream.admin import admin_client, describe_group
from ragstream.codec import Codec
from ragstream.dlq import (
    InvalidInput,
    epoch_ms,
    format_ms,
    parse_stage,
    parse_time,
)
from ragstream.errors import PermanentError, RagstreamError, RetryableError
from ragstream.events import DocumentEvent
from ragstream.headers import is_replay_copy, replay_headers
from ragstream.kafkaio import (
    Extent,
    extents,
    group_less_consumer,
    kafka_errors,
    offsets_at,
    read_to_end,
    started_producer,
)
from ragstream.settings import Settings
from ragstream.topology import Stage, Topology

OnProgress = Callable[[int, int], None]  # (records read so far, records in the range)

SKIP_COPY = "copies an earlier replay wrote"
SKIP_UNDECODABLE = "undecodable (they would only be dead-lettered again)"
SKIP_FILTERED = "not taken by the filter"


class ReplayRefused(RagstreamError):
    """The replay cannot run as asked right now (an offset reset while the group has members)."""


class Mode(StrEnum):
    RESET = "reset"
    LIVE = "live"


# -- operator input ----------------------------------------------------------------------------

_RANGE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_when(text: str, *, option: str = "--from", now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC) or an age before now: `2h`, `-2h`, `1h30m`, `7d`.
    A time in the future is refused: nothing has been written after it yet."""
    now = now or datetime.now(UTC)
    value = text.strip()
    moment = parse_time(value[1:] if value.startswith("-") else value, option=option, now=now)
    if moment > now:
        raise InvalidInput(
            f"{option} {text!r} is in the future ({_iso(moment)}; now is {_iso(now)}): "
            "nothing has been written after it yet"
        )
    return moment


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Offsets of one partition: `start` inclusive, `stop` exclusive (None: to the log end)."""

    start: int
    stop: int | None = None


def parse_offset_ranges(text: str, *, option: str = "--offsets") -> dict[int, OffsetRange]:
    """`P:START[-END][,P:START[-END]...]` → {partition: OffsetRange}; END is exclusive."""
    out: dict[int, OffsetRange] = {}
    for item in text.split(","):
        match = _RANGE.fullmatch(item)
        if match is None:
            raise InvalidInput(
                f"{option} {text!r}: expected PARTITION:START[-END][,...], for example "
                "0:100-200,1:50 (END is exclusive; without it, to the end of the log)"
            )
        partition, start = int(match[1]), int(match[2])
        stop = int(match[3]) if match[3] is not None else None
        if partition in out:
            raise InvalidInput(f"{option} {text!r}: partition {partition} is given twice")
        if stop is not None and stop < start:
            raise InvalidInput(f"{option} {item.strip()!r}: END {stop} is before START {start}")
        out[partition] = OffsetRange(start, stop)
    return out


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records a live replay takes; empty takes all. Fields combine with AND, values of
    one field with OR."""

    tenants: frozenset[str] = frozenset()
    documents: frozenset[str] = frozenset()
    correlation_ids: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.tenants or self.documents or self.correlation_ids)

    def matches(self, event: DocumentEvent) -> bool:
        if self.tenants and event.tenant_id not in self.tenants:
            return False
        if self.documents and event.document_id not in self.documents:
            return False
        return not self.correlation_ids or event.correlation_id in self.correlation_ids

    def describe(self) -> str:
        parts = [
            f"{name} {', '.join(sorted(values))}"
            for name, values in (
                ("tenant", self.tenants),
                ("document", self.documents),
                ("correlation id", self.correlation_ids),
            )
            if values
        ]
        return "; ".join(parts) or "every record"


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What an operator asked for, checked: one stage, one way to start, a mode, a filter."""

    stage: Stage
    mode: Mode
    from_ms: int | None = None  # from the first record at or after this time
    earliest: bool = False  # from each partition's first record
    shift_by: int | None = None  # reset only: this many records back (negative)
    offsets: Mapping[int, OffsetRange] | None = None  # given partitions only
    until_ms: int | None = None  # live only: up to the first record at or after this time
    filter: RecordFilter = RecordFilter()

    @property
    def live(self) -> bool:
        return self.mode is Mode.LIVE

    @classmethod
    def build(
        cls,
        stage: str,
        *,
        live: bool = False,
        from_: str | None = None,
        earliest: bool = False,
        shift_by: int | None = None,
        offsets: str | None = None,
        until: str | None = None,
        tenants: Iterable[str] = (),
        documents: Iterable[str] = (),
        correlation_ids: Iterable[str] = (),
        now: datetime | None = None,
    ) -> ReplayRequest:
        """A request from operator text; InvalidInput names the option that cannot be used."""
        now = now or datetime.now(UTC)
        parsed_stage = parse_stage(stage, option="stage")
        starts = [
            name
            for name, given in (
                ("--from", from_ is not None),
                ("--earliest", earliest),
                ("--shift-by", shift_by is not None),
                ("--offsets", offsets is not None),
            )
            if given
        ]
        if len(starts) != 1:
            given = f" (got {' and '.join(starts)})" if starts else ""
            raise InvalidInput(
                "say where the replay starts with one of --from TIME, --earliest, "
                f"--shift-by -N or --offsets P:START[-END]{given}"
            )
        flt = RecordFilter(
            tenants=_values(tenants),
            documents=_values(documents),
            correlation_ids=_values(correlation_ids),
        )
        ranges = parse_offset_ranges(offsets) if offsets is not None else None
        if not live:
            if not flt.empty:
                raise InvalidInput(
                    "--tenant, --document and --correlation-id pick single records, and an "
                    "offset reset moves whole partitions: add --live to republish only the "
                    "matching records while the workers run"
                )
            if until is not None:
                raise InvalidInput(
                    "--until needs --live: after an offset reset the group reads on to the "
                    "end of the log"
                )
            if ranges and any(r.stop is not None for r in ranges.values()):
                raise InvalidInput(
                    f"--offsets {offsets!r}: an END offset needs --live; an offset reset sets "
                    "where the group starts and it reads on to the end of the log"
                )
        elif shift_by is not None:
            raise InvalidInput(
                "--shift-by moves a group's committed offsets (an offset reset); with --live "
                "give --from, --earliest or --offsets"
            )
        if shift_by is not None and shift_by >= 0:
            raise InvalidInput(
                f"--shift-by {shift_by}: a replay moves offsets back, so give a negative "
                "number of records (for example --shift-by -100)"
            )
        from_ms = epoch_ms(parse_when(from_, now=now)) if from_ is not None else None
        until_ms = (
            epoch_ms(parse_time(until, option="--until", now=now)) if until is not None else None
        )
        if from_ms is not None and until_ms is not None and until_ms <= from_ms:
            raise InvalidInput(f"--until {until!r} is not after --from {from_!r}")
        return cls(
            stage=parsed_stage,
            mode=Mode.LIVE if live else Mode.RESET,
            from_ms=from_ms,
            earliest=earliest,
            shift_by=shift_by,
            offsets=ranges,
            until_ms=until_ms,
            filter=flt,
        )

    def describe_start(self) -> str:
        if self.from_ms is not None:
            return f"from {format_ms(self.from_ms)}"
        if self.earliest:
            return "from the earliest record"
        if self.shift_by is not None:
            return f"{-self.shift_by} record(s) back"
        return "from the given offsets"


def _values(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip() for v in values if v and v.strip())


def _iso(moment: datetime) -> str:
    return format_ms(epoch_ms(moment))


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    """One partition of the input topic: what is there and what the replay does with it.

    Reset: the group's position (its committed offset, or the first offset when it has none)
    moves back to `start`; it then reads `start`..end. Live: offsets `start`..`stop` are read."""

    partition: int
    low: int  # the first offset in the log
    end: int  # the log end (the next record's offset) when the plan was made
    committed: int | None  # the group's committed offset
    start: int
    stop: int  # exclusive

    @property
    def records(self) -> int:
        """Records the range holds (live) / the group reads again from `start` (reset)."""
        return max(0, self.stop - self.start)

    @property
    def position(self) -> int:
        """Where the group would go on from: its committed offset within the log."""
        return _position(self.low, self.end, self.committed)

    @property
    def again(self) -> int:
        """Reset: records the group had processed that it processes again."""
        return max(0, self.position - self.start)

    @property
    def moves(self) -> bool:
        """Reset: the committed offset changes."""
        return self.start != self.position


def _position(low: int, end: int, committed: int | None) -> int:
    """A group's position in a partition: its committed offset, else the first offset (the
    workers start from the earliest record), within the log."""
    return min(max(low if committed is None else committed, low), end)


@dataclass(frozen=True, slots=True)
class GroupState:
    """A consumer group as DescribeGroups reports it."""

    group_id: str
    state: str  # Stable, Empty, PreparingRebalance, ..., Dead (unknown to the broker)
    members: tuple[str, ...]  # "client-id@host" of each live member

    @property
    def known(self) -> bool:
        return self.state != "Dead"


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What a replay does, per partition of the stage's input topic, as the broker stood when
    the plan was made. `replay_id` is the value of the replay header a live replay writes."""

    request: ReplayRequest
    topic: str
    group: GroupState
    partitions: tuple[PartitionPlan, ...]
    replay_id: str

    @property
    def stage(self) -> Stage:
        return self.request.stage

    @property
    def records(self) -> int:
        return sum(p.records for p in self.partitions)

    @property
    def again(self) -> int:
        return sum(p.again for p in self.partitions)

    @property
    def moving(self) -> tuple[PartitionPlan, ...]:
        return tuple(p for p in self.partitions if p.moves)


def build_partitions(
    request: ReplayRequest,
    extents: Mapping[int, Extent],
    committed: Mapping[int, int],
    *,
    topic: str,
    at_from: Mapping[int, int] | None = None,
    at_until: Mapping[int, int] | None = None,
) -> tuple[PartitionPlan, ...]:
    """The plan per partition (pure). `at_from` / `at_until`: per partition, the first offset
    at or after `request.from_ms` / `request.until_ms` (its end when there is none)."""
    ranges = dict(request.offsets or {})
    for partition, asked in sorted(ranges.items()):
        _check_range(topic, extents, partition, asked)
    out = []
    for partition, extent in sorted(extents.items()):
        wanted = ranges.get(partition)
        if request.live:
            start, stop = _live_range(request, partition, extent, wanted, at_from, at_until)
        else:
            position = _position(extent.low, extent.end, committed.get(partition))
            start = _reset_start(request, partition, extent, position, wanted, at_from)
            stop = extent.end
        out.append(
            PartitionPlan(
                partition, extent.low, extent.end, committed.get(partition), start, max(start, stop)
            )
        )
    return tuple(out)


def _check_range(
    topic: str, extents: Mapping[int, Extent], partition: int, wanted: OffsetRange
) -> None:
    extent = extents.get(partition)
    where = f"--offsets {partition}:{wanted.start}" + (
        f"-{wanted.stop}" if wanted.stop is not None else ""
    )
    if extent is None:
        raise InvalidInput(f"{where}: {topic} has partitions 0..{len(extents) - 1}")
    holds = (
        f"offsets {extent.low}..{extent.end - 1}"
        if extent.count
        else f"no records (ends at {extent.end})"
    )
    for offset in (wanted.start, wanted.stop):
        if offset is not None and offset > extent.end:
            raise InvalidInput(
                f"{where}: offset {offset} is beyond the end of partition {partition} of "
                f"{topic}, which holds {holds}"
            )
    if wanted.start < extent.low:
        raise InvalidInput(
            f"{where}: offset {wanted.start} is no longer in partition {partition} of {topic} "
            f"(it holds {holds}; older records were deleted)"
        )


def _live_range(
    request: ReplayRequest,
    partition: int,
    extent: Extent,
    wanted: OffsetRange | None,
    at_from: Mapping[int, int] | None,
    at_until: Mapping[int, int] | None,
) -> tuple[int, int]:
    stop = extent.end if at_until is None else at_until[partition]
    if request.offsets is not None:
        if wanted is None:  # a partition not named takes no part
            return extent.end, extent.end
        start = wanted.start
        stop = min(stop, wanted.stop) if wanted.stop is not None else stop
    elif request.earliest:
        start = extent.low
    else:
        assert at_from is not None
        start = at_from[partition]
    return start, stop


def _reset_start(
    request: ReplayRequest,
    partition: int,
    extent: Extent,
    position: int,
    wanted: OffsetRange | None,
    at_from: Mapping[int, int] | None,
) -> int:
    if request.offsets is not None:
        if wanted is None:  # a partition not named keeps its offset
            return position
        if wanted.start > position:
            raise InvalidInput(
                f"--offsets {partition}:{wanted.start}: the group is at offset {position} of "
                f"partition {partition}; a replay moves a group back, never forward (it would "
                "skip records)"
            )
        return wanted.start
    if request.earliest:
        target = extent.low
    elif request.shift_by is not None:
        target = max(extent.low, position + request.shift_by)
    else:
        assert at_from is not None
        target = at_from[partition]
    return min(target, position)


# -- reading the broker ------------------------------------------------------------------------


async def group_state(admin: Any, group_id: str) -> GroupState:
    """The group's state and live members (DescribeGroups); state Dead when unknown."""
    with kafka_errors(f"describing consumer group {group_id}"):
        group = await describe_group(admin, group_id)
    if group.error:
        raise RetryableError(f"describing consumer group {group_id}: error code {group.error}")
    return GroupState(
        group_id, group.state, tuple(f"{m.client_id}@{m.host}" for m in group.members)
    )


async def plan_replay(settings: Settings, request: ReplayRequest) -> ReplayPlan:
    """Read the input topic's extents, the group's offsets and members; build the plan.
    Moves nothing."""
    topology = Topology(settings.kafka.topic_prefix)
    topic = topology.input_topic(request.stage)
    group_id = topology.group(request.stage)
    bootstrap = settings.kafka.bootstrap_servers
    async with admin_client(settings) as admin:
        with kafka_errors(f"describing {topic}"):
            if topic not in set(await admin.list_topics()):
                raise InvalidInput(
                    f"there is no topic {topic!r} on {bootstrap} (run `ragstream topics "
                    "create`, or check kafka.topic_prefix)"
                )
            (described,) = await admin.describe_topics([topic])
        group = await group_state(admin, group_id)
        with kafka_errors(f"reading the committed offsets of {group_id}"):
            offsets = await admin.list_consumer_group_offsets(group_id)
    committed = {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == topic and meta.offset >= 0
    }
    if not request.live:
        _check_resettable(group, has_offsets=bool(offsets), bootstrap=bootstrap)
    async with group_less_consumer(settings) as consumer:
        held = await extents(consumer, topic, (p["partition"] for p in described["partitions"]))
        at_from = at_until = None
        if request.from_ms is not None:
            at_from = await offsets_at(consumer, topic, held, request.from_ms)
        if request.until_ms is not None:
            at_until = await offsets_at(consumer, topic, held, request.until_ms)
    partitions = build_partitions(
        request, held, committed, topic=topic, at_from=at_from, at_until=at_until
    )
    return ReplayPlan(
        request=request,
        topic=topic,
        group=group,
        partitions=partitions,
        replay_id=uuid.uuid4().hex[:12],
    )


def _check_resettable(group: GroupState, *, has_offsets: bool, bootstrap: str) -> None:
    if group.members:
        raise ReplayRefused(
            f"consumer group {group.group_id} has {len(group.members)} live member(s) "
            f"({', '.join(group.members)}): an offset reset needs a stopped group; stop its "
            "workers first, or add --live to republish the records while they run"
        )
    if not group.known and not has_offsets:
        raise InvalidInput(
            f"consumer group {group.group_id} is not known to {bootstrap}: it has never "
            "committed an offset, so there is nothing to reset (has the stage run with this "
            "kafka.topic_prefix?)"
        )


# -- running it --------------------------------------------------------------------------------


@dataclass
class ReplayReport:
    plan: ReplayPlan
    dry_run: bool
    read: int = 0  # records read from the range
    matched: Counter[int] = field(default_factory=Counter)  # per partition: taken (or would be)
    skipped: Counter[str] = field(default_factory=Counter)  # reason → records
    sent: int = 0  # copies the broker acknowledged
    committed: dict[int, int] = field(default_factory=dict)  # reset: partition → new offset

    @property
    def taken(self) -> int:
        return sum(self.matched.values())


async def run_replay(
    settings: Settings,
    plan: ReplayPlan,
    *,
    dry_run: bool = False,
    codec: Codec | None = None,
    on_progress: OnProgress | None = None,
    batch_size: int = 500,
) -> ReplayReport:
    """Carry out the plan. Reset: commit the new offsets (the group must still be stopped).
    Live: read the range and republish what the filter takes; with `dry_run`, count only."""
    report = ReplayReport(plan, dry_run)
    if plan.request.live:
        await _republish(settings, plan, report, codec or Codec(), on_progress, batch_size)
    elif not dry_run:
        await _reset(settings, plan, report)
    return report


async def _reset(settings: Settings, plan: ReplayPlan, report: ReplayReport) -> None:
    moving = plan.moving
    if not moving:
        return
    async with admin_client(settings) as admin:  # it may have started since the plan was made
        group = await group_state(admin, plan.group.group_id)
    _check_resettable(group, has_offsets=True, bootstrap=settings.kafka.bootstrap_servers)
    offsets = {
        TopicPartition(plan.topic, p.partition): OffsetAndMetadata(p.start, "") for p in moving
    }
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(),
        group_id=plan.group.group_id,
        enable_auto_commit=False,
    )
    try:
        with kafka_errors(f"connecting to {settings.kafka.bootstrap_servers}"):
            await consumer.start()
        consumer.assign(list(offsets))
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            raise ReplayRefused(
                f"the broker refused the new offsets of {plan.group.group_id} "
                f"({type(exc).__name__}: {exc}); did a worker join the group? Stop its "
                "workers and run this again"
            ) from exc
    finally:
        await consumer.stop()
    report.committed = {tp.partition: meta.offset for tp, meta in offsets.items()}


def _take(record: Any, flt: RecordFilter, codec: Codec) -> str | None:
    """None when the record is to be replayed, else why not."""
    if is_replay_copy(record.headers):
        return SKIP_COPY
    try:
        event = codec.decode(record.value or b"")
    except PermanentError:
        return SKIP_UNDECODABLE
    if not isinstance(event, DocumentEvent):
        return SKIP_UNDECODABLE
    return None if flt.matches(event) else SKIP_FILTERED


async def _republish(
    settings: Settings,
    plan: ReplayPlan,
    report: ReplayReport,
    codec: Codec,
    on_progress: OnProgress | None,
    batch_size: int,
) -> None:
    total = plan.records
    producer: Any = None
    if not report.dry_run and total:
        producer = await started_producer(settings, linger_ms=5)
    pending: list[Any] = []
    try:
        async with group_less_consumer(settings) as consumer:
            async for batch in _read_ranges(settings, consumer, plan):
                for record in batch:
                    report.read += 1
                    why = _take(record, plan.request.filter, codec)
                    if why is not None:
                        report.skipped[why] += 1
                        continue
                    report.matched[record.partition] += 1
                    if producer is not None:
                        pending.append(await _send_copy(producer, plan, record))
                if len(pending) >= batch_size:
                    report.sent += await _acknowledged(pending)
                if on_progress is not None:
                    on_progress(report.read, total)
        report.sent += await _acknowledged(pending)
    finally:
        if producer is not None:
            await producer.stop()


async def _send_copy(producer: Any, plan: ReplayPlan, record: Any) -> Any:
    """Queue one copy (in order: one partition's copies keep their order); its future."""
    key = record.key
    with kafka_errors(f"writing to {plan.topic}"):
        return await producer.send(
            plan.topic,
            record.value,
            key=key,
            # The partitioner places a keyed copy where the key's records go now.
            partition=record.partition if key is None else None,
            headers=replay_headers(record.headers, plan.replay_id),
        )


async def _acknowledged(pending: list[Any]) -> int:
    """Wait for the broker's acknowledgement of every queued copy; how many there were."""
    count = len(pending)
    if count:
        with kafka_errors("waiting for the broker to acknowledge the copies"):
            await asyncio.gather(*pending)
    pending.clear()
    return count


async def _read_ranges(
    settings: Settings, consumer: Any, plan: ReplayPlan
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """The plan's ranges, batch by batch; each partition in offset order."""
    ranges = {
        TopicPartition(plan.topic, p.partition): Extent(p.start, p.stop)
        for p in plan.partitions
        if p.records
    }
    if not ranges:
        return
    consumer.assign(list(ranges))
    stall_s = settings.kafka.request_timeout_ms / 1000
    async for batch in read_to_end(consumer, ranges, stall_s):
        yield batch


__all__ = [
    "GroupState",
    "InvalidInput",
    "Mode",
    "OffsetRange",
    "PartitionPlan",
    "RecordFilter",
    "ReplayPlan",
    "ReplayRefused",
    "ReplayReport",
    "ReplayRequest",
    "build_partitions",
    "group_state",
    "parse_offset_ranges",
    "parse_when",
    "plan_replay",
    "run_replay",
]
