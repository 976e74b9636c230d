"""Topic administration: create the topology idempotently, describe it, and grow a topic."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaConnectionError, KafkaError, for_code

from ragstream.errors import ConfigError, InfrastructureError
from ragstream.kafka_clients import unreachable
from ragstream.settings import Settings
from ragstream.topology import Stage, Topology

_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3
_LEADER_NOT_AVAILABLE = 5
SHOWN_CONFIGS = ("cleanup.policy", "retention.ms", "min.compaction.lag.ms")


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]
    action: str = ""  # created | exists | exists (N partitions, wanted M)


@dataclass(frozen=True)
class Member:
    """A live member of a consumer group and the partitions assigned to it."""

    member_id: str
    client_id: str
    host: str
    partitions: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class GroupDescription:
    """A consumer group as DescribeGroups reports it; state `Dead` when the broker does not
    know the group. `error` is the response's error code (0: none)."""

    group_id: str
    state: str
    members: tuple[Member, ...]
    error: int = 0


async def describe_group(admin: AIOKafkaAdminClient, group_id: str) -> GroupDescription:
    """One group per request: aiokafka 0.14 misreads a DescribeGroups answer about several."""
    responses = await admin.describe_consumer_groups([group_id])
    for response in responses:
        for group in response.groups:
            error, name, state, _ptype, _protocol, members = group[:6]
            if name == group_id:
                return GroupDescription(group_id, state, tuple(map(_member, members)), error)
    return GroupDescription(group_id, "Dead", ())


def _member(raw: Sequence[Any]) -> Member:
    member_id, client_id, host, _metadata, assignment = raw[:5]
    partitions: list[tuple[str, int]] = []
    if assignment:
        decoded = ConsumerProtocolMemberAssignment.decode(assignment)
        partitions = sorted((tp.topic, tp.partition) for tp in decoded.partitions())
    return Member(member_id, client_id, host.lstrip("/"), tuple(partitions))


@asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    kafka = settings.kafka
    client = AIOKafkaAdminClient(**kafka.client_options())
    try:
        await client.start()
    except KafkaError as exc:
        await client.close()
        raise await unreachable(kafka, exc) from exc
    try:
        yield client
    finally:
        await client.close()


def replicated(config: dict[str, str], replication_factor: int) -> dict[str, str]:
    """A topic's config with `min.insync.replicas` one below its replication factor: with
    `acks=all`, every write is on two replicas of three before it counts, and one broker can
    be lost without refusing writes."""
    if replication_factor < 2 or "min.insync.replicas" in config:
        return config
    return {**config, "min.insync.replicas": str(replication_factor - 1)}


async def ensure_topics(settings: Settings) -> list[TopicState]:
    """Create every topic of the topology that does not exist yet. Never alters existing ones."""
    topology = Topology(settings.kafka.topic_prefix)
    specs = topology.topics(settings.kafka.partitions)
    async with admin_client(settings) as admin:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        s.name,
                        s.partitions,
                        settings.kafka.replication_factor,
                        topic_configs=replicated(s.config, settings.kafka.replication_factor),
                    )
                    for s in missing
                ]
            )
            for topic, code, message in response.topic_errors:
                if code and code != _TOPIC_ALREADY_EXISTS:
                    err = for_code(code)
                    raise InfrastructureError(
                        f"cannot create topic {topic}: {err.__name__}: {message}"
                    )
        states = await _describe_when_ready(admin, [s.name for s in specs])
    created = {s.name for s in missing}
    wanted = {s.name: s.partitions for s in specs}
    out = []
    for st in states:
        if st.name in created:
            action = "created"
        elif st.partitions != wanted[st.name]:
            action = f"exists ({st.partitions} partitions, config asks {wanted[st.name]})"
        else:
            action = "exists"
        out.append(TopicState(st.name, st.partitions, st.replication_factor, st.config, action))
    return out


async def describe_topics(settings: Settings) -> list[TopicState]:
    """The topology's topics as the broker sees them (missing ones are left out)."""
    topology = Topology(settings.kafka.topic_prefix)
    names = [s.name for s in topology.topics(settings.kafka.partitions)]
    async with admin_client(settings) as admin:
        existing = set(await admin.list_topics())
        return await _describe_when_ready(admin, [n for n in names if n in existing])


class _NotReady(KafkaError):  # type: ignore[misc]  # aiokafka is untyped
    """A topic just created is not known to every part of the broker yet."""


