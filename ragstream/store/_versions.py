"""Pointing documents back at a chunker version or an embedding model they still hold.

Every chunker version's chunks and every model's embeddings stay in PostgreSQL (rows are keyed
by version, model and dimensions; only `ragstream prune` removes versions, and only those no
document points at beyond the newest N); a document points at the ones search
reads (`searchable_chunker_version`, `current_embedding_model`, `current_embedding_dimensions`).
A rollback moves those pointers, for every document of its scope at once, in one statement:

- chunker version V: a document moves when it holds chunks of V cut from its current parse,
  each with an embedding of the same text at the document's current model and dimensions;
- embedding model M at D dimensions: a document moves when every chunk of its current chunker
  version (cut from its current parse) has an embedding of the same text at M:D.

A document without those rows lacks the version's results: it is counted and left as it is
(a replay fills it). Duplicates have no results of their own and are never in scope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ragstream.store._base import OnConnection, check_dimensions
from ragstream.store._errors import translate_errors

# How many of the documents lacking the results a move names (the rest are counted).
LACKING_NAMED = 20

# Documents of the scope: not duplicates, of the tenants and documents asked ($2, $3: NULL for
# all). `{already}` says whether a document points at the target already.
_SCOPE = """
scope AS (
    SELECT d.document_id, d.tenant_id, d.current_parse_sha256 AS parse,
           d.current_chunker_version AS version, d.current_embedding_model AS model,
           d.current_embedding_dimensions AS dims, ({already}) IS TRUE AS already
    FROM documents d
    WHERE d.status <> 'duplicate'
      AND ($2::text[] IS NULL OR d.tenant_id = ANY($2::text[]))
      AND ($3::text[] IS NULL OR d.document_id = ANY($3::text[]))
)"""

# Per document of the scope holding chunks of the version: how many, how many were cut from
# the document's current parse (unknown counts as current), and how many have an embedding of
# the same text at the model and dimensions asked.
_KEPT = """
kept AS (
    SELECT s.document_id, count(*) AS chunks,
           count(*) FILTER (WHERE c.parse_sha256 IS NULL OR s.parse IS NULL
                                  OR c.parse_sha256 = s.parse) AS current,
           count(e.chunk_index) AS embedded
    FROM scope s
    JOIN chunks c ON c.document_id = s.document_id AND c.chunker_version = {version}
    LEFT JOIN embeddings e
        ON e.document_id = c.document_id AND e.chunker_version = c.chunker_version
       AND e.chunk_index = c.chunk_index AND e.model = {model} AND e.dimensions = {dims}
       AND e.text_sha256 = c.text_sha256
    GROUP BY s.document_id
)"""

_READY = """
ready AS (
    SELECT s.document_id, k.chunks FROM scope s JOIN kept k ON k.document_id = s.document_id
    WHERE NOT s.already AND k.current = k.chunks AND k.embedded = k.chunks
), lacking AS (
    SELECT s.document_id, s.tenant_id FROM scope s
    WHERE NOT s.already AND NOT EXISTS (SELECT 1 FROM ready r WHERE r.document_id = s.document_id)
)"""

# The move itself. A document on its way to another version (parsed, chunked) has all it needs
# at the target, so it is embedded there; a failed or dead-lettered one keeps its status and
# reason (the dead letter is still there to redrive).
_MOVE = """
moved AS (
    UPDATE documents d SET
        {pointers},
        chunk_count = r.chunks,
        status = CASE WHEN d.status IN ('uploaded', 'parsed', 'chunked') THEN 'embedded'
                 ELSE d.status END,
        stage_rank = CASE WHEN d.status IN ('uploaded', 'parsed', 'chunked', 'embedded')
                     THEN ragstream_status_rank('embedded') ELSE d.stage_rank END,
        status_reason = CASE WHEN d.status IN ('uploaded', 'parsed', 'chunked', 'embedded')
                        THEN {reason} ELSE d.status_reason END,
        updated_at = clock_timestamp()
    FROM ready r
    WHERE d.document_id = r.document_id
    RETURNING d.document_id
)"""

_COUNTS = """
SELECT (SELECT count(*) FROM scope) AS documents,
       (SELECT count(*) FROM scope WHERE already) AS already,
       (SELECT count(*) FROM ready) AS ready,
       {moved} AS moved,
       (SELECT count(*) FROM lacking) AS lacking,
       ARRAY(SELECT document_id FROM lacking ORDER BY document_id LIMIT {named}) AS lacking_ids,
       ARRAY(SELECT DISTINCT tenant_id FROM lacking ORDER BY tenant_id) AS lacking_tenants,
       {produced} AS produced
