"""Every event type goes through the real broker and comes back decoded, headers included."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ragstream.admin import describe_topics, ensure_topics
from ragstream.codec import Codec
from ragstream.events import (
    CostUsage,
    DocumentChunked,
    DocumentEmbedded,
    DocumentParsed,
    DocumentUploaded,
    Event,
    ServiceMode,
    ServiceModeChanged,
    ThrottleEvent,
    ThrottleState,
)
from ragstream.settings import Settings
from ragstream.topology import H_CORRELATION_ID, H_EVENT_TYPE, Topology

pytestmark = pytest.mark.integration


def sample_events() -> list[Event]:
    ref = {
        "document_id": str(uuid.uuid4()),
        "tenant_id": "acme",
        "correlation_id": str(uuid.uuid4()),
    }
    at = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    return [
        DocumentUploaded(
            **ref,
            filename="a.pdf",
            content_type="application/pdf",
            size_bytes=3,
            sha256="ab" * 32,
            content=b"%PD",
            metadata={"team": "ml"},
            force=True,
        ),
        DocumentParsed(
            **ref,
            uploaded_at=at,
            parser="local",
            parser_version="local-1",
            source_sha256="ab" * 32,
            content_sha256="cd" * 32,
            page_count=2,
            char_count=1234,
            title="A",
        ),
        DocumentChunked(
            **ref,
            uploaded_at=at,
            chunker_version="md-1",
            content_sha256="cd" * 32,
            chunk_count=3,
            token_count=700,
        ),
        DocumentEmbedded(
            **ref,
            uploaded_at=at,
            chunker_version="md-1",
            embedder="local",
            model="local-hash-v1",
            dimensions=512,
            chunk_count=3,
            new_embeddings=2,
            cached_embeddings=1,
            token_count=700,
        ),
        CostUsage(
            service="openai",
            operation="embeddings",
            model="text-embedding-3-small",
            unit="tokens",
            units=700,
            unit_price_usd=Decimal("0.00000002"),
            cost_usd=Decimal("0.000014"),
            tenant_id="acme",
            document_ids=[ref["document_id"]],
            stage="embed",
            correlation_id=ref["correlation_id"],
        ),
        ThrottleEvent(
            service="openai",
            state=ThrottleState.THROTTLED,
            reason="daily budget reached",
            window="day",
            window_ends_at=at + timedelta(hours=12),
            spent_usd=Decimal("5.01"),
            budget_usd=Decimal("5.00"),
            requests=42,
            request_budget=100,
        ),
        ServiceModeChanged(service="openai", mode=ServiceMode.HYBRID, requested_by="ops"),
    ]


async def test_every_event_type_round_trips_through_kafka(settings: Settings) -> None:
    states = await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    assert {s.name for s in states} >= {topology.uploaded, topology.control, topology.dlq}
    codec = Codec()
    events = sample_events()
    topic = topology.uploaded  # any stage topic carries any bytes; one topic keeps order simple
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                topic, codec.encode(event), key=b"k", headers=codec.headers_for(event)
            )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **settings.kafka.client_options(),
        group_id=topology.group("roundtrip"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got = []
    try:
        while len(got) < len(events):
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "no records came back from the broker"
            for records in batch.values():
                got.extend(records)
    finally:
        await consumer.stop()
    assert [codec.decode(r.value or b"") for r in got] == events
    for record, event in zip(got, events, strict=True):
        headers = dict(record.headers)
        assert headers[H_EVENT_TYPE] == event.EVENT_TYPE.encode()
        corr = getattr(event, "correlation_id", None)
        if corr:
            assert headers[H_CORRELATION_ID] == corr.encode()


async def test_topics_create_is_idempotent_and_control_is_compacted(settings: Settings) -> None:
    first = await ensure_topics(settings)
    second = await ensure_topics(settings)
    assert all(s.action == "exists" for s in second)
    assert [(s.name, s.partitions) for s in first] == [(s.name, s.partitions) for s in second]
    described = {s.name: s for s in await describe_topics(settings)}
    topology = Topology(settings.kafka.topic_prefix)
    assert described[topology.control].config["cleanup.policy"] == "compact"
    assert described[topology.uploaded].partitions == settings.kafka.partitions
    assert described[topology.dlq].config["retention.ms"] == "-1"
