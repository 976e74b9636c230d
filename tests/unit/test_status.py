"""The arithmetic and the rendering behind `ragstream status` and `ragstream topics scale`:
lag, records per second, key movement, name resolution, circuit summaries. No broker."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import murmur2
from rich.console import Console

from ragstream.admin import Member, ScaleResult, keys_moved, resolve_topic
from ragstream.cli.status_cmd import render
from ragstream.cli.topics_cmd import scale_notes
from ragstream.codec import Codec
from ragstream.control import ControlState
from ragstream.errors import ConfigError
from ragstream.events import (
    CircuitState,
    CircuitStateChanged,
    ServiceMode,
    ServiceModeChanged,
    ThrottleEvent,
    ThrottleState,
)
from ragstream.providers.circuit import CircuitBreaker
from ragstream.providers.circuit import CircuitState as BreakerState
from ragstream.providers.circuit_reports import STALE_AFTER_S, CircuitReporter, summarize
from ragstream.settings import Settings, load_settings
from ragstream.status import (
    GroupSpec,
    Status,
    advance_per_second,
    group_status,
    partition_lag,
    resolve_groups,
    service_statuses,
)
from ragstream.topology import Topology

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TOPOLOGY = Topology("rs")


# -- lag ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("committed", "start", "end", "lag"),
    [
        (40, 0, 100, 60),  # log end minus committed offset
        (100, 0, 100, 0),  # caught up
        (None, 0, 100, 100),  # never committed: everything from the log start
        (None, 30, 100, 70),  # ... and the log start is where retention left it
        (10, 30, 100, 70),  # committed below the log start: the group resumes at the start
        (None, 0, 0, 0),  # empty partition
        (120, 0, 100, 0),  # committed past the end (topic recreated): never negative
    ],
)
def test_partition_lag(committed: int | None, start: int, end: int, lag: int) -> None:
    assert partition_lag(committed, start, end) == lag


def test_records_per_second_is_the_advance_of_committed_offsets() -> None:
    a, b, c = (TopicPartition("t", p) for p in range(3))
    before = {a: 10, b: 50, c: 7}
    after = {a: 30, b: 40, c: 7}  # b moved back (an offset reset): counts as nothing
    assert advance_per_second(before, after, 2.0) == 10.0
    assert advance_per_second({a: 10}, {a: 30, b: 99}, 4.0) == 5.0  # b not in both samples
    assert advance_per_second(before, after, 0.0) == 0.0


def _spec() -> GroupSpec:
    (embed,) = resolve_groups(TOPOLOGY, ["embed"])
    return embed


def test_group_status_assigns_owners_and_sums_lag_and_rates() -> None:
    spec = _spec()
    chunked, retry = spec.topics
    tps = [TopicPartition(chunked, p) for p in range(3)] + [TopicPartition(retry, 0)]
    starts = dict.fromkeys(tps, 0)
    ends = {tps[0]: 100, tps[1]: 80, tps[2]: 5, tps[3]: 0}
    committed = {tps[0]: 90, tps[1]: 20}  # tps[2] never committed
    before = {tps[0]: 70, tps[1]: 20}
    members = (
        Member("m-1", "embed-1", "10.0.0.1", ((chunked, 0), (chunked, 2))),
        Member("m-2", "embed-2", "10.0.0.2", ((chunked, 1), (retry, 0))),
    )
    g = group_status(spec, "Stable", members, tps, starts, ends, committed, before, 2.0)
    assert [p.lag for p in g.partitions] == [10, 60, 5, 0]
    assert [p.member_id for p in g.partitions] == ["m-1", "m-2", "m-1", "m-2"]
    assert g.lag == 75
    assert g.member_lag("m-1") == 15 and g.member_lag("m-2") == 60
    assert g.records_per_s == 10.0
    assert [p.records_per_s for p in g.partitions] == [10.0, 0.0, 0.0, 0.0]
    once = group_status(spec, "Empty", (), tps, starts, ends, committed, None, None)
    assert once.records_per_s is None and {p.records_per_s for p in once.partitions} == {None}
    assert {p.member_id for p in once.partitions} == {None}


def test_groups_by_name_or_id_and_unknown_names_refused() -> None:
    assert [g.name for g in resolve_groups(TOPOLOGY, [])] == ["parse", "chunk", "embed", "cost"]
    embed = resolve_groups(TOPOLOGY, ["embed", "rs-embed"])
    assert [(g.group_id, g.topics) for g in embed] == [
        ("rs-embed", ("rs.documents.chunked", "rs.retry.embed"))
    ]
    (cost,) = resolve_groups(TOPOLOGY, ["cost"])
    assert cost.topics == ("rs.cost.usage", "rs.retry.cost")
    with pytest.raises(ConfigError, match=r"unknown group 'embedd': choose one of parse"):
        resolve_groups(TOPOLOGY, ["embedd"])


# -- scale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "moved"), [(3, 6, 0.5), (12, 24, 0.5), (3, 5, 0.8), (4, 4, 0.0)]
)
def test_share_of_keys_that_move(before: int, after: int, moved: float) -> None:
    assert keys_moved(before, after) == pytest.approx(moved)


def test_the_share_matches_kafkas_partitioner_on_real_keys() -> None:
    rng = random.Random(7)
    keys = [f"{rng.getrandbits(128):032x}".encode() for _ in range(20_000)]
    for before, after in ((3, 6), (12, 13), (6, 9)):
        moved = sum(
            (murmur2(k) & 0x7FFFFFFF) % before != (murmur2(k) & 0x7FFFFFFF) % after for k in keys
        )
        assert moved / len(keys) == pytest.approx(keys_moved(before, after), abs=0.02)


def test_topic_names_resolve_from_a_stage_a_full_name_or_a_short_one() -> None:
    existing = {"rs.documents.uploaded", "rs.documents.chunked", "rs.dlq", "other"}
    assert resolve_topic(TOPOLOGY, "embed", existing) == "rs.documents.chunked"
    assert resolve_topic(TOPOLOGY, "parse", existing) == "rs.documents.uploaded"
    assert resolve_topic(TOPOLOGY, "rs.dlq", existing) == "rs.dlq"
    assert resolve_topic(TOPOLOGY, "dlq", existing) == "rs.dlq"
    assert resolve_topic(TOPOLOGY, "documents.chunked", existing) == "rs.documents.chunked"
    assert resolve_topic(TOPOLOGY, "other", existing) == "other"
    with pytest.raises(ConfigError) as info:
        resolve_topic(TOPOLOGY, "chunk", existing)  # its input topic does not exist
    assert "unknown topic 'chunk'" in str(info.value)
    assert "rs.documents.chunked" in str(info.value) and "other" not in str(info.value)


def test_scale_notes_say_how_many_keys_move_and_who_can_grow() -> None:
    settings = load_settings(kafka={"topic_prefix": "rs"})
    notes = "\n".join(scale_notes(settings, ScaleResult("rs.documents.chunked", 3, 6)))
    assert "about 50% of keys" in notes
    assert "Per-document order holds among the records written before" in notes
    assert f"({settings.kafka.metadata_max_age_ms} ms)" in notes
    assert "Group rs-embed can now run up to 6 members" in notes
    assert "can now run" not in "\n".join(scale_notes(settings, ScaleResult("rs.dlq", 3, 4)))


# -- circuits ----------------------------------------------------------------------------------


def _report(
    worker: str, state: CircuitState, age_s: float, service: str = "openai"
) -> CircuitStateChanged:
    return CircuitStateChanged(
        service=service,
        worker_id=worker,
        host=worker.split(":")[0],
        pid=int(worker.split(":")[1]),
        state=state,
        since=T0 - timedelta(seconds=age_s + 5),
        occurred_at=T0 - timedelta(seconds=age_s),
    )


def test_circuits_summarised_across_workers() -> None:
    closed = [_report("a:1", CircuitState.CLOSED, 5), _report("b:2", CircuitState.CLOSED, 50)]
    summary = summarize("openai", closed, T0)
    assert (summary.state, summary.describe()) == ("closed", "closed (2 workers)")

    mixed = [
        *closed,
        _report("c:3", CircuitState.OPEN, 1),
        _report("d:4", CircuitState.HALF_OPEN, 1),
    ]
    mixed.append(_report("e:5", CircuitState.OPEN, STALE_AFTER_S + 1))  # killed long ago
    mixed.append(_report("a:1", CircuitState.OPEN, 1, service="llamaparse"))  # another service
    summary = summarize("openai", mixed, T0)
    assert summary.state == "open"
    assert summary.describe() == (
        "open on 1 of 4 (c:3); half_open on 1 of 4 (d:4); closed on 2 of 4; 1 stale report"
    )
    assert [w.stale for w in summary.workers] == [False, False, False, False, True]

    gone = summarize("openai", [_report("e:5", CircuitState.OPEN, STALE_AFTER_S + 1)], T0)
    assert (gone.state, gone.describe()) == ("unknown", "no worker reporting; 1 stale report")
    assert summarize("openai", [], T0).describe() == "no worker reporting"


def test_the_reporter_reports_each_breaker_and_wakes_on_a_transition() -> None:
    now = [0.0]
    breaker = CircuitBreaker("openai", failure_threshold=1, cooldown_s=10, clock=lambda: now[0])
    settings = load_settings(kafka={"client_id": "embed-7"})
    reporter = CircuitReporter(settings, Codec(), [breaker])
    first = reporter.report(breaker)
    assert (first.service, first.state, first.client_id) == ("openai", "closed", "embed-7")
    assert first.worker_id == f"{first.host}:{first.pid}"
    assert not reporter._wake.is_set()
    breaker.record_failure()
    assert reporter._wake.is_set()
    opened = reporter.report(breaker)
    assert opened.state is CircuitState.OPEN and opened.since >= first.since
    now[0] = 11.0  # the cool-down passed: reading the state moves it on
    assert reporter.report(breaker).state is CircuitState.HALF_OPEN


def test_wire_states_are_the_breakers_states() -> None:
    assert [s.value for s in CircuitState] == [s.value for s in BreakerState]


# -- the whole picture -----------------------------------------------------------------------


def _status(settings: Settings) -> Status:
    state = ControlState.from_settings(settings)
    state.apply(ServiceModeChanged(service="openai", mode=ServiceMode.HYBRID))
    throttle = {
        "window": "day",
        "reason": "daily spend",
        "requests": 42,
        "request_budget": 100,
        "occurred_at": T0,
    }
    state.apply(
        ThrottleEvent(
            service="openai",
            state=ThrottleState.WARNING,
            spent_usd=Decimal("4.10"),
            budget_usd=Decimal("5.00"),
            **throttle,  # type: ignore[arg-type]
        )
    )
    state.apply(
        ThrottleEvent(
            service="openai",
            tenant_id="acme",
            state=ThrottleState.THROTTLED,
            spent_usd=Decimal("1.00"),
            budget_usd=Decimal("1.00"),
            **throttle,  # type: ignore[arg-type]
        )
    )
    spec = _spec()
    tp = TopicPartition(spec.topics[0], 0)
    member = Member("embed-1-abc", "embed-1", "10.0.0.1", ((tp.topic, 0),))
    group = group_status(spec, "Stable", (member,), [tp], {tp: 0}, {tp: 9}, {tp: 4}, {tp: 2}, 1.0)
    circuits = [_report("a:1", CircuitState.OPEN, 1)]
    return Status(
        taken_at=T0,
        bootstrap="127.0.0.1:9092",
        prefix="rs",
        sample_s=1.0,
        groups=(group,),
        dlq_topic="rs.dlq",
        dlq_depth=3,
        services=service_statuses(state, circuits, T0),
    )


def test_json_and_tables_carry_everything() -> None:
    settings = load_settings(kafka={"topic_prefix": "rs"})
    status = _status(settings)
    data = json.loads(json.dumps(status.to_json()))
    (group,) = data["groups"]
    assert (group["name"], group["lag"], group["records_per_s"]) == ("embed", 5, 2.0)
    assert group["members"] == [
        {
            "member_id": "embed-1-abc",
            "client_id": "embed-1",
            "host": "10.0.0.1",
            "partitions": [{"topic": "rs.documents.chunked", "partition": 0}],
            "lag": 5,
        }
    ]
    assert data["dlq"] == {"topic": "rs.dlq", "depth": 3}
    llamaparse, openai = data["services"]
    assert llamaparse["throttle"] is None and llamaparse["circuit"]["state"] == "unknown"
    assert openai["mode"] == "hybrid"
    assert openai["throttle"]["state"] == "WARNING" and openai["throttle"]["spent_usd"] == "4.10"
    assert [t["tenant_id"] for t in openai["tenants"]] == ["acme"]
    assert openai["circuit"]["state"] == "open"

    console = Console(record=True, width=200)
    console.print(render(status))
    text = console.export_text()
    assert "partitions" in text and "log end" not in text  # compact: no row per partition
    wide = Console(record=True, width=200)
    wide.print(render(status, partitions=True))
    assert "log end" in wide.export_text()
    for expected in (
        "rs-embed",
        "embed-1",
        "chunked:0",
        "dead letters: 3 in rs.dlq",
        "no usage yet",
        "WARNING (day",
        "$4.10 / $5.00 (82%)",
        "42 / 100",
        "tenants: acme THROTTLED",
        "open on 1 of 1 (a:1)",
    ):
        assert expected in text, expected
