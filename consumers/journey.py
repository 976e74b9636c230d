"""A document's journey: each stage's step, and its failure, written to PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from consumers.stage import Outcome, RecordContext
from ragstream.events import (
    DocumentEvent,
)
from ragstream.scrub import Scrubber
from ragstream.store import StatusChange, Store


def _with_replay(detail: Mapping[str, Any], replay: str) -> dict[str, Any]:
    return {**detail, "replay": replay} if replay else dict(detail)


@dataclass
class JourneyRecorder:
    """Writes each step of a document's journey, and its failure, to PostgreSQL; error text is
    scrubbed of secrets before it is stored."""

    store: Store
    scrub: Scrubber = field(default_factory=Scrubber)

    async def step_done(
        self,
        event: DocumentEvent,
        stage: str,
        outcome: Outcome,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
    ) -> None:
        replay = ctx.replay_position
        await self.store.record_step(
            document_id=event.document_id,
            tenant_id=event.tenant_id,
            stage=stage,
            input_event_id=str(event.event_id),
            outcome=outcome.status,
            attempt=ctx.attempt,
            started_at=started_at,
            finished_at=finished_at,
            detail=_with_replay(outcome.detail, replay),
            correlation_id=event.correlation_id,
            replay=replay,
        )

    async def step_failed(
        self,
        event: DocumentEvent,
        stage: str,
        error: BaseException,
        ctx: RecordContext,
        started_at: datetime,
        finished_at: datetime,
        *,
        final: bool,
    ) -> None:
        message = self.scrub(str(error)).replace("\x00", "\\x00")
        reason = f"{stage}: {type(error).__name__}: {message}"
        replay = ctx.replay_position
        await self.store.record_step(
            document_id=event.document_id,
            tenant_id=event.tenant_id,
            stage=stage,
            input_event_id=str(event.event_id),
            outcome="dead-lettered" if final else "retry",
            attempt=ctx.attempt,
            started_at=started_at,
            finished_at=finished_at,
            detail=_with_replay(
                {"error_class": type(error).__name__, "error": message[:2000]}, replay
            ),
            correlation_id=event.correlation_id,
            replay=replay,
        )
        if final:
            await self.store.advance_status(
                StatusChange(
                    event.document_id,
                    "dead-lettered",
                    reason=reason[:2000],
                    stage=stage,
                    tenant_id=event.tenant_id,
                )
            )
