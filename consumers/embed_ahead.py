"""Local embeddings of a micro-batch's documents, made ahead.

The embed stage handles a batch's records one after another in one transaction, and about half
of each record's time is PostgreSQL adding its vectors to the HNSW index. When the local
embedder serves, the vectors of the batch's later documents are made meanwhile, in a thread,
from the chunks as the chunk stage stored them. A local vector depends on its text alone (see
`ragstream.providers.embed.local`), so one made ahead is the very one the stage would make; the
stage still decides everything else (stale input, the cache, what is written). Ahead work is a
help, never a dependency: a document it has not reached, or could not read, is embedded by the
stage as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from ragstream.events import DocumentChunked, Event
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.embed.port import Embedder
from ragstream.store.models import ChunkRow

log = structlog.get_logger(__name__)

# text sha256 -> (vector, word count)
Made = dict[str, tuple[list[float], int]]

# Longest a document waits for its vectors made ahead: they take milliseconds; a read waiting
# for a pooled connection (the batch holds one) must never hold the stage.
TAKE_WAIT_S = 5.0


def _nothing() -> None:
    return None


class ChunkReader(Protocol):
    def load_chunks(self, document_id: str, chunker_version: str) -> Awaitable[list[ChunkRow]]: ...


class EmbeddingsAhead:
    """`start(events)` when a batch begins (several batches may run at once); the stage
    `take`s a document's vectors; what `start` returns stops the batch's work when it ends."""

    def __init__(self, store: ChunkReader, embedder: Embedder, local: LocalEmbedder) -> None:
        self.store = store  # read on a connection of its own, outside the batch's transaction
        self.embedder = embedder  # the stage's (a mode switch picks per document)
        self.local = local
        # The batches at once are of different partitions, so of different documents.
        self._documents: dict[tuple[str, str], asyncio.Future[Made]] = {}

    def serves(self, embedder: Embedder) -> bool:
        """Whether vectors made ahead are this embedder's: it is the local embedder itself, of
        the same size (not another provider, nor a wrapper that only names the local model)."""
        return isinstance(embedder, LocalEmbedder) and embedder.dimensions == self.local.dimensions

    def start(self, events: Sequence[Event]) -> Callable[[], None]:
        """Begin making the local vectors of a batch's documents, all but the first (the stage
        is on it at once); the callable returned drops what the stage has not taken."""
        if not self.serves(self.embedder.current()):
            return _nothing
        later = [e for e in events[1:] if isinstance(e, DocumentChunked)]
        if not later:
            return _nothing
        loop = asyncio.get_running_loop()
        documents = {(e.document_id, e.chunker_version): loop.create_future() for e in later}
        self._documents.update(documents)
        task = asyncio.create_task(self._make(dict(documents)))  # `take` pops its own

        def stop() -> None:
            task.cancel()
            for key, future in documents.items():
                if self._documents.get(key) is future:
                    del self._documents[key]

        return stop

    async def take(self, document_id: str, chunker_version: str, shas: Sequence[str]) -> Made:
        """The vectors made ahead for these texts of the document; empty when there are none,
        or when they are not made within `TAKE_WAIT_S` (the stage then makes them itself)."""
        future = self._documents.pop((document_id, chunker_version), None)
        if future is None:
            return {}
        try:
            made = await asyncio.wait_for(asyncio.shield(future), TAKE_WAIT_S)
        except TimeoutError:
            log.debug("embeddings ahead too slow", document_id=document_id)
            return {}
        return {sha: made[sha] for sha in shas if sha in made}

    async def _make(self, documents: dict[tuple[str, str], asyncio.Future[Made]]) -> None:
        try:
            for (document_id, version), future in documents.items():
                rows = await self.store.load_chunks(document_id, version)
                texts = {row.text_sha256: row.text for row in rows}
                made = await asyncio.to_thread(self._vectors, texts)
                if not future.done():
                    future.set_result(made)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the stage embeds what is not made
            log.debug("embeddings ahead stopped", error=repr(exc))
        finally:
            for future in documents.values():
                with contextlib.suppress(asyncio.InvalidStateError):
                    future.set_result({})

    def _vectors(self, texts: dict[str, str]) -> Made:
        return {sha: self.local.vector_of(text) for sha, text in texts.items()}
