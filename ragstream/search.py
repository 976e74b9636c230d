"""`ragstream search`: embed a question like the stored chunks, return the nearest ones.

The documents decide how the question is embedded, not the current mode: each searchable
document records the model and dimensions of its vectors (`current_embedding_model`,
`current_embedding_dimensions`), and the question is embedded once per model the tenant's
documents use: the local feature-hashing model locally, any other through the OpenAI API
(`services.openai`: its base URL, key and circuit breaker), priced and admitted by the same
meter and budget guard as the embed stage, its usage published to the cost topic.

A tenant whose documents span several models (hybrid mode falling back to the local model, or a
model changed over time) is searched per model, and the lists are merged by rank: first the
best of each model, then the second of each, and so on, ties by score. Scores from different
models are not comparable; ranks are.
"""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass

from ragstream.embedding import LOCAL_MODEL, Embedder, LocalEmbedder
from ragstream.settings import Settings
from ragstream.store import EmbeddingModel, SearchHit, Store

SEARCH_STAGE = "search"  # the stage named on the usage events of a search's paid calls


@dataclass(frozen=True, slots=True)
class SearchResult:
    hits: list[SearchHit]
    models: list[EmbeddingModel]  # what the question was embedded with, one search each


def embedder_for(settings: Settings) -> Embedder:
    """The local embedder at the configured dimensions (what local mode embeds with)."""
    return LocalEmbedder(settings.embed.dimensions)


async def search(settings: Settings, question: str, tenant_id: str, k: int = 5) -> SearchResult:
    """The k chunks of the tenant nearest to `question`, embedded as its documents were."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2)
        )
        models = await store.embedding_models(tenant_id)
        ranked: list[list[SearchHit]] = []
        for m in models:
            embedder = await embedder_for_model(settings, m.model, m.dimensions, stack)
            vector = await _embed_question(embedder, question, tenant_id)
            hits = await store.search(
                tenant_id,
                vector,
                m.model,
                m.dimensions,
                k,
                ef_search=settings.search.ef_search,
                exact_limit=settings.search.exact_limit,
            )
            ranked.append(hits)
        return SearchResult(merge_by_rank(ranked, k), models)


async def search_chunks(
    settings: Settings, question: str, tenant_id: str, k: int = 5
) -> list[SearchHit]:
    return (await search(settings, question, tenant_id, k)).hits


def merge_by_rank(ranked: list[list[SearchHit]], k: int) -> list[SearchHit]:
    """Each list's first, then each list's second, ...; within a rank, higher score first."""
    merged: list[SearchHit] = []
    for rank in range(max((len(r) for r in ranked), default=0)):
        level = [r[rank] for r in ranked if rank < len(r)]
        merged.extend(sorted(level, key=lambda h: -h.score))
    return merged[:k]


def provider_of(model: str) -> str:
    return "local" if model == LOCAL_MODEL else "openai"


async def embedder_for_model(
    settings: Settings, model: str, dimensions: int, stack: AsyncExitStack
) -> Embedder:
    """The embedder that made vectors of `model` at `dimensions`: local, or the OpenAI API behind
    its circuit breaker (no fallback: another model's vector would match nothing), metered."""
    if provider_of(model) == "local":
        return LocalEmbedder(dimensions)
    from ragstream.control import snapshot
    from ragstream.cost.meter import BudgetGuard, KafkaUsageSink, Meter
    from ragstream.cost.pricing import PriceTable
    from ragstream.providers.openai_embedder import OpenAIEmbedder
    from ragstream.providers.select import EMBED_SERVICE, GuardedEmbedder, aclose, breaker_for

    price = PriceTable.load(settings.budgets.prices).embedding(model)
    guard = BudgetGuard(await snapshot(settings), settings.budgets)
    sink = KafkaUsageSink(settings)
    await sink.start()
    stack.push_async_callback(sink.stop)
    meter = Meter(EMBED_SERVICE, "embeddings", model, price, guard, sink)
    real = OpenAIEmbedder(
        settings.services.openai.model_copy(update={"model": model}),
        dimensions=dimensions,
        meter=meter,
    )
    embedder = GuardedEmbedder(real, breaker_for(settings, EMBED_SERVICE))
    stack.push_async_callback(aclose, embedder)
    return embedder


async def _embed_question(embedder: Embedder, question: str, tenant_id: str) -> list[float]:
    from ragstream.cost.meter import CallContext, current_call

    call = CallContext(SEARCH_STAGE, "", tenant_id, f"search-{uuid.uuid4()}")
    token = current_call.set(call)
    try:
        return (await embedder.embed([question])).vectors[0]
    finally:
        current_call.reset(token)
