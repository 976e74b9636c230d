"""The shipped alert rules against a real Prometheus scraping a real exporter, in the outages
they are for: workers stopped with records waiting, a worker hung on a slow call, dead letters
then a worker restart. The rules run as shipped with time scaled 60:1 (minutes become seconds,
the 15-minute age threshold 15 s), so each outage takes seconds, not a quarter of an hour."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumers.worker import run_workers
from producers.upload import Uploader
from ragstream.settings import Settings
from ragstream.topology import Stage, Topology
from tests.integration.pipeline_helpers import variant
from tests.integration.test_cost import paid_settings
from tests.integration.test_exporter import running_exporter
from tests.integration.test_observability import (
    PROMETHEUS_DIR,
    PrometheusProcess,
    dashboard_expressions,
    running_prometheus,
)
from tests.servers.openai_server import OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def scaled_rules(directory: Path) -> Path:
    """alerts.yml with every duration in minutes read as seconds, and the age threshold too."""
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    text = re.sub(r"for: (\d+)m\b", r"for: \1s", text)
    text = re.sub(r"\[(\d+)m\]", r"[\1s]", text)
    text, ages = re.subn(
        r"oldest_record_age_seconds\) > 900", "oldest_record_age_seconds) > 15", text
    )
    assert ages == 1, "the oldest-record rule's threshold moved: update this test"
    out = directory / "alerts.scaled.yml"
    out.write_text(text)
    return out


async def firing(prometheus: PrometheusProcess, alert: str, group: str, timeout_s: float) -> None:
    await prometheus.wait_for(
        f'ALERTS{{alertname="{alert}",alertstate="firing",group="{group}"}}', timeout_s
    )


async def test_the_alerts_fire_in_the_outages_they_are_for(
    settings: Settings, tmp_path: Path
) -> None:
    settings = variant(settings, observability={"exporter_port": 0})
    topology = Topology(settings.kafka.topic_prefix)
    async with running_exporter(settings, 0.5) as exporter:
        targets = {"ragstream-exporter": [f"127.0.0.1:{exporter.port}"]}
        with running_prometheus(tmp_path, targets, scaled_rules(tmp_path)) as prometheus:
            # 1. No worker at all, documents waiting: unread, no member (the accountant's
            # group too, which has nothing waiting), then too old.
            async with Uploader(settings) as up:
                for i in range(3):
                    body = f"# Waiting {i}\n\nNothing reads this yet, {i}.".encode()
                    await up.upload_bytes(body, f"w{i}.md", tenant_id="alerts")
            producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
            await producer.start()
            try:  # not Avro: the parse stage will dead-letter it as a poison pill
                await producer.send_and_wait(topology.uploaded, b"\x00garbage", key=b"poison")
            finally:
                await producer.stop()
            await firing(prometheus, "RagstreamGroupUnread", "parse", 60)
            await firing(prometheus, "RagstreamGroupNoMember", "cost", 30)
            await firing(prometheus, "RagstreamGroupRecordsOld", "parse", 60)
            assert not prometheus.query('ALERTS{alertname="RagstreamGroupStuck"}')

            # 2. Workers again, but the embedding service answers after 25 s: the embed group
            # has a member, records wait, no commit moves. Stuck, not unread.
            with OpenAIServer(latency_s=25) as server:
                slow = paid_settings(settings, server, tmp_path)
                stop = asyncio.Event()
                workers = asyncio.create_task(
                    run_workers(slow, list(Stage), stop=stop, accountant=True)
                )
                try:
                    await firing(prometheus, "RagstreamGroupStuck", "embed", 90)
                    assert not prometheus.query(
                        'ALERTS{alertname="RagstreamGroupUnread",group=~"embed|parse"}'
                    )
                    # The poison pill went to the DLQ meanwhile: depth and growth, from the topic.
                    await prometheus.wait_for("ragstream_dlq_depth == 1", 30)
                    await prometheus.wait_for(
                        'ALERTS{alertname="RagstreamDeadLetterQueueGrowing",alertstate="firing"}',
                        30,
                    )
                finally:
                    stop.set()
                    await asyncio.wait_for(workers, 90)

            # 3. A worker restart: the depth still reads the truth (a worker's own counters
            # would start again from nothing).
            stop = asyncio.Event()
            parse = asyncio.create_task(run_workers(settings, [Stage.PARSE], stop=stop))
            try:
                joined = await prometheus.wait_for(
                    'timestamp(ragstream_group_members{group="parse"} == 1)', 60
                )
                seen = max(float(series["value"][1]) for series in joined)
                # Scrapes (every second) after the one that first showed the new member.
                await prometheus.wait_for(f"timestamp(ragstream_dlq_depth) > {seen + 1}", 30)
                assert prometheus.query("ragstream_dlq_depth == 1"), "the DLQ depth changed"
                # The dashboard's panels on the exporter's figures all have data.
                exporter_panels = [
                    e for e in dashboard_expressions() if "ragstream_group_" in e or "dlq" in e
                ]
                assert len(exporter_panels) == 5, exporter_panels
                for expr in exporter_panels:
                    assert prometheus.query(expr), expr
            finally:
                stop.set()
                await asyncio.wait_for(parse, 60)
