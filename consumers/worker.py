"""Assembling and running stage workers: `ragstream worker parse|chunk|embed|all`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, Final

import structlog

from consumers.compose import (
    Providers,
    build_stage,
    follow_control,
    following_providers,
    open_store,
)
from consumers.cost import CostAccountant
from consumers.infrastructure import InfrastructureWatch, until_available, until_kafka
from consumers.journey import JourneyRecorder
from consumers.runtime import StageRunner
from ragstream.codec import Codec
from ragstream.errors import POSTGRES, AuthenticationFailed, ConfigError
from ragstream.health import HealthServer, database_ready, readiness
from ragstream.metrics import Metrics
from ragstream.providers.circuit import CircuitBreaker
from ragstream.scrub import Scrubber
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Stage

log = structlog.get_logger(__name__)


Member = StageRunner | CostAccountant
RESTART_BASE_S: Final = 1.0
RESTART_CAP_S: Final = 30.0


async def supervise(member: Member, stop: asyncio.Event) -> None:
    """Run one consumer until `stop`; when it crashes (a bug, not a dependency: those are
    waited for inside), report it and run it again with backoff, so the process's other
    consumers go on. A wrong setting or refused credentials stop the process: only an
    operator can fix them."""
    name = member.name
    delay = RESTART_BASE_S
    while not stop.is_set():
        began = time.monotonic()
        try:
            await member.run(stop)
            return
        except (ConfigError, AuthenticationFailed):
            raise
        except Exception:
            if time.monotonic() - began > 60:
                delay = RESTART_BASE_S  # it ran a while: a fresh failure, not a crash loop
            log.exception("consumer crashed; restarting it", consumer=name, restart_in_s=delay)
            member.metrics.record_restart(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(RESTART_CAP_S, delay * 2)


def shutdown_bound_s(settings: Settings) -> float:
    """How long a worker takes at most to stop after SIGTERM: `kafka.shutdown_grace_s` for the
    records in hand, then 5 s to commit, leave the group and close. A Kubernetes pod's
    terminationGracePeriodSeconds covers it (deploy/k8s)."""
    return settings.kafka.shutdown_grace_s + 5.0


def freeze_start_up() -> None:
    """Take what start-up made (the modules, some 95,000 objects that live as long as the
    process) out of the collector's full passes. Each full pass would walk them all while every
    record in flight waits: 60-200 ms once or twice a minute per stage process, measured on a
    busy 2-core machine. For a worker process's entry point, after its imports."""
    gc.collect()
    gc.freeze()


def _exit_after(seconds: float) -> None:
    """The bound on a worker's shutdown (`shutdown_bound_s`): whatever still holds it then (a
    broker that does not answer, a stuck child), the process exits, on a thread of its own so
    a blocked event loop cannot hold it; the records it did not commit are redelivered to the
    group."""

    def hard_exit() -> None:
        os.write(
            2,
            b"worker: shutdown took too long; exiting now (uncommitted records are redelivered)\n",
        )
        os._exit(1)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


async def run_workers(
    settings: Settings,
    stages: list[Stage],
    *,
    concurrency: int = 1,
    stop: asyncio.Event | None = None,
    handle_signals: bool = False,
    started: Callable[[list[StageRunner]], None] | None = None,
    providers: Providers | None = None,
    breakers: Mapping[str, CircuitBreaker] | None = None,
    accountant: bool = False,
) -> list[StageRunner]:
    """Run the given stages (and, with `accountant`, a member of the cost group) in this
    process until `stop` is set (or SIGTERM/SIGINT).

    Start-up waits for PostgreSQL and Kafka (one log line per attempt, not ready meanwhile);
    then each consumer runs under `supervise`, so one crashing does not stop the others.

    Without `providers`, the stages' providers follow the control topic (modes, throttles)
    and every paid call is metered; given `providers` are used as they are.

    `breakers`, by service name, stand in for the circuit breakers built from the settings
    (to share them, or to listen to their transitions)."""
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        within_s = shutdown_bound_s(settings)

        def on_signal() -> None:
            if not stop.is_set():
                log.info("stopping: finishing the records in hand", within_s=within_s)
                _exit_after(within_s - 0.5)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
    metrics = Metrics()
    watch = InfrastructureWatch(metrics=metrics)
    members: list[Member] = []
    store: Store | None = None

    async def database() -> bool:
        return store is not None and await database_ready(store)

    checks: dict[str, Callable[[], Any]] = {
        "database": database,
        "dependencies": watch.ready,
        "consumers": lambda: bool(members) and all(m.joined for m in members),
    }
    obs = settings.observability
    async with AsyncExitStack() as stack:
        stack.push_async_callback(watch.close)
        # Health first: while start-up waits for its dependencies, /ready answers 503.
        health = HealthServer(
            metrics, obs.metrics_host, obs.metrics_port, readiness(checks),
            scrape_dir=obs.scrape_dir, name="worker " + "+".join(s.value for s in stages),
        )  # fmt: skip
        port = await health.start()
        stack.push_async_callback(health.stop)
        log.info("serving metrics and health", url=f"http://{obs.metrics_host}:{port}/metrics")
        store = await until_available(
            "postgresql", settings.postgres.redacted_dsn(), lambda: open_store(settings), stop
        )
        if store is None:
            return []
        stack.push_async_callback(store.close)
        ready_store = store
        watch.probes[POSTGRES] = lambda: database_ready(ready_store)
        codec = Codec()
        recorder = JourneyRecorder(store, Scrubber.from_settings(settings))
        control = None
        if providers is None or accountant:
            control = await until_kafka(
                settings.kafka, lambda: follow_control(settings, codec, stack, metrics), stop
            )
            if control is None:
                return []
        if providers is None:
            assert control is not None
            given = control
            providers = await until_kafka(
                settings.kafka,
                lambda: following_providers(settings, codec, stack, metrics, given, breakers),
                stop,
            )
            if providers is None:
                return []
        parts = {s: build_stage(s, settings, store, providers, stack=stack) for s in stages}
        runners = [
            StageRunner(
                settings,
                stage,
                parts[stage].handler,
                codec,
                recorder,
                concurrency=concurrency,
                metrics=metrics,
                gate=control.gate(stage) if control is not None else None,
                watch=watch,
                batching=store.batch,
                ahead=parts[stage].ahead,
            )
            for stage in stages
        ]
        members.extend(runners)
        if accountant:
            assert control is not None
            members.append(
                CostAccountant(
                    settings, store, control.state, codec=codec, metrics=metrics, watch=watch
                )
            )
        if started:
            started(runners)
        tasks = [asyncio.create_task(supervise(m, stop), name=f"stage-{m.name}") for m in members]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    stop.set()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise task.exception()  # type: ignore[misc]
        except asyncio.CancelledError:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    return runners
