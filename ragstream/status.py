"""Where everything stands: `ragstream status`.

Per consumer group (the three stages and the cost accountant): its state, its members (client
id, host) and the partitions each holds, lag per partition and in total, and records per
second. Then the dead-letter topic's depth, and per paid service its mode, circuit state and
throttle state with spend against budget.

Lag is what `kafka-consumer-groups --describe` computes: a partition's log-end offset minus
the group's committed offset. Where the group has no committed offset (it never committed on
that partition, or the partition is new) the whole log counts, from the log start, because
the group reads from the earliest offset; a committed offset below the log start (records
removed by retention) also counts from the log start. Records per second are committed
offsets advancing between two samples, over the time between them.

Modes and throttle states come from the compacted control topic, read whole (the latest
`ThrottleEvent` per service is the cost accountant's last word on spend); circuit states come
from the same topic, where every worker reports its breakers (see ragstream.circuits).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ragstream.admin import Member, admin_client, describe_group
from ragstream.circuits import CircuitSummary, summarize
from ragstream.codec import Codec
from ragstream.control import SERVICES, ControlState
from ragstream.errors import ConfigError, DecodeError, RetryableError
from ragstream.events import CircuitStateChanged, ThrottleEvent, ThrottleState, utc_now
from ragstream.kafkaio import Extent, group_less_consumer, read_to_end
from ragstream.settings import Settings
from ragstream.topology import COST as COST_GROUP
from ragstream.topology import Stage, Topology

Offsets = dict[TopicPartition, int]
T = TypeVar("T")


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


# -- reading the broker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """Committed offsets of every group, and when they were read (monotonic seconds)."""

    at: float
    committed: dict[str, Offsets]


class StatusReader:
    """Open clients for repeated snapshots (`--watch`): `async with StatusReader(...) as r:`."""

    def __init__(self, settings: Settings, groups: Sequence[GroupSpec]) -> None:
        self.settings = settings
        self.groups = list(groups)
        self.topology = Topology(settings.kafka.topic_prefix)
        self.codec = Codec()
        self._stack = AsyncExitStack()
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._control: dict[bytes, bytes] = {}  # the latest value per key (compaction's view)
        self._control_tps: list[TopicPartition] = []
        self._existing: set[str] = set()
        self._under_replicated: tuple[tuple[str, int, int, int], ...] = ()

    async def __aenter__(self) -> StatusReader:
        try:
            admin = await self._stack.enter_async_context(admin_client(self.settings))
            self._admin = admin
            self._consumer = await self._stack.enter_async_context(
                group_less_consumer(self.settings)
            )
            existing = set(await patiently(admin.list_topics))
        except KafkaError as exc:
            await self._stack.aclose()
            raise RetryableError(f"cannot read Kafka: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            await self._stack.aclose()
            raise
        if not any(t in existing for g in self.groups for t in g.topics):
            await self._stack.aclose()
            raise ConfigError(
                f"kafka.topic_prefix: no ragstream topics with prefix {self.topology.prefix!r} "
                f"on {self.settings.kafka.bootstrap_servers} (run `ragstream topics create`, "
                "or check the prefix)"
            )
        self._existing = existing
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def sample(self) -> Sample:
        admin = self._admin
        assert admin is not None
        committed = {}
        for group in self.groups:
            offsets = await patiently(partial(admin.list_consumer_group_offsets, group.group_id))
            committed[group.group_id] = {
                tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0
            }
        return Sample(time.monotonic(), committed)

    async def snapshot(self, previous: Sample | None = None) -> tuple[Status, Sample]:
        """Where everything stands now; rates against `previous` when given."""
        try:
            return await self._snapshot(previous)
        except KafkaError as exc:
            raise RetryableError(f"cannot read Kafka: {type(exc).__name__}: {exc}") from exc

    async def _snapshot(self, previous: Sample | None) -> tuple[Status, Sample]:
        assert self._admin is not None and self._consumer is not None
        topics = sorted({t for g in self.groups for t in g.topics} | {self.topology.dlq})
        sizes = await self._partition_counts([t for t in topics if t in self._existing])
        under_replicated = self._under_replicated  # of these topics (read with their sizes)
        tps = [TopicPartition(t, p) for t, n in sizes.items() for p in range(n)]
        described = await self._describe_groups()
        current = await self.sample()
        starts = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps)
        seconds = current.at - previous.at if previous is not None else None
        groups = []
        for spec in self.groups:
            group_state, members = described.get(spec.group_id, ("Dead", ()))
            own = [tp for tp in tps if tp.topic in spec.topics]
            before = previous.committed.get(spec.group_id) if previous is not None else None
            groups.append(
                group_status(
                    spec,
                    group_state,
                    members,
                    own,
                    starts,
                    ends,
                    current.committed.get(spec.group_id, {}),
                    before,
                    seconds,
                )
            )
        dlq = [tp for tp in tps if tp.topic == self.topology.dlq]
        depth = sum(ends[tp] - starts[tp] for tp in dlq) if dlq else None
        state, circuits = await self._read_control()
        now = utc_now()
        status = Status(
            taken_at=now,
            bootstrap=self.settings.kafka.bootstrap_servers,
            prefix=self.topology.prefix,
            sample_s=seconds,
            groups=tuple(groups),
            dlq_topic=self.topology.dlq,
            dlq_depth=depth,
            services=service_statuses(state, circuits, now),
            dlq_offsets=tuple((tp.partition, starts[tp], ends[tp]) for tp in sorted(dlq)),
            under_replicated=under_replicated,
        )
        return status, current

    async def _partition_counts(self, topics: list[str]) -> dict[str, int]:
        assert self._admin is not None
        if not topics:
            return {}
        admin = self._admin
        described = await patiently(lambda: admin.describe_topics(topics))
        ok = [t for t in described if not t["error_code"]]
        self._under_replicated = tuple(
            sorted(
                (t["topic"], p["partition"], len(p["isr"]), len(p["replicas"]))
                for t in ok
                for p in t["partitions"]
                if len(p["isr"]) < len(p["replicas"])
            )
        )
        return {t["topic"]: len(t["partitions"]) for t in ok}

    async def _describe_groups(self) -> dict[str, tuple[str, tuple[Member, ...]]]:
        admin = self._admin
        assert admin is not None
        out: dict[str, tuple[str, tuple[Member, ...]]] = {}
        for spec in self.groups:
            group = await patiently(partial(describe_group, admin, spec.group_id))
            out[group.group_id] = (group.state, group.members)
        return out

    async def _read_control(self) -> tuple[ControlState, list[CircuitStateChanged]]:
        """Catch up with the control topic (incrementally across snapshots) and decode the
        latest value of every key."""
        assert self._consumer is not None
        consumer = self._consumer
        topic = self.topology.control
        if not self._control_tps and topic in self._existing:
            parts = await self._partition_counts([topic])
            self._control_tps = [TopicPartition(topic, p) for p in range(parts.get(topic, 0))]
            consumer.assign(self._control_tps)
            await consumer.seek_to_beginning(*self._control_tps)
        if self._control_tps:
            # From where the last snapshot stopped to the end now.
            ends = await consumer.end_offsets(self._control_tps)
            ranges = {tp: Extent(await consumer.position(tp), ends[tp]) for tp in ends}
            stall_s = self.settings.kafka.request_timeout_ms / 1000
            async for records in read_to_end(consumer, ranges, stall_s):
                for record in records:
                    if record.key is None:
                        continue
                    if record.value is None:
                        self._control.pop(record.key, None)
                    else:
                        self._control[record.key] = record.value
        state = ControlState.from_settings(self.settings)
        circuits = []
        for value in self._control.values():
            try:
                event = self.codec.decode(value)
            except DecodeError:
                continue  # written by a newer version, or not ours: not status's to judge
            if isinstance(event, CircuitStateChanged):
                circuits.append(event)
            else:
                state.apply(event)
        return state, circuits


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


async def read_status(
    settings: Settings, groups: Sequence[str] = (), *, sample_s: float = 1.0
) -> Status:
    """One status: committed offsets sampled twice `sample_s` apart (0: once, no rates)."""
    specs = resolve_groups(Topology(settings.kafka.topic_prefix), groups)
    async with StatusReader(settings, specs) as reader:
        first = None
        if sample_s > 0:
            first = await reader.sample()
            await asyncio.sleep(sample_s)
        status, _ = await reader.snapshot(first)
    return status
