"""`ragstream worker all`: each stage, and the cost accountant, in a process of its own.

    parent (this module)          serves /metrics, /healthz and /ready on observability.metrics_port
      ├─ ragstream worker parse   each serves its own on a free port the parent picked
      ├─ ragstream worker chunk
      ├─ ragstream worker embed
      ├─ ragstream worker cost
      └─ ragstream exporter       the groups seen from outside (ragstream.exporter)

Why processes: the stages' Python work no longer shares one interpreter lock, so on a 2-core
machine parse, chunk and embed run side by side; a crash or a leak stays in its process.

The parent supervises: a child that exits while the parent runs is logged with its exit code,
counted in `ragstream_worker_process_restarts_total{worker}` and started again with backoff (1 s doubling
to 30 s; reset after a minute of running). A child that exits with the configuration error
code (2: a wrong setting, which only an operator can fix) stops them all, and the parent exits
with it. SIGTERM or SIGINT to the parent is passed on to every child, which finishes its
records in hand (`kafka.shutdown_grace_s`); a child still running 5 s after that is killed.
Children die with the parent when it is SIGKILLed (Linux's parent-death signal, SIGKILL too:
the whole `worker all` crashes as one process would, and what it did not commit is
redelivered).

The parent's /metrics is every child's metrics merged, each series labelled `worker` with its
child's name (a child being restarted is missing until it answers again;
`ragstream_worker_process_up{worker}` says which answer), so Prometheus scrapes one target. /ready is
ready when every child is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ragstream.health import HealthServer
from ragstream.settings import Mode, Settings

log = structlog.get_logger(__name__)

WORKERS: Final = ("parse", "chunk", "embed", "cost", "exporter")
EXIT_CONFIG: Final = 2
RESTART_BASE_S: Final = 1.0
RESTART_CAP_S: Final = 30.0
KILL_AFTER_GRACE_S: Final = 5.0
_PR_SET_PDEATHSIG: Final = 1
REMOTE_EMBED_CONCURRENCY: Final = 8
MAX_CONCURRENCY: Final = 64


def sized_concurrency(settings: Settings, stage: str) -> int:
    """A stage's `--concurrency` when none is given. 1 when its service runs here: records go
    in micro-batches and the CPU work in the stage's pools (`parse.workers`, `chunk.workers`).
    A stage whose service is remote (`real` or `hybrid` in the settings at start) waits on the
    network instead, so it handles many records at once: for parse, half as many again as
    `services.llamaparse.max_jobs_in_flight` (the parser keeps at most that many jobs in
    flight; the other records do their reads and writes meanwhile, so no job slot waits for
    them), for embed 8."""
    services = settings.services
    if stage == "parse" and services.llamaparse.mode is not Mode.LOCAL:
        jobs = services.llamaparse.max_jobs_in_flight
        return min(MAX_CONCURRENCY, jobs + max(1, jobs // 2))
    if stage == "embed" and services.openai.mode is not Mode.LOCAL:
        return REMOTE_EMBED_CONCURRENCY
    return 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL this child when its parent dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_ports(count: int, host: str) -> list[int]:
    """`count` ports free on `host` now (bound together, so distinct, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Child:
    """One `ragstream worker <name>` process and what the parent knows of it."""

    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    delay_s: float = RESTART_BASE_S

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()
        log.info("worker process started", worker=self.name, pid=self.proc.pid, port=self.port)


class _Merged(Collector):
    """The children's metric families, each series labelled with its child's name."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_expositions(texts: dict[str, str]) -> bytes:
    """One exposition of the children's (worker name -> its /metrics text), every sample
    labelled `worker`; families of the same name are one family."""
    merged: dict[str, Metric] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                into.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)


def _command(settings: Settings, name: str, concurrency: int | None) -> list[str]:
    """The child's command line: `ragstream worker <stage>` or `ragstream exporter`."""
    ragstream = [sys.executable, "-m", "ragstream"]
    if name == "exporter":
        return [*ragstream, "exporter"]
    if name == "cost":
        return [*ragstream, "worker", "cost"]
    sized = concurrency or sized_concurrency(settings, name)
    return [*ragstream, "worker", name, "--concurrency", str(sized)]


def _port(name: str, port: int) -> dict[str, str]:
    key = "EXPORTER_PORT" if name == "exporter" else "METRICS_PORT"
    return {f"RAGSTREAM_OBSERVABILITY__{key}": str(port)}


class Supervisor:
    """Runs the children until `stop`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        concurrency: int | None = None,
        workers: Sequence[str] = WORKERS,
    ) -> None:
        self.settings = settings
        obs = settings.observability
        ports = free_ports(len(workers), obs.metrics_host)
        base_env = {
            **os.environ,
            "RAGSTREAM_OBSERVABILITY__METRICS_HOST": "127.0.0.1",
            # Scraped through the parent's merged /metrics, not on their own.
            "RAGSTREAM_OBSERVABILITY__SCRAPE_DIR": "",
        }
        self.children = [
            Child(
                name, port, _command(settings, name, concurrency), {**base_env, **_port(name, port)}
            )
            for name, port in zip(workers, ports, strict=True)
        ]
        self.registry = CollectorRegistry(auto_describe=True)
        # The parent's own memory and CPU, under names of their own (the children's
        # process_* families are in the merge).
        ProcessCollector(namespace="ragstream_supervisor", registry=self.registry)
        self.up = Gauge(
            "ragstream_worker_process_up",
            "1 while the worker process answers its /metrics, by worker.",
            ["worker"],
            registry=self.registry,
        )
        self.restarts = Counter(
            "ragstream_worker_process_restarts",
            "Times the worker process exited and was started again by `worker all`.",
            ["worker"],
            registry=self.registry,
        )
        for child in self.children:
            self.restarts.labels(child.name)
        self.exit_code = 0
        self._http = httpx.AsyncClient(timeout=2.0)

    # -- what the parent serves ------------------------------------------------------------

    async def exposition(self) -> bytes:
        async def scrape(child: Child) -> tuple[str, str | None]:
            try:
                response = await self._http.get(f"{child.url}/metrics")
                return child.name, response.text if response.status_code == 200 else None
            except httpx.HTTPError:
                return child.name, None

        texts: dict[str, str] = {}
        for name, text in await asyncio.gather(*(scrape(c) for c in self.children)):
            self.up.labels(name).set(0 if text is None else 1)
            if text is not None:
                texts[name] = text
        return generate_latest(self.registry) + merge_expositions(texts)

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        async def one(child: Child) -> bool:
            try:
                return (await self._http.get(f"{child.url}/ready")).status_code == 200
            except httpx.HTTPError:
                return False

        verdicts = await asyncio.gather(*(one(c) for c in self.children))
        checks = {c.name: ok for c, ok in zip(self.children, verdicts, strict=True)}
        return all(verdicts), checks

    # -- running ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        obs = self.settings.observability
        health = HealthServer(
            _Exposing(self), obs.metrics_host, obs.metrics_port, self.ready,
            scrape_dir=obs.scrape_dir, name="worker all",
        )  # fmt: skip
        port = await health.start()
        log.info(
            "serving metrics and health",
            url=f"http://{obs.metrics_host}:{port}/metrics",
            workers={c.name: c.port for c in self.children},
        )
        try:
            for child in self.children:
                await child.start()
            watchers = [asyncio.create_task(self._watch(c, stop)) for c in self.children]
            await stop.wait()
            await self._terminate()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            await health.stop()
            await self._http.aclose()
        return self.exit_code

    async def _watch(self, child: Child, stop: asyncio.Event) -> None:
        """Start `child` again whenever it exits while the parent runs."""
        while not stop.is_set():
            assert child.proc is not None
            code = await child.proc.wait()
            if stop.is_set():
                return
            if code == EXIT_CONFIG:
                log.error("worker process refused its configuration; stopping", worker=child.name)
                self.exit_code = EXIT_CONFIG
                stop.set()
                return
            if time.monotonic() - child.started_at > 60:
                child.delay_s = RESTART_BASE_S  # it ran a while: a fresh failure
            log.error(
                "worker process exited; starting it again",
                worker=child.name,
                exit_code=code,
                restart_in_s=child.delay_s,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=child.delay_s)
            if stop.is_set():
                return
            child.delay_s = min(RESTART_CAP_S, child.delay_s * 2)
            self.restarts.labels(child.name).inc()
            await child.start()

    async def _terminate(self) -> None:
        """SIGTERM every child; SIGKILL those still running after their grace."""
        running = [c.proc for c in self.children if c.proc and c.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        within = self.settings.kafka.shutdown_grace_s + KILL_AFTER_GRACE_S
        try:
            async with asyncio.timeout(within):
                codes = await asyncio.gather(*(p.wait() for p in running))
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            codes = await asyncio.gather(*(p.wait() for p in running))
            self.exit_code = self.exit_code or 1
        if self.exit_code == 0 and any(code not in (0, -signal.SIGTERM) for code in codes):
            self.exit_code = 1
        names = [c.name for c in self.children if c.proc in running]
        log.info("worker processes stopped", exit_codes=dict(zip(names, codes, strict=True)))


@dataclass
class _Exposing:
    """What HealthServer asks of its metrics: the merged exposition."""

    supervisor: Supervisor

    async def exposition(self) -> bytes:
        return await self.supervisor.exposition()


async def run_processes(
    settings: Settings, *, concurrency: int | None = None, stop: asyncio.Event | None = None
) -> int:
    """Run `worker all` as processes until SIGTERM/SIGINT (or `stop`); the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await Supervisor(settings, concurrency=concurrency).run(stop)
