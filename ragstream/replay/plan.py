"""The plan of a replay, per partition of the stage's input topic: pure, from the extents,
the group's committed offsets and the offsets found for the request's times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ragstream.kafkaio import (
    Extent,
)
from ragstream.operator_input import (
    InvalidInput,
    OffsetRange,
)
from ragstream.replay.request import ReplayRequest
from ragstream.topology import Stage

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
