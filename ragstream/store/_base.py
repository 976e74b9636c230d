"""What the store's operation classes share: the connection seam and value checks."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pgvector import Vector

from ragstream.errors import PermanentError
from ragstream.store.models import Document


def json_dumps(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def check_vector(vector: Sequence[float], dimensions: int, what: str) -> Vector:
    if len(vector) != dimensions:
        raise PermanentError(f"{what}: expected {dimensions} dimensions, got {len(vector)}")
    values = [float(v) for v in vector]
    if not all(math.isfinite(v) for v in values):
        raise PermanentError(f"{what}: a vector holds NaN or infinity")
    return Vector(values)


def check_dimensions(dimensions: int) -> int:
    if (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 1 <= dimensions <= 16000
    ):
        raise PermanentError(f"dimensions must be an int in 1..16000, got {dimensions!r}")
    return dimensions


def document_from_row(row: Mapping[str, Any]) -> Document:
    return Document(**dict(row))


class OnConnection:
    """Operations run on the connection `_conn()` yields. `Store` takes a pooled connection per
    call; `StoreTx` runs everything on its one connection, in its transaction."""

    _can_rerun: bool = True  # after a unique violation, run the call again (see _errors)

    def _conn(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    def _may_rerun(self) -> bool:
        return self._can_rerun


# An embedding cache row: (scope, model, dimensions, text_sha256, vector, provider).
CacheRow = tuple[str, str, int, str, Vector, str]


@dataclass
class Pinned:
    """The connection a `Store.batch()` holds for the task inside it, the store it belongs
    to, the documents' tenants read on it in this transaction, and the embedding cache rows
    the batch writes when it ends (all at once, in key order: two batches at once that embed
    the same texts then never wait for each other in a cycle)."""

    store: object
    conn: Any
    tenants: dict[str, str] = field(default_factory=dict)
    cache: dict[tuple[str, str, int, str], CacheRow] = field(default_factory=dict)


pinned: ContextVar[Pinned | None] = ContextVar("ragstream_store_batch", default=None)


def known_tenant(conn: Any, document_id: str) -> str | None:
    """The tenant `document_id` was seen to belong to in this batch's transaction (a
    document's tenant never changes), else None."""
    batch = batch_on(conn)
    return batch.tenants.get(document_id) if batch is not None else None


def remember_tenant(conn: Any, document_id: str, tenant_id: str) -> None:
    batch = batch_on(conn)
    if batch is not None:
        batch.tenants[document_id] = tenant_id


def batch_on(conn: Any) -> Pinned | None:
    """The batch whose transaction `conn` is in, if any (in this task)."""
    batch = pinned.get()
    return batch if batch is not None and batch.conn is conn else None


def atomic(conn: Any) -> AbstractAsyncContextManager[Any]:
    """A transaction for a call's statements, unless the connection is in one already (a
    caller's transaction or batch, which is then the unit: no savepoint round trips)."""
    return nullcontext() if conn.is_in_transaction() else conn.transaction()
