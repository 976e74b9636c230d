"""Micro-batches of different partitions run at once (`kafka.concurrent_batches`), each in its own
transaction, while each partition's records stay in offset order."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from uuid import uuid4

import pytest
from aiokafka.partitioner import DefaultPartitioner

from consumers.compose import build_stage
from consumers.journey import JourneyRecorder
from consumers.runtime import StageRunner
from consumers.stage import Outcome, RecordContext
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.codec import Codec
from ragstream.events import Event
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Stage
from tests.integration.pipeline_helpers import variant, wait_for_statuses

pytestmark = [pytest.mark.integration]

PARTITIONS = 2
PER_PARTITION = 3


def _ids_per_partition() -> dict[int, list[str]]:
    """Document ids that the upload key puts on each partition, PER_PARTITION each."""
    partitioner, every = DefaultPartitioner(), list(range(PARTITIONS))
    ids: dict[int, list[str]] = defaultdict(list)
    while min((len(ids[p]) for p in every), default=0) < PER_PARTITION:
        document_id = str(uuid4())
        partition = partitioner(document_id.encode(), every, every)
        if len(ids[partition]) < PER_PARTITION:
            ids[partition].append(document_id)
    return ids


async def test_batches_of_two_partitions_run_at_once_each_in_order(
    settings: Settings, store: Store, tenant: str
) -> None:
    settings = variant(settings, kafka={"partitions": PARTITIONS, "concurrent_batches": 2})
    await ensure_topics(settings)
    inner = build_stage(Stage.PARSE, settings, store).handler
    in_hand: set[int] = set()  # partitions with a record in hand now
    both = asyncio.Event()
    peak = 0
    done: dict[int, list[str]] = defaultdict(list)  # per partition, in the order handled

    async def handler(event: Event, ctx: RecordContext) -> Outcome:
        nonlocal peak
        in_hand.add(ctx.partition)
        peak = max(peak, len(in_hand))
        if len(in_hand) == PARTITIONS:
            both.set()
        try:
            # each partition's first record waits for the other partition's batch to start
            await asyncio.wait_for(both.wait(), 20)
            outcome = await inner(event, ctx)
        finally:
            in_hand.discard(ctx.partition)
        done[ctx.partition].append(str(getattr(event, "document_id", "")))
        return outcome

    ids = _ids_per_partition()
    async with Uploader(settings) as up:  # the records wait for the runner, queued up
        for n in range(PER_PARTITION):
            for partition in range(PARTITIONS):
                await up.upload_bytes(
                    f"# Document {partition}-{n}\n\nBatched text {n}.".encode(),
                    f"p{partition}-{n}.md",
                    tenant_id=tenant,
                    document_id=ids[partition][n],
                )
    runner = StageRunner(
        settings, Stage.PARSE, handler, Codec(), JourneyRecorder(store), batching=store.batch
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        every = [i for p in ids.values() for i in p]
        await wait_for_statuses(store, every, 60, statuses=frozenset({"parsed"}))
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert peak == PARTITIONS  # two batches in hand at once
    assert dict(done) == dict(ids)  # each partition's records once, in offset order
    assert runner.stats.batches >= PARTITIONS and runner.stats.retried == 0
    assert runner.stats.processed == PARTITIONS * PER_PARTITION
