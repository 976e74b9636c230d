"""Assembling and running stage workers: `ragstream worker parse|chunk|embed|all`."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from consumers.chunk import ChunkDeps, chunk
from consumers.embed import EmbedDeps, embed
from consumers.parse import ParseDeps, parse
from consumers.runtime import StageHandler, StageRunner
from consumers.stage import Outcome, RecordContext
from ragstream.blobs import BlobStore
from ragstream.chunking import Chunker
from ragstream.codec import Codec
from ragstream.control import ControlFollower, ControlState
from ragstream.embedding import Embedder, LocalEmbedder
from ragstream.events import (
    DocumentChunked,
    DocumentEvent,
    DocumentParsed,
    DocumentUploaded,
    Event,
    ThrottleEvent,
)
from ragstream.health import HealthServer, database_ready, readiness
from ragstream.metrics import Metrics
from ragstream.parsing import LocalParser, Parser
from ragstream.providers.modes import SwitchingEmbedder, SwitchingParser
from ragstream.providers.select import (
    EMBED_SERVICE,
    PARSE_SERVICE,
    breaker_for,
    embedder_for,
    parser_for,
)
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store.migrate import migrate
from ragstream.tokens import get_tokenizer
from ragstream.topology import Stage

log = structlog.get_logger(__name__)


@dataclass
class JourneyRecorder:
    """Writes each step of a document's journey, and its failure, to PostgreSQL."""

    store: Store

    async def step_done(
        self,
        event: DocumentEvent,
        stage: Stage,
        outcome: Outcome,
        attempt: int,
        started_at: datetime,
        finished_at: datetime,
    ) -> None:
        await self.store.record_step(
            document_id=event.document_id,
            tenant_id=event.tenant_id,
            stage=stage.value,
            input_event_id=str(event.event_id),
            outcome=outcome.status,
            attempt=attempt,
            started_at=started_at,
            finished_at=finished_at,
            detail=outcome.detail,
            correlation_id=event.correlation_id,
        )

    async def step_failed(
        self,
        event: DocumentEvent,
        stage: Stage,
        error: BaseException,
        attempt: int,
        started_at: datetime,
        finished_at: datetime,
        *,
        final: bool,
    ) -> None:
        reason = f"{stage.value}: {type(error).__name__}: {error}"
        await self.store.record_step(
            document_id=event.document_id,
            tenant_id=event.tenant_id,
            stage=stage.value,
            input_event_id=str(event.event_id),
            outcome="dead-lettered" if final else "retry",
            attempt=attempt,
            started_at=started_at,
            finished_at=finished_at,
            detail={"error_class": type(error).__name__, "error": str(error)[:2000]},
            correlation_id=event.correlation_id,
        )
        if final:
            await self.store.advance_status(
                event.document_id, "dead-lettered", reason=reason[:2000], stage=stage.value
            )


def _typed(kind: type[Event], fn: Callable[[Any], Awaitable[Outcome]]) -> StageHandler:
    async def handler(event: Event, ctx: RecordContext) -> Outcome:
        if not isinstance(event, kind):
            from ragstream.errors import PermanentError

            raise PermanentError(f"expected {kind.__name__}, got {type(event).__name__}")
        return await fn(event)

    return handler


@dataclass(frozen=True)
class Providers:
    """The services the stages call; None means the one the settings choose."""

    parser: Parser | None = None
    embedder: Embedder | None = None


def build_handler(
    stage: Stage, settings: Settings, store: Store, providers: Providers | None = None
) -> StageHandler:
    providers = providers or Providers()
    if stage is Stage.PARSE:
        deps_p = ParseDeps(
            store=store,
            parser=providers.parser or LocalParser(settings.parse),
            blobs=BlobStore(settings.blob_root(), settings.blobs.allowed_roots),
        )
        return _typed(DocumentUploaded, lambda e: parse(e, deps_p))
    if stage is Stage.CHUNK:
        deps_c = ChunkDeps(store=store, chunker=Chunker(settings.chunk, get_tokenizer()))
        return _typed(DocumentParsed, lambda e: chunk(e, deps_c))
    deps_e = EmbedDeps(
        store=store,
        embedder=providers.embedder or LocalEmbedder(settings.embed.dimensions),
    )
    return _typed(DocumentChunked, lambda e: embed(e, deps_e))


async def _following_providers(
    settings: Settings, codec: Codec, stack: AsyncExitStack, metrics: Metrics
) -> Providers:
    """Providers that follow the control topic: each service's mode as last set by an
    operator (read whole at start), else as configured; one circuit breaker per service."""
    state = ControlState.from_settings(settings)
    state.listeners.append(lambda event: _observe_control(metrics, event))
    follower = ControlFollower(settings, state, codec)
    await follower.start()
    stack.push_async_callback(follower.stop)
    embed_breaker, parse_breaker = breaker_for(EMBED_SERVICE), breaker_for(PARSE_SERVICE)
    for breaker in (embed_breaker, parse_breaker):
        breaker.add_listener(metrics.on_circuit_change)
        metrics.set_circuit_state(breaker.name, breaker.state)
    embedder = SwitchingEmbedder(
        state, EMBED_SERVICE, lambda mode: embedder_for(settings, mode, breaker=embed_breaker)
    )
    parser = SwitchingParser(
        state, PARSE_SERVICE, lambda mode: parser_for(settings, mode, breaker=parse_breaker)
    )
    stack.push_async_callback(embedder.aclose)
    stack.push_async_callback(parser.aclose)
    for service in (EMBED_SERVICE, PARSE_SERVICE):
        log.info("service mode", service=service, mode=state.mode(service).value)
    return Providers(parser=parser, embedder=embedder)


def _observe_control(metrics: Metrics, event: Event) -> None:
    if isinstance(event, ThrottleEvent) and event.tenant_id is None:
        metrics.set_throttle(event.service, event.state)
        metrics.set_budget(event.service, event.window, event.budget_usd, event.spent_usd)


async def run_workers(
    settings: Settings,
    stages: list[Stage],
    *,
    concurrency: int = 1,
    stop: asyncio.Event | None = None,
    handle_signals: bool = False,
    started: Callable[[list[StageRunner]], None] | None = None,
    providers: Providers | None = None,
) -> list[StageRunner]:
    """Run the given stages in this process until `stop` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    async with AsyncExitStack() as stack:
        store = await Store.connect(
            settings.postgres.dsn(),
            min_size=settings.postgres.pool_min_size,
            max_size=settings.postgres.pool_max_size,
        )
        stack.push_async_callback(store.close)
        await store.ensure_vector_index(settings.embed.dimensions)
        codec = Codec()
        recorder = JourneyRecorder(store)
        metrics = Metrics()
        if providers is None:
            providers = await _following_providers(settings, codec, stack, metrics)
        runners = [
            StageRunner(
                settings,
                stage,
                build_handler(stage, settings, store, providers),
                codec,
                recorder,
                concurrency=concurrency,
                metrics=metrics,
            )
            for stage in stages
        ]
        obs = settings.observability
        checks: dict[str, Callable[[], Any]] = {"database": lambda: database_ready(store)}
        for r in runners:
            checks[r.stage.value] = lambda r=r: r.joined  # type: ignore[misc]
        health = HealthServer(metrics, obs.metrics_host, obs.metrics_port, readiness(checks))
        port = await health.start()
        stack.push_async_callback(health.stop)
        log.info("serving metrics and health", url=f"http://{obs.metrics_host}:{port}/metrics")
        if started:
            started(runners)
        tasks = [asyncio.create_task(r.run(stop), name=f"stage-{r.stage.value}") for r in runners]
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
