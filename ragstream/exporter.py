"""`ragstream exporter`: every consumer group's health measured from outside the group, as
kafka_exporter and kminion do, so it reads true when a group has no member or a member is stuck.

Every `observability.exporter_interval_s` it reads, with an admin client and a plain consumer
(no group of its own), the same figures `ragstream status` shows, and serves them on
`observability.exporter_port` (/metrics, /healthz, /ready):

    ragstream_group_lag{group,topic,partition}               records after the committed offset
    ragstream_group_committed_offset{group,topic,partition}  -1 while the group has committed none
    ragstream_group_members{group}                           members now (0: nobody reads)
    ragstream_log_end_offset{topic,partition}                the next offset to be written
    ragstream_group_oldest_record_age_seconds{group,topic,partition}
                                                             age of the oldest record not yet
                                                             committed (0: nothing waits)
    ragstream_dlq_depth                                      records on the dead-letter topic
    ragstream_dlq_oldest_age_seconds                         age of its oldest record (0: empty)
    ragstream_under_replicated_partitions                    partitions short of in-sync replicas
    ragstream_exporter_up                                    1 when the last read succeeded
    ragstream_exporter_last_read_timestamp_seconds           when it last succeeded

`group` is parse, chunk, embed or cost (the accountant's); a group's topics are its input and its
retry topic. Lag is the log end minus the committed offset (the whole retained log while nothing
is committed), whatever the group's members do, so it grows while a stage has no worker and
while a worker holds records it does not finish. A record's age is now minus its timestamp
(the time its publisher gave it): the exporter reads the one record at each lagging partition's
committed offset, and the first of each dead-letter partition. Kafka away, or the topics not
created yet: the figures keep their last values, `ragstream_exporter_up` is 0, one log line
says why, and it tries again at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest

from ragstream.errors import RagstreamError
from ragstream.health import HealthServer
from ragstream.kafka_clients import closing
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
        self.oldest_age = Gauge(
            "ragstream_group_oldest_record_age_seconds",
            "Age of the oldest record the group has not committed (0: nothing waits).",
            where,
            registry=r,
        )
        self.dlq_depth = Gauge(
            "ragstream_dlq_depth", "Records on the dead-letter topic.", registry=r
        )
        self.dlq_oldest_age = Gauge(
            "ragstream_dlq_oldest_age_seconds",
            "Age of the oldest record on the dead-letter topic (0: empty).",
            registry=r,
        )
        self.under_replicated = Gauge(
            "ragstream_under_replicated_partitions",
            "Partitions of ragstream's topics with fewer replicas in sync than assigned.",
            registry=r,
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

    def observe(
        self, status: Status, stamps: Mapping[tuple[str, int, int], int] | None = None
    ) -> None:
        """Set the gauges from one status snapshot and the timestamps (ms) of the records at
        the offsets `oldest_offsets` named, keyed by (topic, partition, offset)."""
        now_ms = time.time() * 1000

        def age(topic: str, partition: int, offset: int) -> float:
            stamp = (stamps or {}).get((topic, partition, offset))
            return 0.0 if stamp is None else max(0.0, (now_ms - stamp) / 1000)

        for group in status.groups:
            self.members.labels(group.name).set(len(group.members))
            for p in group.partitions:
                labels = (group.name, p.topic, str(p.partition))
                self.lag.labels(*labels).set(p.lag)
                self.committed.labels(*labels).set(-1 if p.committed is None else p.committed)
                self.log_end.labels(p.topic, str(p.partition)).set(p.log_end)
                waiting = _first_waiting(p.committed, p.log_start, p.log_end)
                at = 0.0 if waiting is None else age(p.topic, p.partition, waiting)
                self.oldest_age.labels(*labels).set(at)
        self.under_replicated.set(len(status.under_replicated))
        if status.dlq_depth is not None:
            self.dlq_depth.set(status.dlq_depth)
            ages = [age(status.dlq_topic, p, start) for p, start, end in status.dlq_offsets]
            self.dlq_oldest_age.set(max(ages, default=0.0))
        self.reading = True
        self.up.set(1)
        self.last_read.set(time.time())

    async def ready(self) -> tuple[bool, dict[str, bool]]:
        return self.reading, {"kafka": self.reading}

    async def run(self, stop: asyncio.Event, interval_s: float | None = None) -> None:
        """Read and serve until `stop`."""
        obs = self.settings.observability
        interval = interval_s or obs.exporter_interval_s
        server = HealthServer(
            self, obs.metrics_host, obs.exporter_port, self.ready,
            scrape_dir=obs.scrape_dir, name="exporter",
        )  # fmt: skip
        port = self.port = await server.start()
        self.serving.set()
        log.info("exporter serving", url=f"http://{obs.metrics_host}:{port}/metrics")
        groups = flow_groups(self.topology)
        try:
            while not stop.is_set():
                try:
                    async with (
                        StatusReader(self.settings, groups) as reader,
                        RecordPeek(self.settings) as peek,
                    ):
                        while not stop.is_set():
                            read = await _unless_stopped(stop, self._read(reader, peek))
                            if read is None:
                                break  # stopping: a read waiting on an absent broker is dropped
                            self.observe(*read)
                            await _pause(stop, interval)
                except (RagstreamError, KafkaError) as exc:
                    self.reading = False
                    self.up.set(0)
                    log.warning("exporter cannot read Kafka; trying again", error=str(exc))
                    await _pause(stop, interval)
        finally:
            await server.stop()

    @staticmethod
    async def _read(
        reader: StatusReader, peek: RecordPeek
    ) -> tuple[Status, dict[tuple[str, int, int], int]]:
        status, _ = await reader.snapshot()
        return status, await peek.timestamps(oldest_offsets(status))


def _first_waiting(committed: int | None, log_start: int, log_end: int) -> int | None:
    """The offset of the oldest record a group has not committed, None when nothing waits
    (the log start when it has committed none, or when retention deleted what it had not read)."""
    first = log_start if committed is None else max(committed, log_start)
    return first if first < log_end else None


def oldest_offsets(status: Status) -> set[tuple[str, int, int]]:
    """(topic, partition, offset) of every record whose age the gauges show: each lagging
    partition's oldest uncommitted record, and each dead-letter partition's first."""
    wanted = set()
    for group in status.groups:
        for p in group.partitions:
            waiting = _first_waiting(p.committed, p.log_start, p.log_end)
            if waiting is not None:
                wanted.add((p.topic, p.partition, waiting))
    for partition, start, end in status.dlq_offsets:
        if start < end:
            wanted.add((status.dlq_topic, partition, start))
    return wanted


class RecordPeek:
    """Reads single records by position, with a consumer of no group (nothing committed) and
    small fetches: only a record's timestamp is wanted."""

    def __init__(self, settings: Settings, timeout_s: float = 3.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> RecordPeek:
        consumer = AIOKafkaConsumer(
            **self.settings.kafka.client_options(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a position retention deleted: its first record
            max_partition_fetch_bytes=16 * 1024,
            fetch_max_bytes=1024 * 1024,
        )
        try:
            await consumer.start()
        except BaseException:
            await closing(consumer.stop, "stop the exporter's peek consumer")()
            raise
        self._consumer = consumer
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._consumer is not None:
            await closing(self._consumer.stop, "stop the exporter's peek consumer")()

    async def timestamps(
        self, wanted: set[tuple[str, int, int]]
    ) -> dict[tuple[str, int, int], int]:
        """The timestamp (ms) of the first record at or after each (topic, partition, offset);
        what is not read within the timeout is left out (its age reads 0 this time)."""
        consumer = self._consumer
        assert consumer is not None
        at = {TopicPartition(t, p): offset for t, p, offset in wanted}
        if not at:
            return {}
        consumer.assign(list(at))
        for tp, offset in at.items():
            consumer.seek(tp, offset)
        found: dict[tuple[str, int, int], int] = {}
        deadline = time.monotonic() + self.timeout_s
        pending = set(at)
        while pending and time.monotonic() < deadline:
            fetched = await consumer.getmany(*pending, timeout_ms=200)
            for tp, records in fetched.items():
                if records and tp in pending:
                    found[(tp.topic, tp.partition, at[tp])] = records[0].timestamp
                    pending.discard(tp)
        return found


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
