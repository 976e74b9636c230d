"""In-memory stand-ins for the stages' ports, for unit tests that run with no broker and no
database.

`InMemoryStore` satisfies `ParseStore`, `ChunkStore` and `EmbedStore` (mypy checks it, see the
end of this file) with the semantics of the PostgreSQL store that the stages rely on: status
moves only forward and a stale result changes nothing; a write naming another tenant's document
raises TenantConflict; a second upload of content the tenant already has is a duplicate unless
forced; chunks are kept per chunker version and replaced when cut from a new parse; embeddings
are kept per model and dimensions, and cached per tenant (or in the shared scope).
`tests/integration/test_store_contract.py` runs the same assertions against both stores, so
this one cannot drift from the real one.

`RecordingEmbedder` wraps the real local embedder to record what was sent to it, and plays
the one provider the real local ones cannot: a hybrid embedder whose real service is down, so
its results come from the local model while it names the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from consumers.chunk import ChunkStore
from consumers.embed import EmbedStore
from consumers.parse import ParseStore
from ragstream.errors import PermanentError, TenantConflict
from ragstream.providers.embed.port import Embedder, EmbedResult
from ragstream.store._base import check_dimensions, check_vector
from ragstream.store.models import (
    FAILURE_STATUSES,
    STAGES,
    STATUSES,
    SUCCESS_STATUSES,
    CacheLookup,
    ChunkRow,
    ChunkSet,
    Document,
    EmbeddingSet,
    ParsedContent,
    ParseResult,
    StatusChange,
    Upload,
    UploadDecision,
)

# The rank a success reaches (ragstream_status_rank) and the rank a stage's success reaches
# (ragstream_stage_rank), as the migrations define them.
STATUS_RANK = {status: rank for rank, status in enumerate(STATUSES[:5], start=1)}
STAGE_RANK = {stage: rank for rank, stage in enumerate(STAGES, start=1)}


@dataclass(frozen=True, slots=True)
class StoredEmbedding:
    text_sha256: str
    provider: str
    vector: list[float]


@dataclass(frozen=True, slots=True)
class CachedVector:
    provider: str
    vector: list[float]


@dataclass
class InMemoryStore:
    """The stages' store, in dictionaries. The tables are public for tests to look at."""

    documents: dict[str, Document] = field(default_factory=dict)
    stage_ranks: dict[str, int] = field(default_factory=dict)
    parses: dict[tuple[str, str], ParsedContent] = field(default_factory=dict)
    # (document, chunker version) -> chunk index -> (chunk, the parse it was cut from)
    chunks: dict[tuple[str, str], dict[int, tuple[ChunkRow, str | None]]] = field(
        default_factory=dict
    )
    # (document, chunker version, chunk index, model, dimensions) -> embedding
    embeddings: dict[tuple[str, str, int, str, int], StoredEmbedding] = field(default_factory=dict)
    # (scope, model, dimensions, text sha256) -> vector; hits counted beside it
    cache: dict[tuple[str, str, int, str], CachedVector] = field(default_factory=dict)
    cache_hits: dict[tuple[str, str, int, str], int] = field(default_factory=dict)

    # -- documents and status ------------------------------------------------------------------

    async def get_document(self, document_id: str) -> Document | None:
        return self.documents.get(document_id)

    def _check_tenant(self, document_id: str, tenant_id: str) -> None:
        doc = self.documents.get(document_id)
        if doc is not None and doc.tenant_id != tenant_id:
            raise TenantConflict(document_id, tenant_id)

    def _registered(self, document_id: str) -> Document:
        doc = self.documents.get(document_id)
        if doc is None:  # the real store's foreign key
            raise PermanentError(f"document {document_id!r} is not registered")
        return doc

    async def register_upload(self, upload: Upload) -> UploadDecision:
        existing = self.documents.get(upload.document_id)
        if existing is None:
            original = None if upload.force else self._original(upload)
            status = "duplicate" if original else "uploaded"
            now = datetime.now(UTC)
            self.documents[upload.document_id] = Document(
                document_id=upload.document_id,
                tenant_id=upload.tenant_id,
                filename=upload.filename,
                content_type=upload.content_type,
                size_bytes=upload.size_bytes,
                sha256=upload.sha256,
                source_uri=upload.source_uri,
                metadata=dict(upload.metadata or {}),
                correlation_id=upload.correlation_id,
                status=status,
                status_reason=f"duplicate of {original}" if original else None,
                duplicate_of=original,
                forced=upload.force,
                page_count=None,
                chunk_count=None,
                current_parse_sha256=None,
                current_chunker_version=None,
                current_embedding_model=None,
                current_embedding_dimensions=None,
                searchable_chunker_version=None,
                uploaded_at=upload.uploaded_at,
                created_at=now,
                updated_at=now,
            )
            self.stage_ranks[upload.document_id] = 1
            return UploadDecision(proceed=original is None, status=status, duplicate_of=original)
        if existing.tenant_id != upload.tenant_id:
            raise TenantConflict(upload.document_id, upload.tenant_id)
        if existing.sha256 != upload.sha256:
            raise PermanentError(
                f"document_id {upload.document_id!r} is already registered with other content; "
                "document ids must be unique"
            )
        if existing.status == "duplicate" and upload.force:
            self._update(
                existing,
                status="uploaded",
                duplicate_of=None,
                forced=True,
                status_reason="forced",
            )
            self.stage_ranks[upload.document_id] = 1
            return UploadDecision(proceed=True, status="uploaded")
        if existing.status == "duplicate":
            return UploadDecision(False, "duplicate", existing.duplicate_of)
        return UploadDecision(proceed=True, status=existing.status)

    def _original(self, upload: Upload) -> str | None:
        """The earliest document of the tenant with this content that still counts."""
        for doc in self.documents.values():  # in the order they were registered
            if (
                doc.tenant_id == upload.tenant_id
                and doc.sha256 == upload.sha256
                and doc.document_id != upload.document_id
                and doc.status not in ("duplicate", *FAILURE_STATUSES)
            ):
                return doc.document_id
        return None

    def _update(self, doc: Document, **changes: Any) -> None:
        self.documents[doc.document_id] = replace(doc, updated_at=datetime.now(UTC), **changes)

    async def advance_status(self, change: StatusChange) -> bool:
        if change.tenant_id is not None:
            self._check_tenant(change.document_id, change.tenant_id)
        if change.status in FAILURE_STATUSES:
            if change.stage is not None and change.stage not in STAGES:
                raise ValueError(f"stage must be one of {STAGES}, got {change.stage!r}")
            return self._fail(change)
        if change.status in SUCCESS_STATUSES:
            return self._succeed(change)
        raise ValueError(f"advance_status cannot set status {change.status!r}")

    def _fail(self, change: StatusChange) -> bool:
        doc = self.documents.get(change.document_id)
        if doc is None or doc.status == "duplicate":
            return False
        rank = self.stage_ranks[doc.document_id]
        counts = (
            doc.status != "embedded" if change.stage is None else rank < STAGE_RANK[change.stage]
        )
        if counts:
            self._update(doc, status=change.status, status_reason=change.reason)
        return counts

    def _succeed(self, change: StatusChange) -> bool:
        """ADVANCE_SUCCESS: applied when fresh (its inputs are what the document points at)
        and progress or a new generation at its own stage; a fresh result that is neither
        only fills in a count still missing."""
        c, doc = change, self.documents.get(change.document_id)
        if doc is None:
            return False
        fresh = (
            doc.status != "duplicate"
            and not (
                c.status in ("chunked", "embedded")
                and _differs(c.current_parse_sha256, doc.current_parse_sha256)
            )
            and not (
                c.status == "embedded"
                and _differs(c.current_chunker_version, doc.current_chunker_version)
            )
        )
        if not fresh:
            return False
        new_generation = (
            (c.status == "parsed" and _differs(c.current_parse_sha256, doc.current_parse_sha256))
            or (
                c.status == "chunked"
                and _differs(c.current_chunker_version, doc.current_chunker_version)
            )
            or (
                c.status == "embedded"
                and (
                    _differs(c.current_embedding_model, doc.current_embedding_model)
                    or _differs(c.current_embedding_dimensions, doc.current_embedding_dimensions)
                )
            )
        )
        progress = STATUS_RANK[c.status] > self.stage_ranks[doc.document_id]
        if not (progress or new_generation):
            self._fill(doc, c)
            return False
        pointers: dict[str, Any] = {
            "current_parse_sha256": _first(c.current_parse_sha256, doc.current_parse_sha256),
            "current_chunker_version": _first(
                c.current_chunker_version, doc.current_chunker_version
            ),
            "page_count": _first(c.page_count, doc.page_count),
            "chunk_count": _first(c.chunk_count, doc.chunk_count),
        }
        if c.status == "embedded":
            pointers |= {
                "current_embedding_model": _first(
                    c.current_embedding_model, doc.current_embedding_model
                ),
                "current_embedding_dimensions": _first(
                    c.current_embedding_dimensions, doc.current_embedding_dimensions
                ),
                "searchable_chunker_version": pointers["current_chunker_version"],
            }
        self.stage_ranks[doc.document_id] = STATUS_RANK[c.status]
        self._update(doc, status=c.status, status_reason=c.reason, **pointers)
        return True

    def _fill(self, doc: Document, change: StatusChange) -> None:
        """A late result of the same generation: only counts still missing are filled in
        (the row is written, its updated_at is not moved)."""
        self.documents[doc.document_id] = replace(
            doc,
            page_count=_first(doc.page_count, change.page_count),
            chunk_count=_first(doc.chunk_count, change.chunk_count),
        )

    # -- parse results -------------------------------------------------------------------------

    async def save_parse(self, parsed: ParsedContent) -> bool:
        self._check_tenant(parsed.document_id, parsed.tenant_id)
        self._registered(parsed.document_id)
        key = (parsed.document_id, parsed.content_sha256)
        if key in self.parses:
            return False
        self.parses[key] = parsed
        return True

    async def load_parse(self, document_id: str, content_sha256: str) -> ParseResult | None:
        p = self.parses.get((document_id, content_sha256))
        return None if p is None else ParseResult(p.markdown, p.page_count, p.title)

    # -- chunks --------------------------------------------------------------------------------

    async def save_chunks(self, chunk_set: ChunkSet) -> int:
        s = chunk_set
        if not s.chunks:
            return 0
        self._check_tenant(s.document_id, s.tenant_id)
        doc = self._registered(s.document_id)
        key = (s.document_id, s.chunker_version)
        stored = self.chunks.get(key, {})
        if s.parse_sha256 is not None:
            current = doc.current_parse_sha256
            if current is not None and s.parse_sha256 != current:
                return 0  # cut from a parse the document has left
            cut_from = sorted({p for _, p in stored.values() if p is not None})
            if cut_from and cut_from != [s.parse_sha256]:  # a new parse: the set is replaced
                stored.clear()
                for k in [k for k in self.embeddings if k[:2] == key]:
                    del self.embeddings[k]
        new = {c.index: (c, s.parse_sha256) for c in s.chunks if c.index not in stored}
        self.chunks[key] = {**stored, **new}
        return len(new)

    async def load_chunks(self, document_id: str, chunker_version: str) -> list[ChunkRow]:
        stored = self.chunks.get((document_id, chunker_version), {})
        return [stored[i][0] for i in sorted(stored)]

    # -- embeddings ----------------------------------------------------------------------------

    async def cached_embeddings(self, lookup: CacheLookup) -> dict[str, list[float]]:
        keys = sorted(set(lookup.text_sha256s))
        if not keys:
            return {}
        dimensions = check_dimensions(lookup.dimensions)
        found: dict[str, list[float]] = {}
        for sha in keys:
            key = (lookup.cache_scope, lookup.model, dimensions, sha)
            if key in self.cache:
                self.cache_hits[key] = self.cache_hits.get(key, 0) + 1
                found[sha] = list(self.cache[key].vector)
        return found

    async def save_embeddings(self, embeddings: EmbeddingSet) -> int:
        e = embeddings
        check_dimensions(e.dimensions)
        if not e.rows:
            return 0
        rows = [
            (int(r[0]), str(r[1]), check_vector(r[2], e.dimensions, f"chunk {r[0]}").to_list())
            for r in e.rows
        ]
        scope = e.tenant_id if e.cache_scope is None else e.cache_scope
        self._check_tenant(e.document_id, e.tenant_id)
        chunks = self.chunks.get((e.document_id, e.chunker_version), {})
        written = 0
        for index, sha, vector in rows:
            if index not in chunks or chunks[index][0].text_sha256 != sha:
                continue  # not the chunk's text as it is now
            key = (e.document_id, e.chunker_version, index, e.model, e.dimensions)
            old = self.embeddings.get(key)
            if old is None or old.text_sha256 != sha:
                self.embeddings[key] = StoredEmbedding(sha, e.provider, vector)
                written += 1
        for _, sha, vector in rows:
            self.cache.setdefault(
                (scope, e.model, e.dimensions, sha), CachedVector(e.provider, vector)
            )
        return written

    def embeddings_of(self, document_id: str, chunker_version: str) -> dict[tuple[str, int], int]:
        """How many embeddings of the chunk set each (model, dimensions) holds."""
        counts: dict[tuple[str, int], int] = {}
        for doc, version, _, model, dims in self.embeddings:
            if (doc, version) == (document_id, chunker_version):
                counts[model, dims] = counts.get((model, dims), 0) + 1
        return counts


