"""Pruning old chunk and embedding versions (`ragstream prune --keep-versions N`).

A version is a document's chunks of one chunker version, or its embeddings of one chunker
version, model and dimensions. A version goes when no document points at it and it is not
among the document's newest N versions (by when its rows were written):

- chunks: kept while the document's `current_chunker_version` or `searchable_chunker_version`
  names them (search reads the latter until the new version is embedded);
- embeddings: kept while they are of one of those chunker versions and the document's current
  model and dimensions; they go with their chunks when those go.

A stage writes a new version before it points the document at it, so the newest version is
always kept (N >= 1). Each batch of documents is pruned in one transaction with the documents'
rows locked, so a stage moving a document's pointers waits for it (and it for the stage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ragstream.store._base import OnConnection
from ragstream.store._errors import translate_errors

BATCH_DOCUMENTS = 200

# $1: versions to keep per document regardless; $2: only these documents (NULL: all).
_PLAN = """
WITH chunk_versions AS (
    SELECT document_id, tenant_id, chunker_version, count(*) AS n,
           row_number() OVER (PARTITION BY document_id
                              ORDER BY max(created_at) DESC, chunker_version DESC) AS newest
    FROM chunks
    WHERE $2::text[] IS NULL OR document_id = ANY($2::text[])
    GROUP BY document_id, tenant_id, chunker_version
), gone_chunks AS (
    SELECT v.* FROM chunk_versions v JOIN documents d USING (document_id)
    WHERE v.newest > $1
      AND v.chunker_version IS DISTINCT FROM d.current_chunker_version
      AND v.chunker_version IS DISTINCT FROM d.searchable_chunker_version
), embedding_versions AS (
    SELECT document_id, tenant_id, chunker_version, model, dimensions, count(*) AS n,
           row_number() OVER (PARTITION BY document_id
                              ORDER BY max(created_at) DESC, chunker_version DESC, model DESC,
                                       dimensions DESC) AS newest
    FROM embeddings
    WHERE $2::text[] IS NULL OR document_id = ANY($2::text[])
    GROUP BY document_id, tenant_id, chunker_version, model, dimensions
), gone_embeddings AS (
    SELECT v.* FROM embedding_versions v JOIN documents d USING (document_id)
    WHERE (v.chunker_version IN (d.current_chunker_version, d.searchable_chunker_version)
           AND v.model = d.current_embedding_model
           AND v.dimensions = d.current_embedding_dimensions) IS NOT TRUE
      AND (v.newest > $1 OR EXISTS (
              SELECT 1 FROM gone_chunks g
              WHERE g.document_id = v.document_id AND g.chunker_version = v.chunker_version))
)
SELECT 'chunks' AS kind, document_id, tenant_id, chunker_version, NULL::text AS model,
       NULL::integer AS dimensions, n FROM gone_chunks
UNION ALL
SELECT 'embeddings', document_id, tenant_id, chunker_version, model, dimensions, n
FROM gone_embeddings
ORDER BY 2, 1, 4, 5, 6
"""

_LOCK = (
    "SELECT 1 FROM documents WHERE document_id = ANY($1::text[]) ORDER BY document_id FOR UPDATE"
)

_DELETE_EMBEDDINGS = """
DELETE FROM embeddings e
USING unnest($1::text[], $2::text[], $3::text[], $4::integer[]) AS g(d, c, m, n)
WHERE e.document_id = g.d AND e.chunker_version = g.c AND e.model = g.m AND e.dimensions = g.n
"""

_DELETE_CHUNKS = """
DELETE FROM chunks c USING unnest($1::text[], $2::text[]) AS g(d, v)
WHERE c.document_id = g.d AND c.chunker_version = g.v
"""


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One version of one document's chunks or embeddings, and its rows."""

    kind: str  # chunks | embeddings
    document_id: str
    tenant_id: str
    chunker_version: str
    model: str | None
    dimensions: int | None
    rows: int


def versions_per_tenant(
    versions: Sequence[StoredVersion],
) -> dict[tuple[str, str], tuple[int, int]]:
    """(tenant, kind) -> (versions, rows)."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for v in versions:
        count, rows = out.get((v.tenant_id, v.kind), (0, 0))
        out[(v.tenant_id, v.kind)] = (count + 1, rows + v.rows)
    return dict(sorted(out.items()))


def _version(r: Any) -> StoredVersion:
    dims = r["dimensions"]
    return StoredVersion(
        r["kind"], r["document_id"], r["tenant_id"], r["chunker_version"], r["model"],
        None if dims is None else int(dims), int(r["n"]),
    )  # fmt: skip


class PruneOperations(OnConnection):
    @translate_errors
    async def prunable_versions(
        self, keep: int, document_ids: Sequence[str] | None = None
    ) -> list[StoredVersion]:
        """The versions `prune_versions(keep)` would remove now (all documents, or these)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                _PLAN, keep, None if document_ids is None else list(document_ids)
            )
        return [_version(r) for r in rows]

    @translate_errors
    async def prune_versions(
        self, keep: int, on_progress: Callable[[int, int], None] | None = None
    ) -> list[StoredVersion]:
        """Remove the versions no document points at beyond the newest `keep` per document;
        what was removed. `on_progress(documents done, documents)`."""
        if keep < 1:
            raise ValueError("keep at least the newest version of each document")
        documents = sorted({v.document_id for v in await self.prunable_versions(keep)})
        removed: list[StoredVersion] = []
        for start in range(0, len(documents), BATCH_DOCUMENTS):
            batch = documents[start : start + BATCH_DOCUMENTS]
            async with self._conn() as conn, conn.transaction():
                await conn.execute(_LOCK, batch)
                # Planned again under the lock: what the documents point at now.
                versions = [_version(r) for r in await conn.fetch(_PLAN, keep, batch)]
                emb = [v for v in versions if v.kind == "embeddings"]
                chunks = [v for v in versions if v.kind == "chunks"]
                await conn.execute(
                    _DELETE_EMBEDDINGS,
                    [v.document_id for v in emb], [v.chunker_version for v in emb],
                    [v.model for v in emb], [v.dimensions for v in emb],
                )  # fmt: skip
                await conn.execute(
                    _DELETE_CHUNKS,
                    [v.document_id for v in chunks],
                    [v.chunker_version for v in chunks],
                )
            removed += versions
            if on_progress is not None:
                on_progress(start + len(batch), len(documents))
        return removed
