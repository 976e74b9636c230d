"""The embed stage: DocumentChunked → DocumentEmbedded. Knows nothing of Kafka.

Embeddings are cached by (model, dimensions, sha256 of the chunk text): only text not seen
before is sent to the embedder.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from consumers.stage import Outcome, StatusStore
from ragstream.embedding import Embedder
from ragstream.errors import PermanentError
from ragstream.events import DocumentChunked, DocumentEmbedded
from ragstream.store.models import ChunkRow


class EmbedStore(StatusStore, Protocol):
    """What the embed stage needs of the store."""

    def load_chunks(self, document_id: str, chunker_version: str) -> Awaitable[list[ChunkRow]]: ...

    def cached_embeddings(
        self, model: str, dimensions: int, text_sha256s: Sequence[str]
    ) -> Awaitable[dict[str, list[float]]]: ...

    def save_embeddings(
        self,
        document_id: str,
        tenant_id: str,
        chunker_version: str,
        model: str,
        dimensions: int,
        provider: str,
        rows: Sequence[tuple[int, str, Sequence[float]]],
    ) -> Awaitable[int]: ...


@dataclass(frozen=True)
class EmbedDeps:
    store: EmbedStore
    embedder: Embedder
    batch_size: int = 256


async def embed(chunked: DocumentChunked, deps: EmbedDeps) -> Outcome:
    chunks = await deps.store.load_chunks(chunked.document_id, chunked.chunker_version)
    if len(chunks) != chunked.chunk_count:
        raise PermanentError(
            f"store holds {len(chunks)} chunks of version {chunked.chunker_version}, "
            f"the event says {chunked.chunk_count}"
        )
    embedder = deps.embedder
    shas = [c.text_sha256 for c in chunks]
    vectors = await deps.store.cached_embeddings(
        embedder.model, embedder.dimensions, sorted(set(shas))
    )
    cached = len(vectors)
    todo: dict[str, str] = {}
    for c in chunks:
        if c.text_sha256 not in vectors:
            todo.setdefault(c.text_sha256, c.text)
    tokens = 0
    pending = list(todo.items())
    for start in range(0, len(pending), deps.batch_size):
        batch = pending[start : start + deps.batch_size]
        result = await embedder.embed([text for _, text in batch])
        tokens += result.token_count
        for (sha, _), vector in zip(batch, result.vectors, strict=True):
            vectors[sha] = vector
    await deps.store.save_embeddings(
        document_id=chunked.document_id,
        tenant_id=chunked.tenant_id,
        chunker_version=chunked.chunker_version,
        model=embedder.model,
        dimensions=embedder.dimensions,
        provider=embedder.name,
        rows=[(c.index, c.text_sha256, vectors[c.text_sha256]) for c in chunks],
    )
    await deps.store.advance_status(
        chunked.document_id,
        "embedded",
        current_embedding_model=embedder.model,
        current_embedding_dimensions=embedder.dimensions,
        current_chunker_version=chunked.chunker_version,
    )
    event = DocumentEmbedded(
        document_id=chunked.document_id,
        tenant_id=chunked.tenant_id,
        correlation_id=chunked.correlation_id,
        uploaded_at=chunked.uploaded_at,
        chunker_version=chunked.chunker_version,
        embedder=embedder.name,
        model=embedder.model,
        dimensions=embedder.dimensions,
        chunk_count=len(chunks),
        new_embeddings=len(todo),
        cached_embeddings=cached,
        token_count=tokens,
    )
    return Outcome(
        event,
        detail={"chunks": len(chunks), "embedded": len(todo), "cached": cached, "tokens": tokens},
    )
