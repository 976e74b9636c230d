"""`--concurrency` inside one process: several documents at once from one partition, each
document's records still in order."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaProducer

from consumers.compose import Providers
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.cost.meter import current_call
from ragstream.providers.parse.local import LocalParser
from ragstream.providers.parse.port import Parser, ParseResult
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Stage, Topology
from tests.integration.pipeline_helpers import variant, wait_until, workers
from tests.integration.test_failures import read_all, wait_status

pytestmark = [pytest.mark.integration]


class SlowParser(Parser):
    """The local parser, 0.3 s per call, noting when each document's call ran."""

    def __init__(self, settings: Settings) -> None:
        self.inner = LocalParser(settings.parse)
        self.running = 0
        self.peak = 0
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult:
        ctx = current_call.get()
        assert ctx is not None
        self.running += 1
        self.peak = max(self.peak, self.running)
        start = time.monotonic()
        try:
            await asyncio.sleep(0.3)
            return await self.inner.parse(data, filename=filename, content_type=content_type)
        finally:
            self.running -= 1
            self.spans[ctx.document_id].append((start, time.monotonic()))


async def test_one_partition_runs_documents_at_once_and_each_in_order(settings: Settings) -> None:
    settings = variant(settings, kafka={"partitions": 1})
    await ensure_topics(settings)
    parser = SlowParser(settings)
    async with (
        workers(settings, concurrency=4, providers=Providers(parser=parser)) as runners,
        Uploader(settings) as up,
        await Store.connect(settings.postgres.dsn()) as store,
    ):
        receipts = [
            await up.upload_bytes(
                f"# Doc {i}\n\nText number {i} for the slow parser.".encode(),
                f"c{i}.md",
                tenant_id="conc",
            )
            for i in range(8)
        ]
        for r in receipts:
            assert await wait_status(store, r.document_id, {"embedded"}) == "embedded"
        assert parser.peak >= 3, parser.peak  # one partition, yet documents at once

        # Three more records for each of two documents, back to back on the one partition:
        # the two documents run side by side, each document's three one after another.
        topology = Topology(settings.kafka.topic_prefix)
        uploaded = {
            r.key: r for r in await read_all(settings, topology.uploaded, want=len(receipts))
        }
        twice = [receipts[0].document_id.encode(), receipts[1].document_id.encode()]
        parser.peak = 0
        (parse_runner,) = [r for r in runners if r.stage is Stage.PARSE]
        before = parse_runner.stats.processed
        producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
        await producer.start()
        try:
            for _ in range(3):
                for key in twice:
                    record = uploaded[key]
                    await producer.send(topology.uploaded, record.value, key=key)
            await producer.flush()
        finally:
            await producer.stop()
        await wait_until(
            lambda: parse_runner.stats.processed >= before + 6, 30, "the six records handled"
        )
        assert parse_runner.stats.processed == before + 6
        assert parser.peak == 2
        for key in twice:
            spans = sorted(parser.spans[key.decode()])[-3:]
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert start >= end, f"records of {key!r} overlapped: {spans}"
