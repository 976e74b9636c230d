"""A replay against the broker: `plan_replay` reads what the plan needs (moving nothing),
`run_replay` resets the stopped group's offsets or republishes the range.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from ragstream.admin import admin_client, describe_group
from ragstream.codec import Codec
from ragstream.errors import PermanentError, RetryableError
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
from ragstream.operator_input import (
    InvalidInput,
)
from ragstream.replay.plan import GroupState, ReplayPlan, build_partitions
from ragstream.replay.request import RecordFilter, ReplayRefused, ReplayRequest
from ragstream.settings import Settings
from ragstream.topology import Topology

OnProgress = Callable[[int, int], None]  # (records read so far, records in the range)

SKIP_COPY = "copies an earlier replay wrote"
SKIP_UNDECODABLE = "undecodable (they would only be dead-lettered again)"
SKIP_FILTERED = "not taken by the filter"


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
