"""The contract between the stages and the consumer runtime (no Kafka here)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ragstream.events import Event


@dataclass(frozen=True)
class Outcome:
    """What a stage made of one event: the event to publish (if any) and what to record."""

    output: Event | None
    status: str = "ok"  # ok | duplicate | skipped
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordContext:
    """Where the event came from, for stages that care (attempt counts, replays)."""

    topic: str
    partition: int
    offset: int
    attempt: int
    replay: bool

    @property
    def replay_position(self) -> str:
        """`topic:partition:offset` of a replayed copy (`ragstream replay --live`), else ""."""
        return f"{self.topic}:{self.partition}:{self.offset}" if self.replay else ""


class StatusStore(Protocol):
    """The store's forward-only status move (see ragstream.store), which every stage uses."""

    def advance_status(
        self,
        document_id: str,
        status: str,
        reason: str | None = None,
        *,
        stage: str | None = None,
        current_parse_sha256: str | None = None,
        current_chunker_version: str | None = None,
        current_embedding_model: str | None = None,
        current_embedding_dimensions: int | None = None,
        page_count: int | None = None,
        chunk_count: int | None = None,
    ) -> Awaitable[bool]: ...
