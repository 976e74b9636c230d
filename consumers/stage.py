"""The contract between the stages and the consumer runtime (no Kafka here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ragstream.errors import TenantConflict
from ragstream.events import Event
from ragstream.store.models import Document, StatusChange


@dataclass(frozen=True)
class Outcome:
    """What a stage made of one event: the event to publish (if any) and what to record."""

    output: Event | None
    status: str = "ok"  # ok | duplicate | skipped
    detail: dict[str, Any] = field(default_factory=dict)


# What a stage starts for a whole micro-batch before its records run one by one (given the
# batch's events); the callable it returns stops that work when the batch ends.
Ahead = Callable[[Sequence[Event]], Callable[[], None]]


@dataclass(frozen=True)
class RecordContext:
    """Where the event came from, for stages that care (attempt counts, replays, the record
    key the parse stage checks against the document id)."""

    topic: str
    partition: int
    offset: int
    attempt: int
    replay: bool
    key: bytes | None = None

    @property
    def replay_position(self) -> str:
        """`topic:partition:offset` of a replayed copy (`ragstream replay --live`), else ""."""
        return f"{self.topic}:{self.partition}:{self.offset}" if self.replay else ""


class StatusStore(Protocol):
    """The store's forward-only status move (see ragstream.store), which every stage uses.
    With `tenant_id`, a document of another tenant is refused (TenantConflict)."""

    def advance_status(self, change: StatusChange) -> Awaitable[bool]: ...

    def get_document(self, document_id: str) -> Awaitable[Document | None]: ...


async def stale_input(
    store: StatusStore,
    document_id: str,
    *,
    parse_sha256: str,
    chunker_version: str | None = None,
    tenant_id: str | None = None,
) -> Outcome | None:
    """A `skipped` outcome when the event is about a parse or chunker version the document
    has since left (a replay of old events after a re-parse or re-chunk): working on it would
    only pay for results nothing points at. None when the input is current.

    With `tenant_id`, an event naming another tenant's document is refused before any work
    (TenantConflict)."""
    doc = await store.get_document(document_id)
    if doc is None:
        return None
    if tenant_id is not None and doc.tenant_id != tenant_id:
        raise TenantConflict(document_id, tenant_id)
    stale = {
        "parse": (parse_sha256, doc.current_parse_sha256),
        "chunker_version": (chunker_version, doc.current_chunker_version),
    }
    for what, (given, current) in stale.items():
        if given is not None and current is not None and given != current:
            return Outcome(None, "skipped", {"stale": what, "input": given, "current": current})
    return None
