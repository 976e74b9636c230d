"""Replay's pure parts: operator input (times, offset ranges, combinations) and plan building."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ragstream.events import DocumentUploaded
from ragstream.kafkaio import Extent
from ragstream.operator_input import InvalidInput, OffsetRange, epoch_ms
from ragstream.replay import (
    GroupState,
    Mode,
    RecordFilter,
    ReplayPlan,
    ReplayRequest,
    build_partitions,
)
from ragstream.topology import Stage

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
TOPIC = "t.documents.uploaded"


def request(stage: str = "parse", **kwargs: object) -> ReplayRequest:
    return ReplayRequest.build(stage, now=NOW, **kwargs)  # type: ignore[arg-type]


# -- combinations ------------------------------------------------------------------------------


def test_a_request_names_exactly_one_start() -> None:
    with pytest.raises(InvalidInput, match="one of --from TIME, --earliest"):
        request()
    with pytest.raises(InvalidInput, match="got --from and --earliest"):
        request(from_="2h", earliest=True)
    built = request(from_="2h")
    assert built.stage is Stage.PARSE and built.mode is Mode.RESET
    assert built.from_ms == epoch_ms(NOW - timedelta(hours=2))


def test_unknown_stage_lists_the_stages() -> None:
    with pytest.raises(InvalidInput, match="unknown stage; choose one of parse, chunk, embed"):
        request("index", earliest=True)


def test_filters_need_live_mode() -> None:
    for kwargs in ({"tenants": ["acme"]}, {"documents": ["d1"]}, {"correlation_ids": ["c1"]}):
        with pytest.raises(InvalidInput, match="add --live"):
            request(earliest=True, **kwargs)
    live = request(earliest=True, live=True, tenants=["acme", " "], documents=["d1"])
    assert live.filter == RecordFilter(tenants=frozenset({"acme"}), documents=frozenset({"d1"}))


def test_reset_has_no_end_and_live_has_no_shift() -> None:
    with pytest.raises(InvalidInput, match="--until needs --live"):
        request(from_="2h", until="1h")
    with pytest.raises(InvalidInput, match="END offset needs --live"):
        request(offsets="0:1-5")
    assert request(offsets="0:1").offsets == {0: OffsetRange(1)}
    with pytest.raises(InvalidInput, match="--shift-by moves a group"):
        request(shift_by=-5, live=True)
    with pytest.raises(InvalidInput, match="give a negative number"):
        request(shift_by=5)
    with pytest.raises(InvalidInput, match="--until '3h' is not after --from '2h'"):
        request(from_="2h", until="3h", live=True)


def test_filter_matches_fields_with_and_values_with_or() -> None:
    def event(tenant: str, doc: str, corr: str) -> DocumentUploaded:
        return DocumentUploaded(
            document_id=doc,
            tenant_id=tenant,
            correlation_id=corr,
            filename="a.md",
            content_type="text/markdown",
            size_bytes=1,
            sha256="0" * 64,
        )

    flt = RecordFilter(tenants=frozenset({"a", "b"}), correlation_ids=frozenset({"c1"}))
    assert flt.matches(event("a", "d", "c1")) and flt.matches(event("b", "e", "c1"))
    assert not flt.matches(event("c", "d", "c1")) and not flt.matches(event("a", "d", "c2"))
    assert RecordFilter().matches(event("z", "z", "z")) and RecordFilter().empty
    assert flt.describe() == "tenant a, b; correlation id c1"


# -- plans -------------------------------------------------------------------------------------

EXTENTS = {0: Extent(0, 100), 1: Extent(10, 50), 2: Extent(0, 0)}


def test_reset_to_a_time_moves_back_only() -> None:
    # Partition 0: processed up to 90, the time is at 60 → back to 60 (30 again).
    # Partition 1: the group is at 20, behind the time (40) → unchanged, nothing skipped.
    # Partition 2: empty, never committed → unchanged.
    plan = build_partitions(
        request(from_="1h"), EXTENTS, {0: 90, 1: 20}, topic=TOPIC, at_from={0: 60, 1: 40, 2: 0}
    )
    assert [(p.partition, p.start, p.again, p.records, p.moves) for p in plan] == [
        (0, 60, 30, 40, True),
        (1, 20, 0, 30, False),
        (2, 0, 0, 0, False),
    ]


def test_reset_to_earliest_and_by_a_shift_stay_within_the_log() -> None:
    earliest = build_partitions(request(earliest=True), EXTENTS, {0: 90, 1: 50}, topic=TOPIC)
    assert [(p.start, p.again) for p in earliest] == [(0, 90), (10, 40), (0, 0)]
    # A committed offset older than the log start counts as the log start.
    shifted = build_partitions(request(shift_by=-25), EXTENTS, {0: 90, 1: 5}, topic=TOPIC)
    assert [(p.start, p.again) for p in shifted] == [(65, 25), (10, 0), (0, 0)]


def test_reset_to_given_offsets_touches_only_those_and_never_goes_forward() -> None:
    plan = build_partitions(request(offsets="0:70"), EXTENTS, {0: 90, 1: 30}, topic=TOPIC)
    assert [(p.start, p.moves) for p in plan] == [(70, True), (30, False), (0, False)]
    with pytest.raises(InvalidInput, match=r"the group is at offset 30 .* never forward"):
        build_partitions(request(offsets="1:40"), EXTENTS, {0: 90, 1: 30}, topic=TOPIC)


def test_live_ranges_from_a_time_up_to_until_or_the_captured_end() -> None:
    live = request(from_="2h", until="1h", live=True)
    plan = build_partitions(
        live, EXTENTS, {}, topic=TOPIC, at_from={0: 10, 1: 20, 2: 0}, at_until={0: 30, 1: 50, 2: 0}
    )
    assert [(p.start, p.stop, p.records) for p in plan] == [(10, 30, 20), (20, 50, 30), (0, 0, 0)]
    whole = build_partitions(request(earliest=True, live=True), EXTENTS, {}, topic=TOPIC)
    assert sum(p.records for p in whole) == 140


def test_live_offset_ranges_take_only_the_partitions_named() -> None:
    plan = build_partitions(request(offsets="0:5-15,1:40", live=True), EXTENTS, {}, topic=TOPIC)
    assert [(p.start, p.stop) for p in plan] == [(5, 15), (40, 50), (0, 0)]


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ("0:101", r"offset 101 is beyond the end of partition 0 .* holds offsets 0..99"),
        ("0:50-120", r"offset 120 is beyond the end of partition 0"),
        ("2:1", r"beyond the end of partition 2 .* holds no records \(ends at 0\)"),
        ("1:5-20", r"offset 5 is no longer in partition 1 .* older records were deleted"),
        ("7:0", r"has partitions 0..2"),
    ],
)
def test_offsets_outside_the_log_are_refused(offsets: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        build_partitions(request(offsets=offsets, live=True), EXTENTS, {}, topic=TOPIC)


def test_a_plan_sums_its_partitions_and_names_those_that_move() -> None:
    parts = build_partitions(request(shift_by=-10), EXTENTS, {0: 90, 1: 50}, topic=TOPIC)
    plan = ReplayPlan(request(shift_by=-10), TOPIC, GroupState("g", "Empty", ()), parts, "r1")
    assert plan.stage is Stage.PARSE
    assert (plan.records, plan.again) == (20 + 10, 10 + 10)  # read from the start; again
    assert [p.partition for p in plan.moving] == [0, 1]
    assert not plan.group.members and plan.group.known
    assert not GroupState("g", "Dead", ()).known


def test_a_group_that_never_committed_is_at_the_log_start() -> None:
    # No committed offset: the workers start from the earliest record, so nothing moves back.
    plan = build_partitions(
        request(from_="2h"), EXTENTS, {}, topic=TOPIC, at_from={0: 60, 1: 20, 2: 0}
    )
    assert [(p.position, p.start, p.moves) for p in plan] == [
        (0, 0, False),
        (10, 10, False),
        (0, 0, False),
    ]
