"""Plain values the store takes and returns (no event classes: the store knows no Kafka)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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


class EmbeddingRow(NamedTuple):
    chunk_index: int
    text_sha256: str
    vector: Sequence[float]


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
