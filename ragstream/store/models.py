"""Plain values the store takes and returns (no event classes: the store knows no Kafka)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple, TypedDict

# Document statuses, in the order a document moves through them; 'duplicate' is terminal and
# 'failed' / 'dead-lettered' can be left by a later success (a redrive).
STATUSES: Final = (
    "uploaded",
    "parsed",
    "chunked",
    "embedded",
    "duplicate",
    "failed",
    "dead-lettered",
)
SUCCESS_STATUSES: Final = ("uploaded", "parsed", "chunked", "embedded")
FAILURE_STATUSES: Final = ("failed", "dead-lettered")
STAGES: Final = ("upload", "parse", "chunk", "embed")
OUTCOMES: Final = ("ok", "duplicate", "failed", "retry", "dead-lettered")

# The embedding cache scope every tenant shares (`embed.share_cache_across_tenants`); any other
# scope is a tenant id.
SHARED_CACHE: Final = ""

Status = Literal[
    "uploaded", "parsed", "chunked", "embedded", "duplicate", "failed", "dead-lettered"
]
Outcome = Literal["ok", "duplicate", "failed", "retry", "dead-lettered"]


@dataclass(frozen=True, slots=True)
class UploadDecision:
    """What register_upload decided: go on with this document, or not (it is a duplicate)."""

    proceed: bool
    status: str
    duplicate_of: str | None = None


@dataclass(frozen=True, slots=True)
class ChunkRow:
    index: int
    text: str
    text_sha256: str
    heading_path: list[str]
    token_count: int
    char_start: int
    char_end: int
    page: int | None = None


class ParseResult(NamedTuple):
    markdown: str
    page_count: int | None
    title: str | None


# -- what the stages hand the store: one record per document, so a batch is a list of them -----


@dataclass(frozen=True, slots=True)
class Upload:
    """A document to register (`register_upload`): who uploaded what, and where it is.
    `force` lets a duplicate of content the tenant already has proceed."""

    document_id: str
    tenant_id: str
    filename: str | None
    content_type: str | None
    size_bytes: int | None
    sha256: str
    source_uri: str | None
    metadata: Mapping[str, Any] | None
    correlation_id: str | None
    uploaded_at: datetime | None
    force: bool = False


@dataclass(frozen=True, slots=True)
class ParsedContent:
    """A parse result to keep (`save_parse`), keyed by the sha256 of its Markdown."""

    document_id: str
    tenant_id: str
    content_sha256: str
    parser: str
    parser_version: str
    markdown: str
    page_count: int | None
    title: str | None


@dataclass(frozen=True, slots=True)
class ChunkSet:
    """A document's chunks for one chunker version (`save_chunks`). `parse_sha256` names the
    parse content they were cut from, so a set cut from a parse the document has left is
    recognised as stale."""

    document_id: str
    tenant_id: str
    chunker_version: str
    chunker_settings: Mapping[str, Any]
    chunks: Sequence[ChunkRow]
    _: KW_ONLY
    parse_sha256: str | None = None


class EmbeddingRow(NamedTuple):
    chunk_index: int
    text_sha256: str
    vector: Sequence[float]


@dataclass(frozen=True, slots=True)
class EmbeddingSet:
    """A document's chunk embeddings from one model (`save_embeddings`), cached in
    `cache_scope`: a tenant id, SHARED_CACHE, or None for the document's tenant."""

    document_id: str
    tenant_id: str
    chunker_version: str
    model: str
    dimensions: int
    provider: str
    rows: Sequence[EmbeddingRow | tuple[int, str, Sequence[float]]]
    _: KW_ONLY
    cache_scope: str | None = None


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """Which cached vectors to read (`cached_embeddings`): texts by sha256, of one model and
    dimensions, in one cache scope (a tenant id, or SHARED_CACHE)."""

    model: str
    dimensions: int
    text_sha256s: Sequence[str]
    _: KW_ONLY
    cache_scope: str


@dataclass(frozen=True, slots=True)
class StatusChange:
    """One forward move of a document's status (`advance_status`).

    A success carries the pointers its stage produced and the ones it read (the
    `current_*` fields, as on Document), so a stale result is recognised; a failure
    ('failed', 'dead-lettered') names its `stage`. `tenant_id` is the tenant of the record
    behind the move: a document of another tenant is refused. Without it nothing is checked."""

    document_id: str
    status: str
    reason: str | None = None
    _: KW_ONLY
    tenant_id: str | None = None
    stage: str | None = None
    current_parse_sha256: str | None = None
    current_chunker_version: str | None = None
    current_embedding_model: str | None = None
    current_embedding_dimensions: int | None = None
    page_count: int | None = None
    chunk_count: int | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingModel:
    """A model and dimensions a tenant's searchable documents were embedded with."""

    model: str
    dimensions: int
    documents: int


@dataclass(frozen=True, slots=True)
class SearchHit:
    score: float  # 1 - cosine distance: 1.0 is the same direction
    document_id: str
    filename: str | None
    heading_path: list[str]
    chunk_index: int
    text: str
    page: int | None = None
    chunker_version: str = ""


@dataclass(frozen=True, slots=True)
class Document:
    document_id: str
    tenant_id: str
    filename: str | None
    content_type: str | None
    size_bytes: int | None
    sha256: str
    source_uri: str | None
    metadata: dict[str, Any]
    correlation_id: str | None
    status: str
    status_reason: str | None
    duplicate_of: str | None
    forced: bool
    page_count: int | None
    chunk_count: int | None
    current_parse_sha256: str | None
    current_chunker_version: str | None
    current_embedding_model: str | None
    current_embedding_dimensions: int | None
    searchable_chunker_version: str | None
    uploaded_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Step:
    stage: str
    input_event_id: str
    attempt: int
    outcome: str
    started_at: datetime
    finished_at: datetime
    duration_ms: float
    detail: dict[str, Any]
    correlation_id: str | None
    replay: str = ""  # a replayed copy's position (topic:partition:offset); "" when first run


@dataclass(frozen=True, slots=True)
class Journey:
    document: Document
    steps: list[Step] = field(default_factory=list)


class Summary(TypedDict):
    documents: int
    by_status: dict[str, int]
    pages: int
    chunks: int
    embeddings: int
    duplicates: int
    cached_embeddings: int
