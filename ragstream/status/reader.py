"""Reading the broker for a status: committed offsets, log extents, groups, the control topic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ragstream.admin import Member, admin_client, describe_group
from ragstream.codec import Codec
from ragstream.control import ControlState
from ragstream.errors import ConfigError, DecodeError, RetryableError
from ragstream.events import CircuitStateChanged, utc_now
from ragstream.kafkaio import Extent, group_less_consumer, patiently, read_to_end
from ragstream.settings import Settings
from ragstream.status.model import (
    GroupSpec,
    Offsets,
    Status,
    group_status,
    resolve_groups,
    service_statuses,
)
from ragstream.topology import Topology

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
