"""aiokafka against this Kafka 4.x broker: every client feature ragstream relies on."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.structs import OffsetAndMetadata

from ragstream.admin import admin_client
from ragstream.settings import Settings

pytestmark = pytest.mark.integration


async def test_idempotent_produce_group_consume_commit_and_time_lookup(settings: Settings) -> None:
    topic = f"{settings.kafka.topic_prefix}.client-check"
    async with admin_client(settings) as admin:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    opts = settings.kafka.client_options()

    producer = AIOKafkaProducer(**opts, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        first = await producer.send_and_wait(topic, b"early", key=b"doc-1")
        boundary_ms = int(time.time() * 1000) + 50
        await asyncio.sleep(0.1)  # the next records are stamped after the boundary
        later = [
            await producer.send_and_wait(topic, b"late-%d" % i, key=b"doc-1") for i in range(3)
        ]
    finally:
        await producer.stop()
    # One key → one partition, offsets in order: what per-document ordering depends on.
    assert {m.partition for m in [first, *later]} == {first.partition}
    assert [m.offset for m in later] == [first.offset + 1, first.offset + 2, first.offset + 3]

    group = f"{settings.kafka.topic_prefix}-client-check"
    tp = TopicPartition(topic, first.partition)
    consumer = AIOKafkaConsumer(
        topic, **opts, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        while len(values) < 4:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "nothing consumed"
            values += [r.value or b"" for recs in batch.values() for r in recs]
        assert values == [b"early", b"late-0", b"late-1", b"late-2"]
        # Manual commit of an explicit offset, then read it back.
        await consumer.commit({tp: OffsetAndMetadata(first.offset + 2, "")})
        assert await consumer.committed(tp) == first.offset + 2
        # offsets_for_times: the first record at or after the boundary.
        found = await consumer.offsets_for_times({tp: boundary_ms})
        assert found[tp] is not None and found[tp].offset == later[0].offset
        ends = await consumer.end_offsets([tp])
        assert ends[tp] == later[-1].offset + 1
    finally:
        await consumer.stop()

    # The admin client reads the group's committed offsets and its (now empty) membership.
    async with admin_client(settings) as admin:
        offsets = await admin.list_consumer_group_offsets(group)
        assert offsets[tp].offset == first.offset + 2
        groups = {g[0] for g in await admin.list_consumer_groups()}
        assert group in groups
        (described,) = (await admin.describe_consumer_groups([group]))[0].groups
        assert described[2] == "Empty"  # state after the member left
