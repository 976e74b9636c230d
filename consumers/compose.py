"""What a stage worker is made of: each stage's handler with its dependencies, the providers
that follow the control topic (modes, throttles, circuits, meters) and the store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from consumers.chunk import ChunkDeps, chunk
from consumers.embed import EmbedDeps, embed
from consumers.embed_ahead import EmbeddingsAhead
from consumers.handling import StageHandler
from consumers.parse import ParseDeps, parse
from consumers.stage import Ahead, Outcome, RecordContext
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
from ragstream.errors import PermanentError
from ragstream.events import (
    CostUsage,
    DocumentChunked,
    DocumentParsed,
    DocumentUploaded,
    Event,
    ServiceModeChanged,
    ThrottleEvent,
)
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
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store.migrate import migrate
from ragstream.tokens import get_tokenizer
from ragstream.topology import Stage

log = structlog.get_logger(__name__)


class _Closable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=_Closable)


def _typed(
    kind: type[Event], fn: Callable[[Any, RecordContext], Awaitable[Outcome]]
) -> StageHandler:
    async def handler(event: Event, ctx: RecordContext) -> Outcome:
        if not isinstance(event, kind):
            raise PermanentError(f"expected {kind.__name__}, got {type(event).__name__}")
        return await fn(event, ctx)

    return handler


@dataclass(frozen=True)
class StageParts:
    """A stage's handler, and what it starts for a whole micro-batch before its records run
    (the embed stage's local vectors made ahead); None when nothing."""

    handler: StageHandler
    ahead: Ahead | None = None


@dataclass(frozen=True)
class Providers:
    """The services the stages call; None means the one the settings choose."""

    parser: Parser | None = None
    embedder: Embedder | None = None


def build_stage(
    stage: Stage,
    settings: Settings,
    store: Store,
    providers: Providers | None = None,
    *,
    stack: AsyncExitStack | None = None,
) -> StageParts:
    """The stage's handler with its dependencies, and what it starts for a whole batch. Local parsing and chunking run in pools of
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
        return StageParts(_typed(DocumentUploaded, lambda e, ctx: parse(e, deps_p, ctx)))
    if stage is Stage.CHUNK:
        chunker = owned(Chunker(settings.chunk, get_tokenizer()))
        deps_c = ChunkDeps(store=store, chunker=chunker)
        return StageParts(_typed(DocumentParsed, lambda e, _: chunk(e, deps_c)))
    embedder = providers.embedder or LocalEmbedder(settings.embed.dimensions)
    # The work ahead reads on a pooled connection of its own, beside the batches' (one each).
    ahead = (
        EmbeddingsAhead(store, embedder, LocalEmbedder(settings.embed.dimensions))
        if settings.postgres.pool_max_size > settings.kafka.concurrent_batches
        else None
    )
    deps_e = EmbedDeps(
        store=store,
        embedder=embedder,
        share_cache=settings.embed.share_cache_across_tenants,
        ahead=ahead,
    )
    return StageParts(
        _typed(DocumentChunked, lambda e, _: embed(e, deps_e)), ahead.start if ahead else None
    )


async def follow_control(
    settings: Settings, codec: Codec, stack: AsyncExitStack, metrics: Metrics
) -> Control:
    """Read the control topic whole (so a worker starts in the last mode and throttle state
    set), then follow it in the background."""
    state = ControlState.from_settings(settings)
    state.listeners.append(lambda event: observe_control(metrics, event))
    guard = BudgetGuard(state, settings.budgets)
    follower = ControlFollower(settings, state, codec)
    await follower.start()
    stack.push_async_callback(closing(follower.stop, "stop following the control topic"))
    for service, (mode, throttle) in {
        s: (state.mode(s), guard.active_throttle(s)) for s in (EMBED_SERVICE, PARSE_SERVICE)
    }.items():
        metrics.set_mode(service, mode.value)
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


async def following_providers(
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


def observe_control(metrics: Metrics, event: Event) -> None:
    if isinstance(event, ServiceModeChanged):
        metrics.set_mode(event.service, event.mode.value)
    if isinstance(event, ThrottleEvent) and event.tenant_id is None:
        metrics.set_throttle(event.service, event.state)
        # The USD figures are the daily window's, whichever window decided the state.
        metrics.set_budget(event.service, "daily", event.budget_usd, event.spent_usd)


async def open_store(settings: Settings) -> Store:
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
