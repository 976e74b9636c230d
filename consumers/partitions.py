"""A stage runner's partitions: each partition's records in a task of its own (records fetched
meanwhile queue behind it), in order per partition or per key, commits past the finished prefix, waits for due
times and the budget, and hand-back on revocation or shutdown.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from consumers.handling import (
    Handled,
    _now_ms,
    batches,
)
from consumers.policy import (
    Hold,
)
from ragstream.headers import (
    retry_due_ms,
)

if TYPE_CHECKING:
    from consumers.runtime import StageRunner

log = structlog.get_logger("consumers.runtime")  # one logger for the runtime's lines


class PartitionWork:
    """A stage runner's partitions (a part of StageRunner)."""

    def _apply_gate(self: StageRunner) -> None:  # type: ignore[misc]  # a part of StageRunner
        """Pause every assigned partition while the budget gate is closed or a dependency is
        away; resume when both allow."""
        assert self.consumer is not None
        budget = self.gate() if self.gate is not None else None
        reason = self.watch.reason or budget
        was, self.blocked = self.blocked, reason
        self.metrics.set_stage_paused(self.name, bool(budget))
        if bool(reason) == bool(was):
            return
        if reason:
            log.warning("consumer paused", stage=self.name, reason=reason)
            self.consumer.pause(*self.consumer.assignment())
        else:
            log.info("consumer resumed", stage=self.name)
            for tp in self.consumer.assignment():
                self._resume(tp)

    def _resume(self: StageRunner, tp: TopicPartition) -> None:  # type: ignore[misc]  # a part of StageRunner
        """Resume a partition unless it waits for a due time, its queue is full, or the gate
        is closed."""
        assert self.consumer is not None
        if (
            self.blocked is None
            and tp not in self._waiting
            and len(self._queued.get(tp, ())) < self.max_poll_records
            and tp in self.consumer.assignment()
        ):
            self.consumer.resume(tp)

    def _resume_due(self: StageRunner) -> int:  # type: ignore[misc]  # a part of StageRunner
        """Resume partitions whose wait is over; return how long to poll (ms)."""
        now = _now_ms()
        for tp, due in list(self._waiting.items()):
            if due <= now:
                del self._waiting[tp]
                self._resume(tp)
        if not self._waiting:
            return 500
        return max(10, min(500, min(self._waiting.values()) - now))

    def _dispatch(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Hand a partition's records to a task of their own, or queue them behind the task
        it has, so the loop keeps polling (no max.poll.interval.ms breach, however long a
        record takes) while one document's records stay in order. A full queue pauses the
        partition until its task takes the queue."""
        assert self.consumer is not None
        if tp in self._inflight:
            queue = self._queued.setdefault(tp, [])
            queue.extend(records)
            if len(queue) >= self.max_poll_records:
                self.consumer.pause(tp)
            return
        self._inflight[tp] = asyncio.create_task(self._run_partition(tp, records))

    async def _run_partition(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Run the records, then what queued behind them meanwhile, while the partition may
        go on."""
        while records:
            await self._run_records(tp, records)
            records = self._take_queue(tp)

    def _take_queue(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, tp: TopicPartition
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """The records queued behind a partition's task, if it may go on with them; else none
        (fetched again later from the first of them, unless the partition is handed back)."""
        more = self._queued.pop(tp, [])
        if not more:
            return []
        stopped = self._stop is not None and self._stop.is_set()
        handing_back = stopped or tp in self._stopping or tp not in self.assignment
        if handing_back or self.blocked is not None or tp in self._waiting:
            if not handing_back:
                self._rewind(tp, more[0].offset)
            return []
        self._resume(tp)  # its queue is taken: a partition paused by a full queue goes on
        return more

    def _rewind(self: StageRunner, tp: TopicPartition, offset: int) -> None:  # type: ignore[misc]  # a part of StageRunner
        """Fetch a partition again from `offset` (the record it stopped at): records queued
        after it are dropped and come again, in order."""
        assert self.consumer is not None
        self._queued.pop(tp, None)
        self.consumer.seek(tp, offset)

    async def _run_records(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        if tp.topic == self.retry_topic or self.concurrency == 1:
            async with self._gate:
                if tp.topic != self.retry_topic and self.batching is not None:
                    await self._run_batches(tp, records)
                    return
                for record in records:
                    if tp in self._stopping:
                        return  # revoked or shutting down: the rest go back uncommitted
                    if tp.topic == self.retry_topic and self._not_yet_due(tp, record):
                        return
                    if not self._settle(tp, record, await self._handle_record(record)):
                        return
            return
        await self._run_by_key(tp, records)

    async def _run_batches(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Run a partition's records as micro-batches (see `_handle_batch`); the committed offset
        is the end of the finished prefix, as record by record."""
        for run in batches(records, self.batch_size):
            if tp in self._stopping:
                return  # revoked or shutting down: the rest go back uncommitted
            for record, handled in zip(run, await self._handle_batch(run), strict=True):
                if not self._settle(tp, record, handled):
                    return

    def _settle(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        handled: Handled,
    ) -> bool:
        """Move the partition's commit past a finished record; False when the partition stops
        at it (handed back, or held by the budget)."""
        if handled is Handled.RELEASED:
            return False
        if handled is Handled.HOLD:
            self._hold(tp, record)
            return False
        self._pending[tp] = record.offset + 1
        return True

    async def _run_by_key(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Run a batch as one lane per key (document): lanes run at once, up to `concurrency`
        records in the process, and each lane in offset order, so one document's records keep
        their order. The committed offset is the end of the batch's finished prefix; if the
        budget held a record, the partition is held at the first unfinished one (records after
        it that finished are handled again later: every write is idempotent)."""
        lanes: dict[bytes | None, list[ConsumerRecord[bytes, bytes]]] = {}
        for record in records:
            lanes.setdefault(record.key, []).append(record)
        done: set[int] = set()
        held = asyncio.Event()

        async def lane(queue: list[ConsumerRecord[bytes, bytes]]) -> None:
            for record in queue:
                if held.is_set() or tp in self._stopping:
                    return  # the budget said no, or the partition is being handed back
                async with self._gate:
                    handled = await self._handle_record(record)
                if handled is not Handled.DONE:
                    held.set()
                    return
                done.add(record.offset)

        await asyncio.gather(*(lane(queue) for queue in lanes.values()))
        for record in records:
            if record.offset not in done:
                if tp not in self._stopping:  # held by the budget: wait here
                    self._hold(tp, record)
                break
            self._pending[tp] = record.offset + 1

    async def _reap(self: StageRunner) -> None:  # type: ignore[misc]  # a part of StageRunner
        """Collect finished partition tasks; start what queued behind them since they last
        looked."""
        assert self.consumer is not None
        for tp, task in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[tp]
            task.result()  # a failure here is a bug: the supervisor restarts this consumer
            more = self._take_queue(tp)  # queued after the task last looked
            if more:
                self._inflight[tp] = asyncio.create_task(self._run_partition(tp, more))

    async def _drain(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, grace_s: float, only: set[TopicPartition] | None = None
    ) -> None:
        """Let the records in hand finish for up to `grace_s` and start no more of the batch;
        then hand the rest back (cancel). Offsets of records not finished stay uncommitted, so
        the next owner processes them."""
        tasks = {tp: t for tp, t in self._inflight.items() if only is None or tp in only}
        if not tasks:
            return
        self._stopping |= set(tasks)
        try:
            _, late = await asyncio.wait(tasks.values(), timeout=grace_s)
        finally:
            self._stopping -= set(tasks)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for tp in tasks:
            self._inflight.pop(tp, None)
        if late:
            log.warning("in-flight records handed back", records=len(late))

    def _not_yet_due(  # type: ignore[misc]  # a part of StageRunner
        self: StageRunner, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]
    ) -> bool:
        """Pause a retry partition at a record that is not due yet (other partitions go on)."""
        due = retry_due_ms(record.headers, _now_ms())
        if due is None:
            return False
        assert self.consumer is not None
        self._rewind(tp, record.offset)
        self.consumer.pause(tp)
        self._waiting[tp] = due
        return True

    def _hold(self: StageRunner, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:  # type: ignore[misc]  # a part of StageRunner
        """Keep a record the budget refused where it is: uncommitted, its partition paused,
        and try it again in a few seconds (sooner than the gate would reopen is harmless)."""
        assert self.consumer is not None
        self._rewind(tp, record.offset)
        self.consumer.pause(tp)
        self._waiting[tp] = _now_ms() + int(Hold().recheck_s * 1000)


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish the records in hand and commit them before giving partitions away."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        runner = self.runner
        await runner._drain(runner.settings.kafka.shutdown_grace_s, only=set(revoked))
        await runner.commit_pending()
        for tp in revoked:
            self.runner._waiting.pop(tp, None)
            self.runner._queued.pop(tp, None)  # uncommitted: the next owner reads them
        self.runner.assignment -= set(revoked)
        runner.metrics.drop_lag(runner.name, revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self.runner.consumer
        if self.runner.blocked and consumer is not None and assigned:
            consumer.pause(*assigned)  # a paused consumer takes over partitions paused
        self.runner.assignment = set(assigned)
        self.runner.joined = True
        self.runner.metrics.set_member(self.runner.name, len(assigned))
        log.info(
            "partitions assigned",
            stage=self.runner.name,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )
        self.runner.assigned.set()
