"""The store's writes (and the reads the stages do while writing): idempotent upserts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import structlog

from ragstream.errors import PermanentError, TenantConflict
from ragstream.store import _sql as sql
from ragstream.store._base import (
    CacheRow,
    OnConnection,
    atomic,
    batch_on,
    check_dimensions,
    check_vector,
    json_dumps,
    known_tenant,
    remember_tenant,
)
from ragstream.store._errors import translate_errors
from ragstream.store.models import (
    FAILURE_STATUSES,
    OUTCOMES,
    STAGES,
    SUCCESS_STATUSES,
    CacheLookup,
    ChunkRow,
    ChunkSet,
    EmbeddingSet,
    ParsedContent,
    ParseResult,
    StatusChange,
    Upload,
    UploadDecision,
)
from ragstream.validation import check_no_nul

log = structlog.get_logger(__name__)


async def write_cache(conn: Any, rows: Iterable[CacheRow]) -> None:
    """Cache embeddings (rows already checked) in one statement, which writes them in key
    order (see sql.INSERT_CACHE); a key cached already stays."""
    columns = [list(column) for column in zip(*rows, strict=True)]
    if columns:
        await conn.execute(sql.INSERT_CACHE, *columns)


async def check_tenant(conn: Any, document_id: str, tenant_id: str) -> None:
    """Refuse a write for a document that belongs to another tenant (TenantConflict, naming
    neither the owner nor anything of its). A document not registered yet belongs to no one.
    A document's tenant never changes, so the check needs no lock, and within a batch's
    transaction a tenant seen once is not read again."""
    owner = known_tenant(conn, document_id) or await conn.fetchval(sql.DOCUMENT_TENANT, document_id)
    if owner is not None and owner != tenant_id:
        raise TenantConflict(document_id, tenant_id)
    if owner is not None:
        remember_tenant(conn, document_id, owner)


class WriteOperations(OnConnection):
    """What the stages write: documents and their status, steps, parses, chunks, embeddings.

    Every write for a document checks its tenant: a write whose tenant is not the document's
    changes nothing and raises TenantConflict (`advance_status` when given a `tenant_id`).
    The writes take one record each (see ragstream.store.models)."""

    @translate_errors
    async def register_upload(self, upload: Upload) -> UploadDecision:
        """Register a document (idempotent on document_id) and decide whether it is a duplicate.

        A duplicate is a later document of the same tenant with the same sha256 while an earlier
        one still counts (not failed or dead-lettered); it does not proceed unless `force`.
        Registrations of the same content are serialised, so of two arriving at once exactly one
        proceeds. Redelivery returns the same decision; `force` on a registered duplicate turns
        it into an original. A document id another tenant holds is a TenantConflict; one the
        tenant holds with other content, a PermanentError.
        """
        document_id, tenant_id, sha256 = upload.document_id, upload.tenant_id, upload.sha256
        filename, content_type, source_uri = upload.filename, upload.content_type, upload.source_uri
        metadata, correlation_id, force = upload.metadata, upload.correlation_id, upload.force
        check_no_nul(
            document_id=document_id,
            tenant_id=tenant_id,
            filename=filename,
            content_type=content_type,
            source_uri=source_uri,
            correlation_id=correlation_id,
            **{f"metadata key {k!r}": k for k in metadata or {}},
            **{f"metadata[{k!r}]": v for k, v in (metadata or {}).items() if isinstance(v, str)},
        )
        async with self._conn() as conn, atomic(conn):
            await conn.execute(sql.LOCK_CONTENT, tenant_id, sha256)
            existing = await conn.fetchrow(sql.EXISTING_UPLOAD, document_id)
            if existing is None:
                original = (
                    None
                    if force
                    else await conn.fetchval(sql.ORIGINAL, tenant_id, sha256, document_id)
                )
                status = "duplicate" if original else "uploaded"
                inserted = await conn.fetchval(
                    sql.INSERT_DOCUMENT,
                    document_id,
                    tenant_id,
                    filename,
                    content_type,
                    upload.size_bytes,
                    sha256,
                    source_uri,
                    dict(metadata or {}),
                    correlation_id,
                    upload.uploaded_at,
                    status,
                    original,
                    force,
                    f"duplicate of {original}" if original else None,
                )
                if inserted:
                    return UploadDecision(
                        proceed=original is None, status=status, duplicate_of=original
                    )
                # The same document_id registered at this moment with other content: see below.
                existing = await conn.fetchrow(sql.EXISTING_UPLOAD, document_id)
            if existing["tenant_id"] != tenant_id:
                raise TenantConflict(document_id, tenant_id)
            if existing["sha256"] != sha256:
                raise PermanentError(
                    f"document_id {document_id!r} is already registered with other content; "
                    "document ids must be unique"
                )
            if existing["status"] == "duplicate" and force:
                await conn.execute(sql.PROMOTE_FORCED, document_id)
                return UploadDecision(proceed=True, status="uploaded")
            if existing["status"] == "duplicate":
                return UploadDecision(False, "duplicate", existing["duplicate_of"])
            return UploadDecision(proceed=True, status=existing["status"])

    @translate_errors
    async def advance_status(self, change: StatusChange) -> bool:
        """Move a document forward; True if applied. A stale result (a late 'chunked' after
        'embedded', an embedding of a chunker version the document has left) changes nothing.

        Pass the pointers a stage produced (and the ones it read: `current_parse_sha256` with
        'chunked', `current_chunker_version` with 'embedded'), so stale results are recognised.
        A failure ('failed', 'dead-lettered') names its `stage` and counts only while the
        document has not passed that stage; any later success leaves it again (a redrive).

        `tenant_id` is the tenant of the record behind the move: a document of another tenant
        is refused (TenantConflict). Every caller should pass it; without it nothing is checked.
        """
        async with self._conn() as conn:
            if change.tenant_id is not None:
                await check_tenant(conn, change.document_id, change.tenant_id)
            status = change.status
            if status in FAILURE_STATUSES:
                if change.stage is not None and change.stage not in STAGES:
                    raise ValueError(f"stage must be one of {STAGES}, got {change.stage!r}")
                row = await conn.fetchval(
                    sql.ADVANCE_FAILURE, change.document_id, status, change.reason, change.stage
                )
            elif status in SUCCESS_STATUSES:
                row = await conn.fetchval(
                    sql.ADVANCE_SUCCESS,
                    change.document_id,
                    status,
                    change.reason,
                    change.current_parse_sha256,
                    change.current_chunker_version,
                    change.current_embedding_model,
                    change.current_embedding_dimensions,
                    change.page_count,
                    change.chunk_count,
                )
            else:
                raise ValueError(f"advance_status cannot set status {status!r}")
            return bool(row)

    @translate_errors
    async def record_step(
        self,
        document_id: str,
        tenant_id: str,
        stage: str,
        input_event_id: str,
        outcome: str,
        attempt: int,
        started_at: datetime,
        finished_at: datetime,
        detail: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        replay: str = "",
    ) -> None:
        """Record one stage step of a document's journey (one row per input event and attempt,
        and per replayed copy: `replay` is the copy's position, empty for the original).
        A step of another tenant's document is refused (TenantConflict): its journey is the
        owner's alone."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        check_no_nul(document_id=document_id, tenant_id=tenant_id, correlation_id=correlation_id)
        duration_ms = max(0.0, (finished_at - started_at).total_seconds() * 1000)
        async with self._conn() as conn:
            await check_tenant(conn, document_id, tenant_id)
            await conn.execute(
                sql.RECORD_STEP,
                document_id,
                stage,
                input_event_id,
                attempt,
                tenant_id,
                outcome,
                started_at,
                finished_at,
                duration_ms,
                dict(detail or {}),
                correlation_id,
                replay,
            )

    @translate_errors
    async def save_parse(self, parsed: ParsedContent) -> bool:
        """Keep a parse result, keyed by its content hash; True if it was new."""
        async with self._conn() as conn:
            await check_tenant(conn, parsed.document_id, parsed.tenant_id)
            row = await conn.fetchval(
                sql.INSERT_PARSE,
                parsed.document_id,
                parsed.content_sha256,
                parsed.tenant_id,
                parsed.parser,
                parsed.parser_version,
                parsed.markdown,
                parsed.page_count,
                parsed.title,
            )
        return bool(row)

    @translate_errors
    async def load_parse(self, document_id: str, content_sha256: str) -> ParseResult | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.LOAD_PARSE, document_id, content_sha256)
        return (
            None if row is None else ParseResult(row["markdown"], row["page_count"], row["title"])
        )

    # -- chunks -------------------------------------------------------------------------------

    @translate_errors
    async def save_chunks(self, chunk_set: ChunkSet) -> int:
        """Keep a document's chunks for one chunker version; the number of rows written.

        With `parse_sha256` (the parse content they were cut from): when the stored set of this
        version was cut from another parse and `parse_sha256` is the document's current one, the
        set (and its embeddings) is replaced; a set cut from a parse the document has left is
        stale and not written.
        """
        document_id, chunker_version = chunk_set.document_id, chunk_set.chunker_version
        chunks, parse_sha256 = chunk_set.chunks, chunk_set.parse_sha256
        if not chunks:
            return 0
        async with self._conn() as conn, atomic(conn):
            await check_tenant(conn, document_id, chunk_set.tenant_id)
            if parse_sha256 is not None:
                state = await conn.fetchrow(sql.CHUNK_SET, document_id, chunker_version)
                current = state["current"] if state else None
                stored = [s for s in (state["stored"] or []) if s is not None] if state else []
                if current is not None and parse_sha256 != current:
                    log.warning(
                        "store.chunks.stale",
                        document_id=document_id,
                        parse_sha256=parse_sha256,
                        current=current,
                    )
                    return 0
                if stored and stored != [parse_sha256]:
                    await conn.execute(sql.DELETE_CHUNK_SET, document_id, chunker_version)
            status = await conn.execute(
                sql.INSERT_CHUNKS,
                document_id,
                chunker_version,
                chunk_set.tenant_id,
                dict(chunk_set.chunker_settings),
                parse_sha256,
                [c.index for c in chunks],
                [c.text for c in chunks],
                [c.text_sha256 for c in chunks],
                [json_dumps(list(c.heading_path)) for c in chunks],
                [c.token_count for c in chunks],
                [c.char_start for c in chunks],
                [c.char_end for c in chunks],
                [c.page for c in chunks],
            )
        return int(status.rsplit(" ", 1)[-1])

    @translate_errors
    async def load_chunks(self, document_id: str, chunker_version: str) -> list[ChunkRow]:
        async with self._conn() as conn:
            rows = await conn.fetch(sql.LOAD_CHUNKS, document_id, chunker_version)
        return [
            ChunkRow(
                index=r["chunk_index"],
                text=r["text"],
                text_sha256=r["text_sha256"],
                heading_path=list(r["heading_path"]),
                token_count=r["token_count"],
                char_start=r["char_start"],
                char_end=r["char_end"],
                page=r["page"],
            )
            for r in rows
        ]

    # -- embeddings ---------------------------------------------------------------------------

    @translate_errors
    async def cached_embeddings(self, lookup: CacheLookup) -> dict[str, list[float]]:
        """The cached vectors among these texts (by sha256) in one cache scope (a tenant id, or
        SHARED_CACHE). Another scope's rows are never read."""
        keys = list(set(lookup.text_sha256s))  # a plain read: no lock order to keep
        if not keys:
            return {}
        dimensions = check_dimensions(lookup.dimensions)
        scope, model = lookup.cache_scope, lookup.model
        async with self._conn() as conn:
            rows = await conn.fetch(sql.CACHE_HITS, scope, model, dimensions, keys)
            batch = batch_on(conn)
        found = {r["text_sha256"]: r["embedding"].to_list() for r in rows}
        if batch is not None:  # cached earlier in this batch, written when it ends
            for sha in keys:
                row = batch.cache.get((scope, model, dimensions, sha))
                if row is not None and sha not in found:
                    found[sha] = row[4].to_list()
        return found

    @translate_errors
    async def save_embeddings(self, embeddings: EmbeddingSet) -> int:
        """Keep a document's chunk embeddings and cache them; the number of embedding rows written.

        They are cached in `cache_scope`: the tenant's own by default, or SHARED_CACHE. An
        embedding whose text_sha256 is not the chunk's current text is not written (a late
        result for replaced text) but is cached. Inside `Store.batch()` the cache rows are
        written when the batch ends (its lookups see them meanwhile).
        """
        document_id, tenant_id, rows = embeddings.document_id, embeddings.tenant_id, embeddings.rows
        model, dimensions, provider = embeddings.model, embeddings.dimensions, embeddings.provider
        check_dimensions(dimensions)
        if not rows:
            return 0
        indexes = [int(r[0]) for r in rows]
        shas = [str(r[1]) for r in rows]
        vectors = [check_vector(r[2], dimensions, f"chunk {r[0]}") for r in rows]
        scope = tenant_id if embeddings.cache_scope is None else embeddings.cache_scope
        async with self._conn() as conn, atomic(conn):
            await check_tenant(conn, document_id, tenant_id)
            status = await conn.execute(
                sql.INSERT_EMBEDDINGS,
                document_id,
                embeddings.chunker_version,
                model,
                dimensions,
                tenant_id,
                provider,
                indexes,
                shas,
                vectors,
            )
            cached = [
                (scope, model, dimensions, sha, vector, provider)
                for sha, vector in zip(shas, vectors, strict=True)
            ]
            batch = batch_on(conn)
            if batch is None:
                await write_cache(conn, cached)
            else:  # when the batch ends (see Store.batch)
                batch.cache.update((row[:4], row) for row in cached)
        return int(status.rsplit(" ", 1)[-1])

    # -- reading ------------------------------------------------------------------------------
