"""Purge: delete dead letters before a time or below given offsets (Kafka's DeleteRecords)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from aiokafka import TopicPartition
from aiokafka.admin import RecordsToDelete

from ragstream.admin import admin_client
from ragstream.dlq.read import DeadLetters
from ragstream.kafkaio import (
    kafka_errors,
)
from ragstream.operator_input import InvalidInput, epoch_ms
from ragstream.settings import Settings

# -- purge -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgePartition:
    partition: int
    low: int  # the first offset now
    end: int
    delete_before: int  # the first offset after the purge

    @property
    def count(self) -> int:
        return max(0, self.delete_before - self.low)


@dataclass(frozen=True, slots=True)
class PurgePlan:
    dlq_topic: str
    partitions: tuple[PurgePartition, ...]

    @property
    def total(self) -> int:
        return sum(p.count for p in self.partitions)


async def plan_purge(
    settings: Settings,
    *,
    before: datetime | None = None,
    up_to: Mapping[int, int] | None = None,
) -> PurgePlan:
    """What a purge would delete: records older than `before`, or, per partition in `up_to`,
    the records below the given offset (which becomes the partition's first record)."""
    if (before is None) == (up_to is None):
        raise InvalidInput("give one of --before TIME or --up-to PARTITION:OFFSET[,...]")
    async with DeadLetters(settings) as dlq:
        if before is not None:
            cut = await dlq.first_offsets_at(epoch_ms(before))
        else:
            assert up_to is not None
            cut = {}
            for partition, offset in up_to.items():
                extent = dlq.extents.get(partition)
                if extent is None:
                    raise InvalidInput(
                        f"--up-to {partition}:{offset}: {dlq.topic} has partitions "
                        f"0..{len(dlq.extents) - 1}"
                    )
                if offset > extent.end:
                    raise InvalidInput(
                        f"--up-to {partition}:{offset}: partition {partition} ends at offset "
                        f"{extent.end} (its last record is {extent.end - 1})"
                    )
                cut[partition] = offset
        parts = tuple(
            PurgePartition(p, e.low, e.end, max(e.low, cut.get(p, e.low)))
            for p, e in sorted(dlq.extents.items())
        )
    return PurgePlan(dlq.topic, parts)


async def purge(settings: Settings, plan: PurgePlan) -> dict[int, int]:
    """Delete what `plan` says (Kafka's DeleteRecords); each partition's new first offset."""
    todo = {
        TopicPartition(plan.dlq_topic, p.partition): RecordsToDelete(p.delete_before)
        for p in plan.partitions
        if p.count
    }
    if not todo:
        return {}
    async with admin_client(settings) as admin:
        with kafka_errors(f"deleting records from {plan.dlq_topic}"):
            lows = await admin.delete_records(todo, timeout_ms=settings.kafka.request_timeout_ms)
    return {tp.partition: low for tp, low in lows.items()}
