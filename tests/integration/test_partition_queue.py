"""A partition being worked on is not paused: records fetched meanwhile queue behind its task,
in offset order, and a record held by the budget sends the queue back to be fetched again.

(A paused partition is left out of the fetch requests, and one resumed waits for the long poll
of the other partitions in flight: pausing every partition while it was worked on made a busy
stage wait up to `fetch_max_wait_ms` after each batch.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from consumers.compose import build_stage
from consumers.journey import JourneyRecorder
from consumers.runtime import StageRunner
from consumers.stage import Outcome, RecordContext
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.codec import Codec
from ragstream.errors import BudgetExceeded
from ragstream.events import Event
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Stage
from tests.integration.pipeline_helpers import (
    make_corpus,
    variant,
    wait_for_statuses,
    wait_until,
)

pytestmark = [pytest.mark.integration]


async def test_records_fetched_while_a_partition_works_queue_behind_it_in_order(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    settings = variant(settings, kafka={"partitions": 1})
    await ensure_topics(settings)
    inner = build_stage(Stage.PARSE, settings, store).handler
    release = asyncio.Event()
    handled: list[str] = []  # document ids, in the order their records were done
    paused_in_hand: list[bool] = []  # was the record's partition paused while it was in hand?
    held: set[str] = set()
    ids: list[str] = []

    async def handler(event: Event, ctx: RecordContext) -> Outcome:
        assert runner.consumer is not None
        paused_in_hand.append(TopicPartition(ctx.topic, ctx.partition) in runner.consumer.paused())
        if not handled:
            await release.wait()  # the first record is slow: the others arrive meanwhile
        document_id = str(getattr(event, "document_id", ""))
        if document_id == ids[1] and document_id not in held:
            held.add(document_id)  # the service-wide budget says no, once: the record is held
            raise BudgetExceeded("the budget is spent", service="llamaparse")
        outcome = await inner(event, ctx)
        handled.append(document_id)
        return outcome

    runner = StageRunner(settings, Stage.PARSE, handler, Codec(), JourneyRecorder(store))
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await wait_until(lambda: runner.assigned.is_set(), 30, "the runner got no partitions")
        paths = make_corpus(tmp_path / "in", 4)
        async with Uploader(settings) as up:
            ids.append((await up.upload_file(paths[0], tenant_id=tenant)).document_id)
            await wait_until(lambda: bool(paused_in_hand), 30, "the first record never came")
            for path in paths[1:]:
                ids.append((await up.upload_file(path, tenant_id=tenant)).document_id)
        tp = TopicPartition(runner.input_topic, 0)

        def queued() -> int:
            return len(runner._queued.get(tp, []))

        await wait_until(lambda: queued() == 3, 30, "the later records did not queue")
        assert paused_in_hand == [False]
        release.set()
        await wait_for_statuses(store, ids, 60, statuses=frozenset({"parsed"}))
        await wait_until(lambda: len(handled) == 4, 10, "not every record was done")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert held == {ids[1]}
    assert handled == ids  # in offset order, each once, the held one and those behind it after
    assert runner.stats.processed == 4 and runner.stats.dead_lettered == 0
