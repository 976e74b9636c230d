"""Circuit states across worker processes, through the compacted control topic.

Each worker process holds its own circuit breakers (ragstream.providers.circuit), so no single
process knows them all. `CircuitReporter` publishes each breaker's state as a
`CircuitStateChanged` record keyed `circuit:<service>:<worker_id>` (`worker_id` is
`<host>:<pid>`): when the worker starts, on every transition, and again every `REFRESH_S`
while it runs; when the worker stops cleanly it writes a tombstone under each key, so
compaction forgets it. A worker killed without a chance to say goodbye leaves its last report
behind: a report older than `STALE_AFTER_S` is shown as stale and not counted.

`summarize` turns the reports of one service into what `ragstream status` shows. Publishing is
observability: a failure to publish is logged and never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ragstream import kafkaio
from ragstream.codec import Codec
from ragstream.events import CircuitState, CircuitStateChanged, utc_now
from ragstream.kafka_clients import closing
from ragstream.settings import Settings
from ragstream.topology import CONTROL_CIRCUIT, Topology

if TYPE_CHECKING:
    from ragstream.providers.circuit import CircuitBreaker

log = structlog.get_logger(__name__)

REFRESH_S = 60.0
STALE_AFTER_S = 3 * REFRESH_S
UNKNOWN = "unknown"  # no live report for the service
_SEVERITY = {CircuitState.OPEN: 2, CircuitState.HALF_OPEN: 1, CircuitState.CLOSED: 0}


def worker_identity() -> tuple[str, str, int]:
    """(`<host>:<pid>`, host, pid) of this process."""
    host, pid = socket.gethostname(), os.getpid()
    return f"{host}:{pid}", host, pid


def circuit_key(service: str, worker_id: str) -> bytes:
    return Topology.control_key(CONTROL_CIRCUIT, service, worker_id)


class CircuitReporter:
    """Publishes one worker process's breaker states to the control topic (see the module)."""

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        breakers: Sequence[CircuitBreaker],
        *,
        refresh_s: float = REFRESH_S,
        send_timeout_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.breakers = list(breakers)
        self.refresh_s = refresh_s
        self.send_timeout_s = send_timeout_s
        self.worker_id, self.host, self.pid = worker_identity()
        self.topic = Topology(settings.kafka.topic_prefix).control
        self.published = 0
        self._since: dict[str, datetime] = {b.name: utc_now() for b in self.breakers}
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        for breaker in self.breakers:
            breaker.add_listener(self._on_change)

    async def start(self) -> None:
        producer = kafkaio.producer(self.settings)
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            log.warning("circuit states will not be published", error=str(exc))
            return
        self._producer = producer
        self._task = asyncio.create_task(self._run(), name="circuit-reporter")

    async def stop(self) -> None:
        """Stop publishing and remove this worker's reports (tombstones)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer is None:
            return
        try:
            async with asyncio.timeout(self.send_timeout_s):
                for breaker in self.breakers:
                    await self._producer.send_and_wait(
                        self.topic, None, key=circuit_key(breaker.name, self.worker_id)
                    )
        except (KafkaError, TimeoutError) as exc:
            log.warning("circuit reports not withdrawn", error=str(exc) or type(exc).__name__)
        finally:
            await self._producer.stop()

    def report(self, breaker: CircuitBreaker) -> CircuitStateChanged:
        """This worker's report of one breaker, as of now."""
        state = CircuitState(breaker.state.value)  # reading it may move open → half_open
        return CircuitStateChanged(
            service=breaker.name,
            worker_id=self.worker_id,
            host=self.host,
            pid=self.pid,
            client_id=self.settings.kafka.client_id,
            state=state,
            since=self._since[breaker.name],
        )

    def _on_change(self, name: str, old: object, new: object) -> None:
        self._since[name] = utc_now()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            await self._publish_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)

    async def _publish_all(self) -> None:
        assert self._producer is not None
        try:
            async with asyncio.timeout(self.send_timeout_s):
                for breaker in self.breakers:
                    event = self.report(breaker)
                    await self._producer.send_and_wait(
                        self.topic,
                        self.codec.encode(event),
                        key=circuit_key(breaker.name, self.worker_id),
                        headers=self.codec.headers_for(event),
                    )
                    self.published += 1
        except (KafkaError, TimeoutError) as exc:
            log.warning("circuit state not published", error=str(exc) or type(exc).__name__)


async def report_circuits(
    settings: Settings, codec: Codec, stack: AsyncExitStack, breakers: Sequence[CircuitBreaker]
) -> CircuitReporter:
    """Start reporting `breakers` for as long as `stack` is open."""
    reporter = CircuitReporter(settings, codec, breakers)
    await reporter.start()
    stack.push_async_callback(closing(reporter.stop, "withdraw the circuit reports"))
    return reporter


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerCircuit:
    """One worker's last report of one service's breaker."""

    report: CircuitStateChanged
    age_s: float
    stale: bool


@dataclass(frozen=True)
class CircuitSummary:
    """A service's breakers across workers: `state` is the worst live one (open, half_open,
    closed), or `unknown` when no live worker reports."""

    service: str
    state: str
    workers: tuple[WorkerCircuit, ...]

    @property
    def live(self) -> list[WorkerCircuit]:
        return [w for w in self.workers if not w.stale]

    def describe(self) -> str:
        live, stale = self.live, len(self.workers) - len(self.live)
        if not live:
            text = "no worker reporting"
        elif all(w.report.state is CircuitState.CLOSED for w in live):
            text = f"closed ({len(live)} worker{'s' if len(live) != 1 else ''})"
        else:
            parts = []
            for state in (CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED):
                holders = [w.report.worker_id for w in live if w.report.state is state]
                if holders:
                    who = f" ({', '.join(holders)})" if state is not CircuitState.CLOSED else ""
                    parts.append(f"{state.value} on {len(holders)} of {len(live)}{who}")
            text = "; ".join(parts)
        return text + (f"; {stale} stale report{'s' if stale != 1 else ''}" if stale else "")


def summarize(
    service: str,
    reports: Iterable[CircuitStateChanged],
    now: datetime,
    *,
    stale_after_s: float = STALE_AFTER_S,
) -> CircuitSummary:
    workers = []
    for report in reports:
        if report.service != service:
            continue
        age = max(0.0, (now - report.occurred_at).total_seconds())
        workers.append(WorkerCircuit(report, age, age > stale_after_s))
    workers.sort(key=lambda w: w.report.worker_id)
    live = [w.report.state for w in workers if not w.stale]
    state = max(live, key=lambda s: _SEVERITY[s]).value if live else UNKNOWN
    return CircuitSummary(service, state, tuple(workers))
