"""`ragstream exporter`: every consumer group's health measured from outside the group, as
kafka_exporter and kminion do, so it reads true when a group has no member or a member is stuck.

Every `observability.exporter_interval_s` it reads, with an admin client and a plain consumer
(no group of its own), the same figures `ragstream status` shows, and serves them on
`observability.exporter_port` (/metrics, /healthz, /ready):

    ragstream_group_lag{group,topic,partition}               records after the committed offset
    ragstream_group_committed_offset{group,topic,partition}  -1 while the group has committed none
    ragstream_group_members{group}                           members now (0: nobody reads)
    ragstream_log_end_offset{topic,partition}                the next offset to be written
    ragstream_dlq_depth                                      records on the dead-letter topic
    ragstream_exporter_up                                    1 when the last read succeeded
    ragstream_exporter_last_read_timestamp_seconds           when it last succeeded

`group` is parse, chunk, embed or cost (the accountant's); a group's topics are its input and its
retry topic. Lag is the log end minus the committed offset (the whole retained log while nothing
is committed), whatever the group's members do, so it grows while a stage has no worker and
while a worker holds records it does not finish. Kafka away, or the topics not created yet: the
figures keep their last values, `ragstream_exporter_up` is 0, one log line says why, and it
tries again at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest

from ragstream.errors import RagstreamError
from ragstream.health import HealthServer
from ragstream.settings import Settings
from ragstream.status import Status, StatusReader, flow_groups
from ragstream.topology import Topology

log = structlog.get_logger(__name__)
T = TypeVar("T")


class GroupExporter:
    """The exporter's metrics and its read loop (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology(settings.kafka.topic_prefix)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # its own memory and CPU, as every worker shows
        where = ["group", "topic", "partition"]
        self.lag = Gauge(
            "ragstream_group_lag", "Records after the group's committed offset.", where, registry=r
        )
        self.committed = Gauge(
            "ragstream_group_committed_offset",
            "The group's committed offset (-1: none yet).",
            where,
            registry=r,
        )
        self.members = Gauge(
            "ragstream_group_members", "Members of the group now.", ["group"], registry=r
        )
        self.log_end = Gauge(
            "ragstream_log_end_offset",
            "The partition's log-end offset (the next to be written).",
            ["topic", "partition"],
            registry=r,
        )
        self.dlq_depth = Gauge(
            "ragstream_dlq_depth", "Records on the dead-letter topic.", registry=r
        )
        self.up = Gauge(
            "ragstream_exporter_up",
            "1 when the exporter's last read of Kafka succeeded.",
            registry=r,
        )
        self.reading = False
        self.port: int | None = None
        self.serving = asyncio.Event()
        self.last_read = Gauge(
            "ragstream_exporter_last_read_timestamp_seconds",
            "When the exporter last read Kafka (Unix time).",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, status: Status) -> None:
        """Set the gauges from one status snapshot."""
        for group in status.groups:
            self.members.labels(group.name).set(len(group.members))
            for p in group.partitions:
                labels = (group.name, p.topic, str(p.partition))
                self.lag.labels(*labels).set(p.lag)
                self.committed.labels(*labels).set(-1 if p.committed is None else p.committed)
                self.log_end.labels(p.topic, str(p.partition)).set(p.log_end)
        if status.dlq_depth is not None:
            self.dlq_depth.set(status.dlq_depth)
        self.reading = True
        self.up.set(1)
        self.last_read.set(time.time())

    async def ready(self) -> tuple[bool, dict[str, bool]]:
        return self.reading, {"kafka": self.reading}

    async def run(self, stop: asyncio.Event, interval_s: float | None = None) -> None:
        """Read and serve until `stop`."""
        obs = self.settings.observability
        interval = interval_s or obs.exporter_interval_s
        server = HealthServer(self, obs.metrics_host, obs.exporter_port, self.ready)
        port = self.port = await server.start()
        self.serving.set()
        log.info("exporter serving", url=f"http://{obs.metrics_host}:{port}/metrics")
        groups = flow_groups(self.topology)
        try:
            while not stop.is_set():
                try:
                    async with StatusReader(self.settings, groups) as reader:
                        while not stop.is_set():
                            read = await _unless_stopped(stop, reader.snapshot())
                            if read is None:
                                break  # stopping: a read waiting on an absent broker is dropped
                            self.observe(read[0])
                            await _pause(stop, interval)
                except (RagstreamError, KafkaError) as exc:
                    self.reading = False
                    self.up.set(0)
                    log.warning("exporter cannot read Kafka; trying again", error=str(exc))
                    await _pause(stop, interval)
        finally:
            await server.stop()


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (and `work` cancelled) if `stop` is set first."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run_exporter(settings: Settings) -> None:
    """`ragstream exporter` until SIGTERM/SIGINT."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await GroupExporter(settings).run(stop)