def _differs(given: object, current: object) -> bool:
    """SQL's `given <> current IS TRUE`: both known and not equal."""
    return given is not None and current is not None and given != current


def _first(value: Any, otherwise: Any) -> Any:
    """SQL's coalesce."""
    return otherwise if value is None else value


class RecordingEmbedder(Embedder):
    """An embedder that passes every call to `serving` (the real local one) and records the
    texts of each call.

    With `named` it names another model than the one serving it, whose results say who really
    produced them: a hybrid embedder whose real service is down (ragstream.providers.select's
    guarded embedder with its circuit open falls back to the local one)."""

    def __init__(self, serving: Embedder, *, named: str | None = None) -> None:
        self.serving = serving
        self._named = named
        self.calls: list[list[str]] = []

    @property
    def name(self) -> str:
        return "openai" if self._named else self.serving.name

    @property
    def model(self) -> str:
        return self._named or self.serving.model

    @property
    def dimensions(self) -> int:
        return self.serving.dimensions

    async def embed(self, texts: list[str]) -> EmbedResult:
        self.calls.append(list(texts))
        return await self.serving.embed(texts)

    @property
    def embedded(self) -> list[str]:
        """Every text sent to the embedder, in order."""
        return [text for call in self.calls for text in call]


def _satisfies_the_ports(
    store: InMemoryStore, embedder: RecordingEmbedder
) -> tuple[ParseStore, ChunkStore, EmbedStore, Embedder]:
    """Never called: mypy checks here that the fakes fit the stages' ports."""
    return store, store, store, embedder