async def _describe_when_ready(
    admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 10.0
) -> list[TopicState]:
    # CreateTopics returns once the controller has the topics; for a moment after, the broker
    # may still answer "unknown topic" (or a topic without leaders) until its metadata catches up.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await _describe(admin, names)
        except _NotReady:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _describe(admin: AIOKafkaAdminClient, names: list[str]) -> list[TopicState]:
    if not names:
        return []
    meta = {t["topic"]: t for t in await admin.describe_topics(names)}
    for name in names:
        code = meta[name]["error_code"] if name in meta else _UNKNOWN_TOPIC
        if code in (_UNKNOWN_TOPIC, _LEADER_NOT_AVAILABLE):
            raise _NotReady(f"topic {name}: code {code}")
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    )
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            error_code, _msg, _rtype, rname, entries = resource[:5]
            if error_code == _UNKNOWN_TOPIC:
                raise _NotReady(f"describe configs of {rname}: unknown topic")
            if error_code:
                raise KafkaError(f"describe configs of {rname} failed: code {error_code}")
            configs[rname] = {e[0]: e[1] for e in entries if e[0] in SHOWN_CONFIGS}
    out = []
    for name in names:
        parts = meta[name]["partitions"]
        rf = len(parts[0]["replicas"]) if parts else 0
        out.append(TopicState(name, len(parts), rf, configs.get(name, {})))
    return out


# -- growing a topic -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleResult:
    topic: str
    before: int
    after: int

    @property
    def keys_moved(self) -> float:
        return keys_moved(self.before, self.after)


def keys_moved(before: int, after: int) -> float:
    """The share of keys whose partition changes when a topic goes from `before` to `after`
    partitions. Kafka's default partitioner maps a key to murmur2(key) mod the partition
    count; for evenly spread hashes that is the share of residues r mod lcm(before, after)
    with r mod before != r mod after."""
    period = math.lcm(before, after)
    same = sum(1 for r in range(period) if r % before == r % after)
    return 1 - same / period


def resolve_topic(topology: Topology, name: str, existing: set[str]) -> str:
    """A topic named by a stage (`embed`: the topic the embed group reads), by its full name, or
    by its name without the prefix (`documents.chunked`). ConfigError when there is none."""
    candidates = []
    if name in {s.value for s in Stage}:
        candidates.append(topology.input_topic(Stage(name)))
    candidates += [name, f"{topology.prefix}.{name}"]
    for topic in candidates:
        if topic in existing:
            return topic
    ours = sorted(t for t in existing if t.startswith(f"{topology.prefix}."))
    known = ", ".join(ours) if ours else f"none with prefix {topology.prefix!r}"
    raise ConfigError(
        f"unknown topic {name!r}: give a stage ({', '.join(s.value for s in Stage)}) or a topic "
        f"name; topics: {known}"
    )


async def scale_topic(settings: Settings, name: str, partitions: int) -> ScaleResult:
    """Grow a topic to `partitions` partitions. Kafka only adds partitions: asking for fewer
    than it has, or as many, is refused (ConfigError) and changes nothing."""
    topology = Topology(settings.kafka.topic_prefix)
    async with admin_client(settings) as admin:
        topic = resolve_topic(topology, name, set(await admin.list_topics()))
        if topic == topology.control:
            raise ConfigError(
                f"{topic} is not scaled: it is compacted and read whole as one ordered log of "
                "the latest state per key; with more partitions an older state could win"
            )
        (current,) = await _describe_when_ready(admin, [topic])
        if partitions <= current.partitions:
            verb = "already has" if partitions == current.partitions else "has"
            raise ConfigError(
                f"{topic} {verb} {current.partitions} partitions; a topic can only grow "
                f"(asked for {partitions}): give --partitions above {current.partitions}"
            )
        try:
            await admin.create_partitions({topic: NewPartitions(partitions)})
        except KafkaConnectionError as exc:
            raise await unreachable(settings.kafka, exc) from exc
        except KafkaError as exc:
            raise InfrastructureError(f"cannot add partitions to {topic}: {exc}") from exc
        deadline = time.monotonic() + 10.0
        while (await _describe_when_ready(admin, [topic]))[0].partitions < partitions:
            if time.monotonic() > deadline:
                raise InfrastructureError(f"{topic} does not show {partitions} partitions yet")
            await asyncio.sleep(0.1)
    return ScaleResult(topic, current.partitions, partitions)
