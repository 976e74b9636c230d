"""Typed events: one frozen dataclass per Avro record in `schemas/`, mirroring its newest version.

Field names, order and defaults follow the schema exactly (a test holds them together). Avro
types map to Python as: string → str, long/int → int, boolean → bool, bytes → bytes,
map<string> → dict[str, str], array<string> → list[str], ["null", T] → T | None,
uuid → uuid.UUID, timestamp-millis → datetime (aware, UTC), decimal → Decimal, enum → StrEnum.

`event_id` and `occurred_at` default to a fresh uuid4 and now (UTC, whole milliseconds, as the
wire carries them), so `DocumentParsed(**uploaded.document_ref(), ...)` is all a stage writes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import ClassVar, TypedDict


def utc_now() -> datetime:
    """Now in UTC, truncated to whole milliseconds (what timestamp-millis can carry)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


class ThrottleState(StrEnum):
    OPEN = "OPEN"
    WARNING = "WARNING"
    THROTTLED = "THROTTLED"


class ServiceMode(StrEnum):
    REAL = "real"
    LOCAL = "local"
    HYBRID = "hybrid"


class CircuitState(StrEnum):
    """A circuit breaker's state on the wire (the same values as the breaker's own)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class DocumentRef(TypedDict):
    """What every event about a document carries forward from the one before it."""

    document_id: str
    tenant_id: str
    correlation_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Base of every event. `EVENT_TYPE` is the Avro record name (and the event-type header)."""

    EVENT_TYPE: ClassVar[str] = ""

    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    occurred_at: datetime = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentEvent(Event):
    """An event about one document; keyed by `document_id` on every topic."""

    document_id: str
    tenant_id: str
    correlation_id: str

    def document_ref(self) -> DocumentRef:
        return DocumentRef(
            document_id=self.document_id,
            tenant_id=self.tenant_id,
            correlation_id=self.correlation_id,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentUploaded(DocumentEvent):
    EVENT_TYPE: ClassVar[str] = "DocumentUploaded"

    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    source_uri: str | None = None
    content: bytes | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    force: bool = False
    source_system: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentParsed(DocumentEvent):
    EVENT_TYPE: ClassVar[str] = "DocumentParsed"

    uploaded_at: datetime
    parser: str
    parser_version: str
    source_sha256: str
    content_sha256: str
    page_count: int
    char_count: int
    title: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentChunked(DocumentEvent):
    EVENT_TYPE: ClassVar[str] = "DocumentChunked"

    uploaded_at: datetime
    chunker_version: str
    content_sha256: str
    chunk_count: int
    token_count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentEmbedded(DocumentEvent):
    EVENT_TYPE: ClassVar[str] = "DocumentEmbedded"

    uploaded_at: datetime
    chunker_version: str
    embedder: str
    model: str
    dimensions: int
    chunk_count: int
    new_embeddings: int
    cached_embeddings: int
    token_count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class CostUsage(Event):
    EVENT_TYPE: ClassVar[str] = "CostUsage"

    service: str
    operation: str
    model: str | None = None
    unit: str
    units: int
    unit_price_usd: Decimal
    cost_usd: Decimal
    tenant_id: str | None = None
    document_ids: list[str] = field(default_factory=list)
    stage: str | None = None
    correlation_id: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ThrottleEvent(Event):
    EVENT_TYPE: ClassVar[str] = "ThrottleEvent"

    service: str
    tenant_id: str | None = None
    state: ThrottleState
    reason: str
    window: str
    window_ends_at: datetime | None = None
    spent_usd: Decimal
    budget_usd: Decimal
    requests: int
    request_budget: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ServiceModeChanged(Event):
    EVENT_TYPE: ClassVar[str] = "ServiceModeChanged"

    service: str
    mode: ServiceMode
    reason: str | None = None
    requested_by: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class CircuitStateChanged(Event):
    EVENT_TYPE: ClassVar[str] = "CircuitStateChanged"

    service: str
    worker_id: str
    host: str
    pid: int
    client_id: str | None = None
    state: CircuitState
    since: datetime


EVENT_TYPES: dict[str, type[Event]] = {
    cls.EVENT_TYPE: cls
    for cls in (
        DocumentUploaded,
        DocumentParsed,
        DocumentChunked,
        DocumentEmbedded,
        CostUsage,
        ThrottleEvent,
        ServiceModeChanged,
        CircuitStateChanged,
    )
}

__all__ = [
    "EVENT_TYPES",
    "CircuitState",
    "CircuitStateChanged",
    "CostUsage",
    "DocumentChunked",
    "DocumentEmbedded",
    "DocumentEvent",
    "DocumentParsed",
    "DocumentRef",
    "DocumentUploaded",
    "Event",
    "ServiceMode",
    "ServiceModeChanged",
    "ThrottleEvent",
    "ThrottleState",
    "utc_now",
]
