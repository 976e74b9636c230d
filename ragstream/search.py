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

Three modes (`--mode`, default `search.mode`, hybrid):

- `vector`: the above.
- `text`: PostgreSQL full-text search over the chunk text (`chunks.text_search`, English
  stemming, a GIN index): the question's terms or'ed, ranked by `ts_rank_cd`; no embedding call.
- `hybrid`: both, fused by reciprocal rank (RRF): a chunk's score is the sum over the lists it is
  in of 1 / (60 + its rank there), each list `search.candidates` long. A chunk near the question
  in meaning and one holding its exact words (a part number, an error code) both come up. When
  the question cannot be embedded for now (the budget is spent, the circuit is open), hybrid
  answers with the full-text matches and says why (`SearchResult.degraded`); vector mode
  raises.
"""

from __future__ import annotations

import re
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Literal

from ragstream.errors import BudgetExceeded, RetryableError
from ragstream.providers.embed.local import LOCAL_MODEL, LocalEmbedder
from ragstream.providers.embed.port import Embedder
from ragstream.settings import Settings
from ragstream.store import EmbeddingModel, SearchHit, Store

SEARCH_STAGE = "search"  # the stage named on the usage events of a search's paid calls
SearchMode = Literal["vector", "text", "hybrid"]
MODES: tuple[SearchMode, ...] = ("vector", "text", "hybrid")
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al.), as most engines use


@dataclass(frozen=True, slots=True)
class SearchResult:
    hits: list[SearchHit]
    models: list[EmbeddingModel]  # what the question was embedded with, one search each
    mode: SearchMode = "vector"
    # hybrid only: why the question could not be embedded (the budget, an open circuit), so
    # the hits are the full-text matches alone; None when both sides answered
    degraded: str | None = None


def embedder_for(settings: Settings) -> Embedder:
    """The local embedder at the configured dimensions (what local mode embeds with)."""
    return LocalEmbedder(settings.embed.dimensions)


async def search(
    settings: Settings,
    question: str,
    tenant_id: str,
    k: int = 5,
    mode: SearchMode | None = None,
) -> SearchResult:
    """The k chunks of the tenant that best answer `question`, in `mode` (see the module
    docstring; default `search.mode`)."""
    mode = mode or settings.search.mode
    depth = k if mode == "vector" else max(k, settings.search.candidates)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2)
        )
        models = [] if mode == "text" else await store.embedding_models(tenant_id)
        ranked: list[list[SearchHit]] = []
        degraded = None
        for m in models:
            embedder = await embedder_for_model(settings, m.model, m.dimensions, stack)
            try:
                vector = await _embed_question(embedder, question, tenant_id)
            except (BudgetExceeded, RetryableError) as exc:  # throttled, circuit open, away
                if mode == "vector":
                    raise
                degraded = f"{type(exc).__name__}: {exc}"
                continue
            hits = await store.search(
                tenant_id,
                vector,
                m.model,
                m.dimensions,
                depth,
                ef_search=settings.search.ef_search,
                exact_limit=settings.search.exact_limit,
            )
            ranked.append(hits)
        if mode == "vector":
            return SearchResult(merge_by_rank(ranked, k), models, mode)
        words = await store.text_search(tenant_id, text_query(question), depth)
        if mode == "text":
            return SearchResult(words[:k], models, mode)
        fused = fuse_by_reciprocal_rank([*ranked, words], k)
        return SearchResult(fused, models, mode, degraded)


def text_query(question: str) -> str:
    """The question as a websearch_to_tsquery string that matches any of its terms: each
    whitespace-separated word or'ed (a hyphenated identifier stays one word, which PostgreSQL
    makes a phrase), quotes and leading minus signs (websearch's phrase and NOT) dropped."""
    words = [w.lstrip("-") for w in re.findall(r'[^\s"]+', question)]
    return " or ".join(w for w in words if w and w.lower() != "or")


def fuse_by_reciprocal_rank(ranked: list[list[SearchHit]], k: int) -> list[SearchHit]:
    """One list from several: each chunk scored by the sum of 1 / (RRF_K + rank) over the lists
    it is in (rank from 1), best first, ties by first appearance; the hit keeps its first
    list's fields with the fused score."""
    fused: dict[tuple[str, str, int], tuple[float, SearchHit]] = {}
    for hits in ranked:
        for rank, hit in enumerate(hits, 1):
            key = (hit.document_id, hit.chunker_version, hit.chunk_index)
            score, first = fused.get(key, (0.0, hit))
            fused[key] = (score + 1.0 / (RRF_K + rank), first)
    order = sorted(fused.values(), key=lambda pair: -pair[0])
    return [replace(hit, score=score) for score, hit in order[:k]]


async def search_chunks(
    settings: Settings, question: str, tenant_id: str, k: int = 5, mode: SearchMode | None = None
) -> list[SearchHit]:
    return (await search(settings, question, tenant_id, k, mode)).hits


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
    from ragstream.control import EMBED_SERVICE, snapshot
    from ragstream.cost.meter import BudgetGuard, KafkaUsageSink, Meter
    from ragstream.cost.pricing import PriceTable
    from ragstream.providers.embed.openai import OpenAIEmbedder
    from ragstream.providers.select import GuardedEmbedder, breaker_for

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
    stack.push_async_callback(embedder.aclose)
    return embedder


async def _embed_question(embedder: Embedder, question: str, tenant_id: str) -> list[float]:
    from ragstream.cost.meter import CallContext, current_call

    call = CallContext(SEARCH_STAGE, "", tenant_id, f"search-{uuid.uuid4()}")
    token = current_call.set(call)
    try:
        return (await embedder.embed([question])).vectors[0]
    finally:
        current_call.reset(token)
