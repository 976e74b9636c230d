"""`ragstream search`: embed a question like the stored chunks, return the nearest ones."""

from __future__ import annotations

from ragstream.embedding import Embedder, LocalEmbedder
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store.models import SearchHit


def embedder_for(settings: Settings) -> Embedder:
    """The embedder the embed stage uses with these settings."""
    return LocalEmbedder(settings.embed.dimensions)


async def search_chunks(
    settings: Settings, question: str, tenant_id: str, k: int = 5
) -> list[SearchHit]:
    embedder = embedder_for(settings)
    query = (await embedder.embed([question])).vectors[0]
    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2) as store:
        return await store.search(tenant_id, query, embedder.model, embedder.dimensions, k)
