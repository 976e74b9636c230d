"""A consumer's lag per partition, as the `ragstream_consumer_lag` gauge shows it."""

from __future__ import annotations

import asyncio
from collections.abc import Set
from typing import Protocol, TypeVar

import structlog

from ragstream.metrics.worker import Metrics, TopicPartitionLike

log = structlog.get_logger(__name__)


TP = TypeVar("TP", bound=TopicPartitionLike)


class LagSource(Protocol[TP]):
    """What `observe_lag` reads of a consumer (aiokafka's AIOKafkaConsumer has it)."""

    def assignment(self) -> Set[TP]: ...

    def highwater(self, partition: TP, /) -> int | None: ...

    async def position(self, partition: TP, /) -> int: ...


async def observe_lag(
    metrics: Metrics, stage: str, consumer: LagSource[TP], *, timeout_s: float = 0.5
) -> None:
    """Set the lag of every partition the consumer owns: its high watermark (from the last
    fetch) minus its position. Call it right after a batch's offsets are committed, where the
    position is the committed offset. Never raises: a partition whose numbers are not known
    yet (or that moved during a rebalance) keeps its last value."""
    try:
        async with asyncio.timeout(timeout_s):
            for tp in list(consumer.assignment()):
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                position = await consumer.position(tp)
                metrics.set_lag(stage, tp.topic, tp.partition, highwater - position)
    except Exception as exc:  # metrics must never stop a consumer
        log.debug("consumer lag not observed", stage=stage, error=repr(exc))
