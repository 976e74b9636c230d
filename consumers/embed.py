"""The embed stage: DocumentChunked → DocumentEmbedded. Knows nothing of Kafka.

Embeddings are cached by (model, dimensions, sha256 of the chunk text), per tenant: only text
the tenant has not had embedded before is sent to the embedder. With
`embed.share_cache_across_tenants` the cache is one for all tenants (a hit then tells a tenant
that another one has embedded the same text).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from consumers.embed_ahead import EmbeddingsAhead, Made
from consumers.stage import Outcome, StatusStore, stale_input
from ragstream.errors import PermanentError
from ragstream.events import DocumentChunked, DocumentEmbedded
from ragstream.providers.embed.port import Embedder
from ragstream.store.models import (
    SHARED_CACHE,
    CacheLookup,
    ChunkRow,
    EmbeddingRow,
    EmbeddingSet,
    StatusChange,
)


class EmbedStore(StatusStore, Protocol):
    """What the embed stage needs of the store."""

    def load_chunks(self, document_id: str, chunker_version: str) -> Awaitable[list[ChunkRow]]: ...

    def cached_embeddings(self, lookup: CacheLookup) -> Awaitable[dict[str, list[float]]]: ...

    def save_embeddings(self, embeddings: EmbeddingSet) -> Awaitable[int]: ...


@dataclass(frozen=True)
class EmbedDeps:
    store: EmbedStore
    embedder: Embedder
    share_cache: bool = False  # embed.share_cache_across_tenants
    ahead: EmbeddingsAhead | None = None  # a batch's local vectors, made while it writes

    def cache_scope(self, tenant_id: str) -> str:
        return SHARED_CACHE if self.share_cache else tenant_id


def _for_this_document(embedder: Embedder) -> Embedder:
    """The embedder serving now: a mode switch (see ragstream.providers.modes) picks per document."""
    return embedder.current()


async def _embed_missing(
    embedder: Embedder, texts: dict[str, str], model: str, made: Made | None = None
) -> tuple[dict[str, list[float]], int, str, str]:
    """Embed `texts` (sha -> text) in one call, but for those `made` ahead by this very
    embedder; the provider packs requests to its limits. Returns vectors, tokens, and the
    provider and model that really produced them."""
    made = made or {}
    vectors = {sha: made[sha][0] for sha in texts if sha in made}
    tokens = sum(made[sha][1] for sha in vectors)
    rest = {sha: text for sha, text in texts.items() if sha not in made}
    if not rest:
        return vectors, tokens, embedder.name, model
    result = await embedder.embed(list(rest.values()))
    vectors.update(zip(rest, result.vectors, strict=True))
    return vectors, tokens + result.token_count, result.provider, result.model


async def embed(chunked: DocumentChunked, deps: EmbedDeps) -> Outcome:
    """Embed a document's chunks, reusing cached vectors of the same model and dimensions.

    One document's vectors all come from one model: if a hybrid embedder fell back to the local
    provider, cached vectors of the real model are not mixed in; the whole document is embedded
    by the model that served the call. An event of a chunker version or parse the document
    has left is skipped: nothing points at what it would make."""
    skipped = await stale_input(
        deps.store,
        chunked.document_id,
        parse_sha256=chunked.content_sha256,
        chunker_version=chunked.chunker_version,
        tenant_id=chunked.tenant_id,
    )
    if skipped is not None:
        return skipped
    chunks = await deps.store.load_chunks(chunked.document_id, chunked.chunker_version)
    if len(chunks) != chunked.chunk_count:
        raise PermanentError(
            f"store holds {len(chunks)} chunks of version {chunked.chunker_version}, "
            f"the event says {chunked.chunk_count}"
        )
    embedder = _for_this_document(deps.embedder)
    dimensions = embedder.dimensions
    texts = {c.text_sha256: c.text for c in chunks}
    scope = deps.cache_scope(chunked.tenant_id)
    vectors = await deps.store.cached_embeddings(
        CacheLookup(embedder.model, dimensions, sorted(texts), cache_scope=scope)
    )
    cached = len(vectors)
    todo = {sha: text for sha, text in texts.items() if sha not in vectors}
    made: Made = {}
    if todo and deps.ahead is not None and deps.ahead.serves(embedder):
        made = await deps.ahead.take(chunked.document_id, chunked.chunker_version, list(todo))
    fresh, tokens, provider, model = await _embed_missing(embedder, todo, embedder.model, made)
    if model != embedder.model:  # served by the fallback: no vector of another model may stay
        rest = {sha: text for sha, text in texts.items() if sha not in fresh}
        more, more_tokens, _, _ = await _embed_missing(embedder, rest, model)
        vectors, cached, tokens = {**fresh, **more}, 0, tokens + more_tokens
        todo = texts
    else:
        vectors.update(fresh)
    await deps.store.save_embeddings(
        EmbeddingSet(
            document_id=chunked.document_id,
            tenant_id=chunked.tenant_id,
            chunker_version=chunked.chunker_version,
            model=model,
            dimensions=dimensions,
            provider=provider,
            rows=[EmbeddingRow(c.index, c.text_sha256, vectors[c.text_sha256]) for c in chunks],
            cache_scope=scope,
        )
    )
    await deps.store.advance_status(
        StatusChange(
            chunked.document_id,
            "embedded",
            tenant_id=chunked.tenant_id,
            current_embedding_model=model,
            current_embedding_dimensions=dimensions,
            current_chunker_version=chunked.chunker_version,
        )
    )
    event = DocumentEmbedded(
        document_id=chunked.document_id,
        tenant_id=chunked.tenant_id,
        correlation_id=chunked.correlation_id,
        uploaded_at=chunked.uploaded_at,
        chunker_version=chunked.chunker_version,
        embedder=provider,
        model=model,
        dimensions=dimensions,
        chunk_count=len(chunks),
        new_embeddings=len(todo),
        cached_embeddings=cached,
        token_count=tokens,
    )
    return Outcome(
        event,
        detail={
            "chunks": len(chunks),
            "embedded": len(todo),
            "cached": cached,
            "tokens": tokens,
            "provider": provider,
        },
    )
