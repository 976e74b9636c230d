"""What `ragstream status` shows, and the arithmetic behind it (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from aiokafka import TopicPartition

from ragstream.admin import Member
from ragstream.control import SERVICES, ControlState
from ragstream.errors import ConfigError
from ragstream.events import CircuitStateChanged, ThrottleEvent, ThrottleState
from ragstream.providers.circuit_reports import CircuitSummary, summarize
from ragstream.topology import COST as COST_GROUP
from ragstream.topology import Stage, Topology

Offsets = dict[TopicPartition, int]


# -- the arithmetic ----------------------------------------------------------------------------


def partition_lag(committed: int | None, log_start: int, log_end: int) -> int:
    """Records of one partition the group has still to read: log end minus the committed
    offset, counted from the log start when there is no committed offset or it lies below."""
    position = log_start if committed is None or committed < log_start else committed
    return max(0, log_end - position)


def advance_per_second(
    before: Mapping[Any, int], after: Mapping[Any, int], seconds: float
) -> float:
    """How fast committed offsets moved between two samples: the sum of each key's advance
    (a key missing from either sample, or moved back by a reset, adds nothing) per second."""
    if seconds <= 0:
        return 0.0
    moved = sum(max(0, after[k] - before[k]) for k in after.keys() & before.keys())
    return moved / seconds


# -- what status shows -------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """A consumer group of the flow and the topics it reads."""

    name: str  # parse | chunk | embed | cost
    group_id: str
    topics: tuple[str, ...]


def flow_groups(topology: Topology) -> list[GroupSpec]:
    return [
        GroupSpec(str(c), topology.group(c), (topology.input_topic(c), topology.retry(c)))
        for c in (*Stage, COST_GROUP)
    ]


def resolve_groups(topology: Topology, names: Sequence[str]) -> list[GroupSpec]:
    """The groups asked for by name (`embed`) or group id (`ragstream-embed`); all when none.
    An unknown name is a ConfigError naming the choices."""
    groups = flow_groups(topology)
    if not names:
        return groups
    out = []
    for name in names:
        found = [g for g in groups if name in (g.name, g.group_id)]
        if not found:
            choices = ", ".join(g.name for g in groups)
            raise ConfigError(
                f"unknown group {name!r}: choose one of {choices} (or their group ids, "
                f"{topology.group('<name>')})"
            )
        if found[0] not in out:
            out.append(found[0])
    return out


@dataclass(frozen=True)
class PartitionStatus:
    topic: str
    partition: int
    log_start: int
    log_end: int
    committed: int | None
    lag: int
    member_id: str | None  # who holds it now
    records_per_s: float | None


@dataclass(frozen=True)
class GroupStatus:
    name: str
    group_id: str
    topics: tuple[str, ...]  # the topics it reads, its input first
    state: str  # Stable, PreparingRebalance, CompletingRebalance, Empty, Dead (never seen)
    members: tuple[Member, ...]
    partitions: tuple[PartitionStatus, ...]
    records_per_s: float | None

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def member_lag(self, member_id: str) -> int:
        return sum(p.lag for p in self.partitions if p.member_id == member_id)


@dataclass(frozen=True)
class ServiceStatus:
    service: str
    mode: str
    throttle: ThrottleEvent | None  # the service-wide state; None: no usage yet
    tenants: tuple[ThrottleEvent, ...]  # per-tenant states that are not OPEN
    circuit: CircuitSummary


@dataclass(frozen=True)
class Status:
    taken_at: datetime
    bootstrap: str
    prefix: str
    sample_s: float | None  # the time between the two offset samples (None: no rate)
    groups: tuple[GroupStatus, ...]
    dlq_topic: str
    dlq_depth: int | None  # None: no DLQ topic
    services: tuple[ServiceStatus, ...] = field(default=())
    dlq_offsets: tuple[tuple[int, int, int], ...] = ()  # (partition, log start, log end)
    # Partitions with fewer replicas in sync than assigned: (topic, partition, in sync, replicas)
    under_replicated: tuple[tuple[str, int, int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _plain(
            {
                "taken_at": self.taken_at,
                "bootstrap": self.bootstrap,
                "prefix": self.prefix,
                "sample_s": self.sample_s,
                "groups": [_group_json(g) for g in self.groups],
                "dlq": {"topic": self.dlq_topic, "depth": self.dlq_depth},
                "under_replicated": [
                    {"topic": t, "partition": p, "in_sync": isr, "replicas": n}
                    for t, p, isr, n in self.under_replicated
                ],
                "services": [_service_json(s) for s in self.services],
            }
        )
        return out


def _group_json(group: GroupStatus) -> dict[str, Any]:
    return {
        "name": group.name,
        "group_id": group.group_id,
        "topics": list(group.topics),
        "state": group.state,
        "lag": group.lag,
        "records_per_s": group.records_per_s,
        "members": [
            {
                "member_id": m.member_id,
                "client_id": m.client_id,
                "host": m.host,
                "partitions": [{"topic": t, "partition": p} for t, p in m.partitions],
                "lag": group.member_lag(m.member_id),
            }
            for m in group.members
        ],
        "partitions": [vars(p) for p in group.partitions],
    }


def _throttle_json(event: ThrottleEvent) -> dict[str, Any]:
    return {
        "state": event.state.value,
        "tenant_id": event.tenant_id,
        "window": event.window,
        "window_ends_at": event.window_ends_at,
        "spent_usd": event.spent_usd,
        "budget_usd": event.budget_usd,
        "requests": event.requests,
        "request_budget": event.request_budget,
        "reason": event.reason,
        "as_of": event.occurred_at,
    }


def _service_json(service: ServiceStatus) -> dict[str, Any]:
    circuit = service.circuit
    return {
        "service": service.service,
        "mode": service.mode,
        "throttle": _throttle_json(service.throttle) if service.throttle else None,
        "tenants": [_throttle_json(t) for t in service.tenants],
        "circuit": {
            "state": circuit.state,
            "summary": circuit.describe(),
            "workers": [
                {
                    "worker_id": w.report.worker_id,
                    "host": w.report.host,
                    "pid": w.report.pid,
                    "client_id": w.report.client_id,
                    "state": w.report.state.value,
                    "since": w.report.since,
                    "reported_at": w.report.occurred_at,
                    "stale": w.stale,
                }
                for w in circuit.workers
            ],
        },
    }


def _plain(value: Any) -> Any:
    """JSON-ready: datetimes as ISO 8601, decimals as strings, floats rounded."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def service_statuses(
    state: ControlState, circuits: Iterable[CircuitStateChanged], now: datetime
) -> tuple[ServiceStatus, ...]:
    reports = list(circuits)
    out = []
    for service in SERVICES:
        tenants = tuple(
            event
            for (name, tenant), event in sorted(
                state.throttles.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
            )
            if name == service and tenant is not None and event.state is not ThrottleState.OPEN
        )
        out.append(
            ServiceStatus(
                service,
                state.mode(service).value,
                state.throttles.get((service, None)),
                tenants,
                summarize(service, reports, now),
            )
        )
    return tuple(out)


