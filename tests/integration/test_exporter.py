"""`ragstream exporter`: lag, committed offsets and members read from outside the groups, so
they tell the truth while a stage has no worker; and the DLQ's depth, whatever restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from consumers.worker import run_workers
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.exporter import GroupExporter
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Stage, Topology
from tests.integration.pipeline_helpers import variant, wait_for_statuses, wait_until
from tests.integration.test_worker_health import _get

pytestmark = [pytest.mark.integration]


def _by_group(text: str, name: str, topic: str | None = None) -> dict[str, float]:
    """`name` summed per `group` label (or under "" when it has none), of one topic if given."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and topic in (None, s.labels.get("topic")):
                key = s.labels.get("group", "")
                out[key] = out.get(key, 0.0) + s.value
    return out


@asynccontextmanager
async def running_exporter(settings: Settings, interval_s: float) -> AsyncIterator[GroupExporter]:
    """The topics made and an exporter serving (on the port `settings` gives) until the end."""
    await ensure_topics(settings)
    exporter = GroupExporter(settings)
    stop = asyncio.Event()
    exporting = asyncio.create_task(exporter.run(stop, interval_s=interval_s))
    try:
        await asyncio.wait_for(exporter.serving.wait(), 30)
        yield exporter
    finally:
        stop.set()
        await asyncio.wait_for(exporting, 30)


def _maxima(text: str, name: str) -> dict[str, float]:
    """The largest sample of `name` per `group` label."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["group"]] = max(out.get(s.labels["group"], 0.0), s.value)
    return out


async def test_lag_shows_while_no_worker_runs_then_drains_and_the_dlq_depth_is_read(
    settings: Settings, store: Store, tenant: str
) -> None:
    settings = variant(settings, observability={"exporter_port": 0})
    topology = Topology(settings.kafka.topic_prefix)
    async with running_exporter(settings, 0.3) as exporter:
        url = f"http://127.0.0.1:{exporter.port}/metrics"

        async with Uploader(settings) as up:
            ids = [
                (await up.upload_bytes(f"# Waiting {i}\n\nNo worker yet.".encode(), f"w{i}.md",
                                       tenant_id=tenant)).document_id
                for i in range(5)
            ]  # fmt: skip

        async def waiting_unread() -> bool:
            text = await asyncio.to_thread(_get, url)
            lag, members = (
                _by_group(text, "ragstream_group_lag"),
                _by_group(text, "ragstream_group_members"),
            )
            return lag.get("parse") == 5 and members.get("parse") == 0

        # No member in the parse group, five records waiting: the exporter says so.
        await wait_until(waiting_unread, 30, "parse lag 5 with no member")

        async def waited(seconds: float) -> bool:
            text = await asyncio.to_thread(_get, url)
            ages = _maxima(text, "ragstream_group_oldest_record_age_seconds")
            return ages.get("parse", 0) >= seconds and ages.get("chunk") == 0

        # The oldest waiting record ages from its timestamp, while nothing reads it.
        await wait_until(lambda: waited(2.0), 30, "the parse group's oldest record 2 s old")

        worker_stop = asyncio.Event()
        workers = asyncio.create_task(run_workers(settings, list(Stage), stop=worker_stop))
        try:
            await wait_for_statuses(store, ids, 90)

            async def drained() -> bool:
                text = await asyncio.to_thread(_get, url)
                lag = _by_group(text, "ragstream_group_lag")
                members = _by_group(text, "ragstream_group_members")
                return all(
                    lag.get(g) == 0 and members.get(g, 0) >= 1 for g in ("parse", "chunk", "embed")
                )

            await wait_until(drained, 60, "every stage's lag back to 0 with a member")
            text = await asyncio.to_thread(_get, url)
            ages = _maxima(text, "ragstream_group_oldest_record_age_seconds")
            assert ages == {"parse": 0, "chunk": 0, "embed": 0, "cost": 0}, ages
        finally:
            worker_stop.set()
            await asyncio.wait_for(workers, 60)

        producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
        await producer.start()
        try:
            an_hour_ago = int((time.time() - 3600) * 1000)
            await producer.send_and_wait(
                topology.dlq, b"a dead letter", key=b"k", timestamp_ms=an_hour_ago
            )
        finally:
            await producer.stop()

        async def one_dead_letter() -> bool:
            text = await asyncio.to_thread(_get, url)
            return _by_group(text, "ragstream_dlq_depth").get("") == 1

        await wait_until(one_dead_letter, 30, "the DLQ depth to read 1")
        text = await asyncio.to_thread(_get, url)
        assert _by_group(text, "ragstream_exporter_up") == {"": 1.0}
        # Its age is the record's own timestamp's, however recently it was read.
        age = _by_group(text, "ragstream_dlq_oldest_age_seconds")[""]
        assert 3600 <= age < 3600 + 120, age
        # The parse group committed each upload partition to its end (-1: nothing to commit).
        samples = [
            s for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("topic") == topology.uploaded
        ]  # fmt: skip
        ends = {
            s.labels["partition"]: s.value for s in samples if s.name == "ragstream_log_end_offset"
        }
        committed = {
            s.labels["partition"]: s.value
            for s in samples
            if s.name == "ragstream_group_committed_offset" and s.labels["group"] == "parse"
        }
        assert sum(ends.values()) == 5
        assert all(committed[p] == end for p, end in ends.items() if end > 0), (committed, ends)
