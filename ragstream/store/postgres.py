"""The PostgreSQL + pgvector store: what the stages write and a retrieval system reads.

    store = await Store.connect(dsn)            # or Store.from_settings(settings.postgres)
    await store.migrate(dimensions=512)         # at worker start: schema + HNSW index
    decision = await store.register_upload(Upload(...))
    async with store.transaction() as tx:       # several writes, one transaction
        await tx.save_chunks(ChunkSet(...))
        await tx.advance_status(StatusChange(document_id, "chunked", ...))
    async with store.batch() as batch:          # every call of `store` in this task on one
        async with batch.savepoint():           # connection, in one transaction; a savepoint
            await store.save_chunks(...)        # per unit that may fail alone

Every write is an idempotent upsert keyed by what makes the row unique, so redelivery and replay
leave no duplicates. The store takes plain values (the records of `models`), never event
objects. asyncpg's errors are
translated at this boundary (see `_errors`): callers only ever see ragstream errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, cast

import asyncpg
from pgvector.asyncpg import register_vector

from ragstream import tracing
from ragstream.settings import PostgresSettings
from ragstream.store._base import Pinned, json_dumps, pinned
from ragstream.store._cost import CostOperations
from ragstream.store._dlq import DlqOperations
from ragstream.store._errors import connecting, translating
from ragstream.store._prune import PruneOperations
from ragstream.store._reads import ReadOperations
from ragstream.store._versions import VersionOperations
from ragstream.store._writes import WriteOperations, write_cache
from ragstream.store.migrate import ensure_vector_index as _ensure_vector_index
from ragstream.store.migrate import migrate as _migrate


async def _init_connection(conn: Any) -> None:
    """Codecs on every pooled connection: jsonb as Python objects, vector as pgvector.Vector."""
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=json_dumps, decoder=json.loads, format="text"
    )
    try:
        await register_vector(conn)
    except ValueError as exc:  # the extension is not there yet: migrate() expires this connection
        if "unknown type" not in str(exc):
            raise


@asynccontextmanager
async def _on(conn: Any) -> AsyncIterator[Any]:
    yield conn


class StoreTx(WriteOperations, ReadOperations):
    """The store's operations inside one transaction, on one connection (see Store.transaction)."""

    _can_rerun = False  # the transaction is the unit: a unique violation aborts it → retryable

    def __init__(self, conn: Any) -> None:
        self._connection = conn

    def _conn(self) -> AbstractAsyncContextManager[Any]:
        return _on(self._connection)


class Batch:
    """One connection in one transaction, which every call of its store inside
    `Store.batch()` uses; a unit that may fail alone runs in `savepoint()`."""

    def __init__(self, conn: Any) -> None:
        self._connection = conn

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A unit of the batch that fails alone. When the block raises, what it wrote stays
        if the transaction is still good (as each call, committed on its own, would have
        stayed), and is rolled back if a statement of the block failed."""
        conn = self._connection
        with translating():
            await conn.execute("SAVEPOINT ragstream_unit")
        try:
            yield
        except Exception:
            with translating():
                try:
                    await conn.execute("RELEASE SAVEPOINT ragstream_unit")
                except asyncpg.InFailedSQLTransactionError:
                    await conn.execute("ROLLBACK TO SAVEPOINT ragstream_unit")
                    await conn.execute("RELEASE SAVEPOINT ragstream_unit")
            raise
        with translating():
            await conn.execute("RELEASE SAVEPOINT ragstream_unit")


COMMIT_SPAN: Final = {"db.system.name": "postgresql", "db.operation.name": "COMMIT"}


class _TracedCommit:
    """A transaction whose commit is a span of its own (`postgresql commit`, see
    ragstream.tracing); a rollback is not traced."""

    def __init__(self, transaction: Any) -> None:
        self._transaction = transaction

    async def __aenter__(self) -> None:
        await self._transaction.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        if exc_info[0] is not None:
            await self._transaction.__aexit__(*exc_info)
            return
        with tracing.call("postgresql commit", COMMIT_SPAN, batch=True):
            await self._transaction.__aexit__(*exc_info)


class Store(
    WriteOperations,
    ReadOperations,
    VersionOperations,
    DlqOperations,
    CostOperations,
    PruneOperations,
):
    """An asyncpg pool with the store's operations. Use `await Store.connect(dsn)`."""

    def __init__(self, pool: Any, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn

    @classmethod
    async def connect(
        cls,
        dsn: str,
        min_size: int = 1,
        max_size: int = 10,
        *,
        command_timeout: float | None = 60.0,
        connect_timeout: float = 10.0,
    ) -> Store:
        """Open the pool. An unreachable server raises InfrastructureUnavailable, refused
        credentials AuthenticationFailed, an unknown database ConfigError; each names the
        server (password masked) and what to check."""
        with connecting(dsn):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                command_timeout=command_timeout,
                timeout=connect_timeout,
            )
        return cls(pool, dsn)

    @classmethod
    async def from_settings(cls, settings: PostgresSettings) -> Store:
        return await cls.connect(settings.dsn(), settings.pool_min_size, settings.pool_max_size)

    async def close(self, grace_s: float = 10.0) -> None:
        """Close the pool, waiting up to `grace_s` for borrowed connections, then terminating."""
        try:
            async with asyncio.timeout(grace_s):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _conn(self) -> AbstractAsyncContextManager[Any]:
        batch = pinned.get()
        if batch is not None and batch.store is self:
            return _on(batch.conn)
        return cast(AbstractAsyncContextManager[Any], self._pool.acquire())

    def _may_rerun(self) -> bool:
        return pinned.get() is None  # inside a batch, its transaction is the unit

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[Batch]:
        """`async with store.batch() as batch:` — every call of this store in the block (in
        this task) runs on one pooled connection, in one transaction, committed at the end of
        the block (rolled back if it raises): one connection and one commit for many records
        instead of one per call. A unit that may fail without failing the others runs in
        `batch.savepoint()`. Calls in tasks the block starts share the connection: do not
        make them at once."""
        with translating():
            async with self._pool.acquire() as conn, _TracedCommit(conn.transaction()):
                batch = Pinned(self, conn)
                token = pinned.set(batch)
                try:
                    yield Batch(conn)
                    await write_cache(conn, batch.cache.values())  # see Pinned
                finally:
                    pinned.reset(token)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTx]:
        """`async with store.transaction() as tx:` — tx has the store's operations, all in one
        transaction, committed at the end of the block (rolled back if it raises)."""
        with translating():
            async with self._pool.acquire() as conn, conn.transaction():
                yield StoreTx(conn)

    async def migrate(self, dimensions: int | Iterable[int] | None = None) -> list[str]:
        """Apply pending migrations (and ensure HNSW indexes); the versions applied now.

        Runs on a connection of its own (no command timeout: an index build may take long)."""
        applied = await _migrate(self._dsn, dimensions=dimensions)
        if applied:  # connections opened before the vector type existed lack its codec
            with translating():
                await self._pool.expire_connections()
        return applied

    async def ensure_vector_index(self, dimensions: int) -> bool:
        """Create the HNSW index for `dimensions` if missing (idempotent; call at worker start)."""
        return await _ensure_vector_index(self._dsn, dimensions)