def group_status(
    spec: GroupSpec,
    state: str,
    members: Sequence[Member],
    partitions: Sequence[TopicPartition],
    starts: Mapping[TopicPartition, int],
    ends: Mapping[TopicPartition, int],
    committed: Offsets,
    before: Offsets | None,
    seconds: float | None,
) -> GroupStatus:
    """One group's status from offsets already read (pure: no I/O)."""
    owners = {tp: m.member_id for m in members for tp in m.partitions}
    rows = []
    for tp in sorted(partitions):
        rate = None
        if before is not None and seconds:
            rate = advance_per_second(_only(before, [tp]), _only(committed, [tp]), seconds)
        rows.append(
            PartitionStatus(
                tp.topic,
                tp.partition,
                starts[tp],
                ends[tp],
                committed.get(tp),
                partition_lag(committed.get(tp), starts[tp], ends[tp]),
                owners.get((tp.topic, tp.partition)),
                rate,
            )
        )
    total = None
    if before is not None and seconds:
        total = advance_per_second(_only(before, partitions), _only(committed, partitions), seconds)
    return GroupStatus(
        spec.name, spec.group_id, spec.topics, state, tuple(members), tuple(rows), total
    )


def _only(offsets: Offsets, partitions: Iterable[TopicPartition]) -> Offsets:
    return {tp: offsets[tp] for tp in partitions if tp in offsets}