"""

_CHUNKER_PRODUCED = "EXISTS (SELECT 1 FROM kept)"
_EMBEDDING_PRODUCED = """EXISTS (
    SELECT 1 FROM scope s JOIN embeddings e ON e.document_id = s.document_id
    WHERE e.model = $1 AND e.dimensions = $4)"""


def _statement(
    *,
    already: str,
    kept: dict[str, str],
    pointers: str,
    reason: str,
    produced: str,
    dry_run: bool,
) -> str:
    ctes = [_SCOPE.format(already=already), _KEPT.format(**kept), _READY]
    if not dry_run:
        ctes.append(_MOVE.format(pointers=pointers, reason=reason))
    moved = "0::bigint" if dry_run else "(SELECT count(*) FROM moved)"
    counts = _COUNTS.format(moved=moved, named=LACKING_NAMED, produced=produced)
    return "WITH" + ",".join(ctes) + counts


def chunker_sql(*, dry_run: bool) -> str:
    """$1 version, $2 tenants, $3 documents; unless a dry run, $4 the status reason."""
    return _statement(
        already="d.current_chunker_version = $1 AND d.searchable_chunker_version = $1",
        kept={"version": "$1", "model": "s.model", "dims": "s.dims"},
        pointers="current_chunker_version = $1, searchable_chunker_version = $1",
        reason="$4",
        produced=_CHUNKER_PRODUCED,
        dry_run=dry_run,
    )


def embedding_sql(*, dry_run: bool) -> str:
    """$1 model, $2 tenants, $3 documents, $4 dimensions; unless a dry run, $5 the status
    reason."""
    return _statement(
        already="d.current_embedding_model = $1 AND d.current_embedding_dimensions = $4"
        " AND d.searchable_chunker_version = d.current_chunker_version",
        kept={"version": "s.version", "model": "$1", "dims": "$4"},
        pointers="current_embedding_model = $1, current_embedding_dimensions = $4,"
        " searchable_chunker_version = d.current_chunker_version",
        reason="$5",
        produced=_EMBEDDING_PRODUCED,
        dry_run=dry_run,
    )


# What the scope's documents hold, for an operator asking for a version none of them has.
_CHUNKER_VERSIONS = """
SELECT c.chunker_version AS version, count(DISTINCT c.document_id) AS documents
FROM chunks c JOIN documents d ON d.document_id = c.document_id
WHERE d.status <> 'duplicate'
  AND ($1::text[] IS NULL OR d.tenant_id = ANY($1::text[]))
  AND ($2::text[] IS NULL OR d.document_id = ANY($2::text[]))
GROUP BY 1 ORDER BY 2 DESC, 1
"""
_EMBEDDING_VERSIONS = """
SELECT e.model || ':' || e.dimensions AS version, count(DISTINCT e.document_id) AS documents
FROM embeddings e JOIN documents d ON d.document_id = e.document_id
WHERE d.status <> 'duplicate'
  AND ($1::text[] IS NULL OR d.tenant_id = ANY($1::text[]))
  AND ($2::text[] IS NULL OR d.document_id = ANY($2::text[]))
GROUP BY 1 ORDER BY 2 DESC, 1
"""


@dataclass(frozen=True, slots=True)
class VersionMove:
    """What a move to a version did (or, in a dry run, would do) to the documents asked."""

    documents: int  # in scope: the tenants' and documents' asked, duplicates left out
    already: int  # pointing at the target before the move
    ready: int  # holding the target's results and not pointing at it
    moved: int  # pointed at the target now (0 in a dry run)
    lacking: int  # lacking the target's results: left as they are
    lacking_ids: list[str] = field(default_factory=list)  # the first LACKING_NAMED of them
    lacking_tenants: list[str] = field(default_factory=list)
    produced: bool = True  # whether any document of the scope holds rows of the target


def _filters(tenants: Sequence[str], documents: Sequence[str]) -> tuple[list[str] | None, ...]:
    return (list(tenants) or None, list(documents) or None)


class VersionOperations(OnConnection):
    """Move documents' pointers back to rows they still hold; list what they hold."""

    @translate_errors
    async def point_at_chunker_version(
        self,
        version: str,
        *,
        tenants: Sequence[str] = (),
        documents: Sequence[str] = (),
        dry_run: bool = False,
    ) -> VersionMove:
        """Point the documents asked (all without `tenants` and `documents`) at chunker
        `version` wherever they hold its chunks and their embeddings at their current model,
        in one statement; search reads those rows from the next query on."""
        reason = f"rolled back to chunker version {version}"
        args = [version, *_filters(tenants, documents)]
        return await self._move(chunker_sql(dry_run=dry_run), args, None if dry_run else reason)

    @translate_errors
    async def point_at_embedding(
        self,
        model: str,
        dimensions: int,
        *,
        tenants: Sequence[str] = (),
        documents: Sequence[str] = (),
        dry_run: bool = False,
    ) -> VersionMove:
        """Point the documents asked at embeddings of `model` at `dimensions` wherever every
        chunk of their current chunker version has one, in one statement."""
        reason = f"rolled back to embedding {model}:{dimensions}"
        args = [model, *_filters(tenants, documents), check_dimensions(dimensions)]
        return await self._move(embedding_sql(dry_run=dry_run), args, None if dry_run else reason)

    async def _move(self, query: str, args: Sequence[object], reason: str | None) -> VersionMove:
        """Run a move (`reason`, its last argument, is left out of a dry run's)."""
        async with self._conn() as conn:
            row = await conn.fetchrow(query, *args, *([] if reason is None else [reason]))
        return VersionMove(**dict(row))

    @translate_errors
    async def kept_versions(
        self, kind: str, *, tenants: Sequence[str] = (), documents: Sequence[str] = ()
    ) -> dict[str, int]:
        """The chunker versions (`kind` "chunker") or embeddings (`model:dims`, "embedding")
        the documents asked hold rows of, with how many documents hold each, most first."""
        query = _CHUNKER_VERSIONS if kind == "chunker" else _EMBEDDING_VERSIONS
        async with self._conn() as conn:
            rows = await conn.fetch(query, *_filters(tenants, documents))
        return {r["version"]: int(r["documents"]) for r in rows}
