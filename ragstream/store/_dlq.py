"""The store's record of redriven dead letters (table `dlq_redrives`, migration 0002).

`ragstream dlq redrive` reads which DLQ positions were already sent back, holds a per-topic
lock while it sends, and marks each record once the broker has acknowledged its copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from ragstream.errors import RetryableError
from ragstream.store._base import OnConnection
from ragstream.store._errors import translate_errors, translating

_MARK = """
INSERT INTO dlq_redrives (dlq_topic, dlq_partition, dlq_offset, target_topic, target_partition,
                          target_offset, stage, error_class, document_id, tenant_id)
SELECT $1, m.dlq_partition, m.dlq_offset, m.target_topic, m.target_partition, m.target_offset,
       m.stage, m.error_class, m.document_id, m.tenant_id
FROM unnest($2::integer[], $3::bigint[], $4::text[], $5::integer[], $6::bigint[], $7::text[],
            $8::text[], $9::text[], $10::text[])
     AS m(dlq_partition, dlq_offset, target_topic, target_partition, target_offset, stage,
          error_class, document_id, tenant_id)
ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class RedriveMark:
    """One DLQ record sent back: where it sat in the DLQ and where its copy landed."""

    dlq_partition: int
    dlq_offset: int
    target_topic: str
    target_partition: int
    target_offset: int
    stage: str | None = None
    error_class: str | None = None
    document_id: str | None = None
    tenant_id: str | None = None


def redrive_lock_key(dlq_topic: str) -> int:
    """A stable signed 64-bit advisory-lock key for redriving one DLQ topic."""
    digest = hashlib.sha256(f"ragstream.dlq.redrive:{dlq_topic}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class DlqOperations(OnConnection):
    """Which dead letters were redriven, and the lock that keeps two redrives apart."""

    @translate_errors
    async def redriven_positions(self, dlq_topic: str) -> set[tuple[int, int]]:
        """The (partition, offset) of every record of `dlq_topic` already sent back."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT dlq_partition, dlq_offset FROM dlq_redrives WHERE dlq_topic = $1",
                dlq_topic,
            )
        return {(r["dlq_partition"], r["dlq_offset"]) for r in rows}

    @translate_errors
    async def mark_redriven(self, dlq_topic: str, marks: Sequence[RedriveMark]) -> int:
        """Record the records whose copies the broker acknowledged; the number newly marked."""
        if not marks:
            return 0
        async with self._conn() as conn:
            status: str = await conn.execute(
                _MARK,
                dlq_topic,
                [m.dlq_partition for m in marks],
                [m.dlq_offset for m in marks],
                [m.target_topic for m in marks],
                [m.target_partition for m in marks],
                [m.target_offset for m in marks],
                [m.stage for m in marks],
                [m.error_class for m in marks],
                [m.document_id for m in marks],
                [m.tenant_id for m in marks],
            )
        return int(status.rsplit(" ", 1)[-1])

    @asynccontextmanager
    async def redrive_lock(self, dlq_topic: str) -> AsyncIterator[None]:
        """Hold the session advisory lock for redriving `dlq_topic`, or raise RetryableError at
        once when another redrive holds it (two runs at once could send a record twice)."""
        key = redrive_lock_key(dlq_topic)
        async with AsyncExitStack() as stack:
            # Only the database calls are translated: errors of the caller's block pass as is.
            with translating():
                conn = await stack.enter_async_context(self._conn())
                locked = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
            if not locked:
                raise RetryableError(
                    f"another redrive of {dlq_topic} is running; try again when it ends"
                )
            try:
                yield
            finally:
                if not conn.is_closed():
                    with translating():
                        await conn.execute("SELECT pg_advisory_unlock($1)", key)
