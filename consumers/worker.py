"""Assembling and running stage workers: `ragstream worker parse|chunk|embed|all`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol, TypeVar

import structlog

from consumers.chunk import ChunkDeps, chunk
from consumers.cost import CostAccountant
from consumers.embed import EmbedDeps, embed
from consumers.handling import StageHandler
from consumers.infrastructure import InfrastructureWatch, until_available, until_kafka
from consumers.parse import ParseDeps, parse
from consumers.runtime import StageRunner
from consumers.stage import Outcome, RecordContext
from ragstream.chunking import Chunker
from ragstream.codec import Codec
from ragstream.control import (
    EMBED_SERVICE,
    PARSE_SERVICE,
    Control,
    ControlFollower,
    ControlState,
)
from ragstream.cost.meter import BudgetGuard, KafkaUsageSink, Meter
from ragstream.cost.pricing import PriceTable
from ragstream.errors import POSTGRES, AuthenticationFailed, ConfigError, PermanentError
from ragstream.events import (
    CostUsage,
    DocumentChunked,
    DocumentEvent,
    DocumentParsed,
    DocumentUploaded,
    Event,
    ThrottleEvent,
)
from ragstream.health import HealthServer, database_ready, readiness
from ragstream.kafka_clients import closing
from ragstream.metrics import Metrics
from ragstream.providers.circuit import CircuitBreaker
from ragstream.providers.circuit_reports import report_circuits
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.embed.port import Embedder
from ragstream.providers.modes import SwitchingEmbedder, SwitchingParser
from ragstream.providers.parse.local import LocalParser
from ragstream.providers.parse.port import Parser
from ragstream.providers.select import (
    GuardedEmbedder,
    GuardedParser,
    breaker_for,
    embedder_for,
    parser_for,
)
from ragstream.scrub import Scrubber
from ragstream.settings import Settings
from ragstream.store import StatusChange, Store
from ragstream.store.migrate import migrate
from ragstream.tokens import get_tokenizer
from ragstream.topology import Stage

log = structlog.get_logger(__name__)


class _Closable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=_Closable)


def _with_replay(detail: Mapping[str, Any], replay: str) -> dict[str, Any]:
    return {**detail, "replay": replay} if replay else dict(detail)


@dataclass
class JourneyRecorder:
    """Writes each step of a document's journey, and its failure, to PostgreSQL; error text is
    scrubbed of secrets before it is stored."""

    store: Store
    scrub: Scrubber = field(default_factory=Scrubber)

    async def step_done(
        self,
        event: DocumentEvent,
        stage: str,
        outcome: Outcome,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
    ) -> None:
        replay = ctx.replay_position
        await self.store.record_step(
            document_id=event.document_id,
            tenant_id=event.tenant_id,
            stage=stage,
            input_event_id=str(event.event_id),
            outcome=outcome.status,
            attempt=ctx.attempt,
            started_at=started_at,
            finished_at=finished_at,
            detail=_with_replay(outcome.detail, replay),
            correlation_id=event.correlation_id,
            replay=replay,
        )

    async def step_failed(
        self,
        event: DocumentEvent,
        stage: str,
        error: BaseException,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
        *,
        final: bool,
    ) -> None:
        message = self.scrub(str(error)).replace("\x00", "\\x00")
        reason = f"{stage}: {type(error).__name__}: {message}"
        replay = ctx.replay_position
        await self.store.record_step(
            document_id=event.document_id,
            tenant_id=event.tenant_id,
            stage=stage,
            input_event_id=str(event.event_id),
            outcome="dead-lettered" if final else "retry",
            attempt=ctx.attempt,
            started_at=started_at,
            finished_at=finished_at,
            detail=_with_replay(
                {"error_class": type(error).__name__, "error": message[:2000]}, replay
            ),
            correlation_id=event.correlation_id,
            replay=replay,
        )
        if final:
            await self.store.advance_status(
                StatusChange(
                    event.document_id,
                    "dead-lettered",
                    reason=reason[:2000],
                    stage=stage,
                    tenant_id=event.tenant_id,
                )
            )


def _typed(
    kind: type[Event], fn: Callable[[Any, RecordContext], Awaitable[Outcome]]
) -> StageHandler:
    async def handler(event: Event, ctx: RecordContext) -> Outcome:
        if not isinstance(event, kind):
            raise PermanentError(f"expected {kind.__name__}, got {type(event).__name__}")
        return await fn(event, ctx)

    return handler


@dataclass(frozen=True)
class Providers:
    """The services the stages call; None means the one the settings choose."""

    parser: Parser | None = None
    embedder: Embedder | None = None


def build_handler(
    stage: Stage,
    settings: Settings,
    store: Store,
    providers: Providers | None = None,
    *,
    stack: AsyncExitStack | None = None,
) -> StageHandler:
    """The stage's handler with its dependencies. Local parsing and chunking run in pools of
    child processes: with `stack`, the pools made here are closed (their children killed)
    when it closes."""
    providers = providers or Providers()

    def owned(resource: C) -> C:
        if stack is not None:
            stack.push_async_callback(resource.aclose)
        return resource

    if stage is Stage.PARSE:
        parser = providers.parser or owned(LocalParser(settings.parse))
        deps_p = ParseDeps.from_settings(settings, store, parser)
        return _typed(DocumentUploaded, lambda e, ctx: parse(e, deps_p, ctx))
    if stage is Stage.CHUNK:
        chunker = owned(Chunker(settings.chunk, get_tokenizer()))
        deps_c = ChunkDeps(store=store, chunker=chunker)
        return _typed(DocumentParsed, lambda e, _: chunk(e, deps_c))
    deps_e = EmbedDeps(
        store=store,
        embedder=providers.embedder or LocalEmbedder(settings.embed.dimensions),
        share_cache=settings.embed.share_cache_across_tenants,
    )
    return _typed(DocumentChunked, lambda e, _: embed(e, deps_e))


async def _follow_control(
    settings: Settings, codec: Codec, stack: AsyncExitStack, metrics: Metrics
) -> Control:
    """Read the control topic whole (so a worker starts in the last mode and throttle state
    set), then follow it in the background."""
    state = ControlState.from_settings(settings)
    state.listeners.append(lambda event: _observe_control(metrics, event))
    guard = BudgetGuard(state, settings.budgets)
    follower = ControlFollower(settings, state, codec)
    await follower.start()
    stack.push_async_callback(closing(follower.stop, "stop following the control topic"))
    for service, (mode, throttle) in {
        s: (state.mode(s), guard.active_throttle(s)) for s in (EMBED_SERVICE, PARSE_SERVICE)
    }.items():
        log.info(
            "service state",
            service=service,
            mode=mode.value,
            throttled=throttle.reason if throttle else None,
        )
    return Control(state, guard)


async def _meters(
    settings: Settings, codec: Codec, stack: AsyncExitStack, metrics: Metrics, guard: BudgetGuard
) -> tuple[Meter, Meter, float]:
    """The meters of the paid services: priced from the price table (a model or tier missing
    there stops the worker here), guarded by the budget, publishing to the usage topic."""
    prices = PriceTable.load(settings.budgets.prices)
    sink = KafkaUsageSink(settings, codec)
    await sink.start()
    stack.push_async_callback(closing(sink.stop, "flush the usage events"))

    def observe(usage: CostUsage) -> None:
        metrics.record_usage(usage.service, usage.unit, usage.units, usage.cost_usd)

    openai = settings.services.openai.model
    tier = settings.services.llamaparse.tier
    embed = Meter(EMBED_SERVICE, "embeddings", openai, prices.embedding(openai), guard, sink)
    parse = Meter(PARSE_SERVICE, "parse", tier, prices.parse_credit, guard, sink)
    for meter in (embed, parse):
        meter.on_usage.append(observe)
    return embed, parse, float(prices.pages_to_credits(tier))


async def _following_providers(
    settings: Settings,
    codec: Codec,
    stack: AsyncExitStack,
    metrics: Metrics,
    control: Control,
    breakers: Mapping[str, CircuitBreaker] | None = None,
) -> Providers:
    """Providers that follow the control topic: each service's mode as last set by an
    operator (read whole at start), else as configured; one circuit breaker per service
    (the one given, else one with the service's configured policy); every paid call metered."""
    state = control.state
    embed_meter, parse_meter, credits_per_page = await _meters(
        settings, codec, stack, metrics, control.guard
    )
    given = breakers or {}
    embed_breaker = given.get(EMBED_SERVICE) or breaker_for(settings, EMBED_SERVICE)
    parse_breaker = given.get(PARSE_SERVICE) or breaker_for(settings, PARSE_SERVICE)
    for breaker, guarded in ((embed_breaker, GuardedEmbedder), (parse_breaker, GuardedParser)):
        breaker.add_listener(metrics.on_circuit_change)
        breaker.add_call_listener(metrics.record_external_call)
        metrics.set_circuit_state(breaker.name, breaker.state)
        metrics.known_calls(breaker.name, guarded.operation)
    await report_circuits(settings, codec, stack, (embed_breaker, parse_breaker))
    embedder = SwitchingEmbedder(
        state,
        EMBED_SERVICE,
        lambda mode: embedder_for(settings, mode, breaker=embed_breaker, meter=embed_meter),
    )
    parser = SwitchingParser(
        state,
        PARSE_SERVICE,
        lambda mode: parser_for(
            settings,
            mode,
            breaker=parse_breaker,
            meter=parse_meter,
            credits_per_page=credits_per_page,
        ),
    )
    stack.push_async_callback(embedder.aclose)
    stack.push_async_callback(parser.aclose)
    return Providers(parser=parser, embedder=embedder)


def _observe_control(metrics: Metrics, event: Event) -> None:
    if isinstance(event, ThrottleEvent) and event.tenant_id is None:
        metrics.set_throttle(event.service, event.state)
        # The USD figures are the daily window's, whichever window decided the state.
        metrics.set_budget(event.service, "daily", event.budget_usd, event.spent_usd)


async def _open_store(settings: Settings) -> Store:
    """Migrate, connect and make sure the vector index exists (raises while PostgreSQL is away)."""
    await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    store = await Store.connect(
        settings.postgres.dsn(),
        min_size=settings.postgres.pool_min_size,
        max_size=settings.postgres.pool_max_size,
    )
    try:
        await store.ensure_vector_index(settings.embed.dimensions)
    except BaseException:
        await store.close()
        raise
    return store


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
            "postgresql", settings.postgres.redacted_dsn(), lambda: _open_store(settings), stop
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
                settings.kafka, lambda: _follow_control(settings, codec, stack, metrics), stop
            )
            if control is None:
                return []
        if providers is None:
            assert control is not None
            given = control
            providers = await until_kafka(
                settings.kafka,
                lambda: _following_providers(settings, codec, stack, metrics, given, breakers),
                stop,
            )
            if providers is None:
                return []
        runners = [
            StageRunner(
                settings,
                stage,
                build_handler(stage, settings, store, providers, stack=stack),
                codec,
                recorder,
                concurrency=concurrency,
                metrics=metrics,
                gate=control.gate(stage) if control is not None else None,
                watch=watch,
                batching=store.batch,
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
