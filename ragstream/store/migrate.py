"""Schema migrations: versioned SQL files shipped in `ragstream/store/migrations/`.

`NNNN_name.sql` files apply in version order, each inside its own transaction, and are recorded
in `schema_migrations(version, name, checksum, applied_at, duration_ms)`. A session advisory lock
serialises workers that start at once; the lock is taken by polling `pg_try_advisory_lock`, so a
waiting worker holds no snapshot (a blocked `pg_advisory_lock` call would, and would stall a
concurrent `CREATE INDEX CONCURRENTLY`), and gives up after `lock_timeout_s` with RetryableError.

A migration already applied whose file has since changed raises MigrationError (never edit a
shipped migration: add a new one). Versions recorded in the database but unknown to this release
(a newer release migrated it; rolling deploy) are logged and tolerated: migrations only add.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import structlog

from ragstream.errors import ConfigError, RetryableError
from ragstream.store._errors import connecting, translating

log = structlog.get_logger(__name__)

_FILE_RE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
# One stable 64-bit key for "the ragstream schema": the first 8 bytes of its name's sha256.
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ragstream.store.schema").digest()[:8], "big", signed=True
)
HNSW_MAX_DIMENSIONS = 2000  # pgvector's limit for an HNSW index over `vector`

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    duration_ms double precision NOT NULL DEFAULT 0
)
"""


class MigrationError(ConfigError):
    """The database's schema disagrees with this release (an applied migration was changed)."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    checksum: str
    sql: str


def available_migrations() -> list[Migration]:
    """The migrations this release ships, in version order."""
    found: dict[str, Migration] = {}
    for entry in (resources.files("ragstream.store") / "migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_RE.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        sql = entry.read_text(encoding="utf-8").replace("\r\n", "\n")
        version = match["version"]
        if version in found:
            raise MigrationError(f"two migration files share version {version}")
        found[version] = Migration(
            version=version,
            name=match["name"],
            checksum=hashlib.sha256(sql.encode()).hexdigest(),
            sql=sql,
        )
    return [found[v] for v in sorted(found)]


@asynccontextmanager
async def advisory_lock(conn: Any, key: int, *, timeout_s: float, what: str) -> AsyncIterator[None]:
    """Hold the session advisory lock `key` on `conn` (polling, so waiting holds no snapshot)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        if time.monotonic() >= deadline:
            raise RetryableError(f"timed out after {timeout_s:g}s waiting for the {what} lock")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def apply_migrations(conn: Any, *, lock_timeout_s: float = 300.0) -> list[str]:
    """Apply pending migrations on `conn` (not inside a transaction); the newly applied versions."""
    migrations = available_migrations()
    applied_now: list[str] = []
    with translating():
        async with advisory_lock(
            conn, MIGRATION_LOCK_KEY, timeout_s=lock_timeout_s, what="migration"
        ):
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            await conn.execute(_BOOTSTRAP)
            rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
            applied = {r["version"]: r for r in rows}
            for m in migrations:
                row = applied.get(m.version)
                if row is not None and row["checksum"] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version}_{row['name']} was changed after it was applied "
                        f"(checksum {row['checksum'][:12]}… in the database, {m.checksum[:12]}… in "
                        "this release); restore the file and add a new migration instead"
                    )
            unknown = sorted(set(applied) - {m.version for m in migrations})
            if unknown:
                log.warning("store.migrations.unknown_versions", versions=unknown)
            for m in migrations:
                if m.version in applied:
                    continue
                started = time.perf_counter()
                async with conn.transaction():
                    # A migration waiting behind a long query would queue every reader behind
                    # its lock: give up instead and let the worker retry.
                    await conn.execute("SET LOCAL lock_timeout = '30s'")
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum, duration_ms)"
                        " VALUES ($1, $2, $3, $4)",
                        m.version,
                        m.name,
                        m.checksum,
                        (time.perf_counter() - started) * 1000,
                    )
                applied_now.append(m.version)
                log.info("store.migration.applied", version=m.version, name=m.name)
    return applied_now


def vector_index_name(dimensions: int) -> str:
    return f"embeddings_hnsw_{dimensions}"


def vector_index_sql(dimensions: int) -> str:
    """The partial HNSW expression index for one dimensions value (search uses the same expression)."""
    _check_dimensions(dimensions)
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {vector_index_name(dimensions)} ON embeddings"
        f" USING hnsw ((embedding::vector({dimensions})) vector_cosine_ops)"
        f" WHERE dimensions = {dimensions}"
    )


def _check_dimensions(dimensions: int) -> None:
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise TypeError(f"dimensions must be an int, got {dimensions!r}")
    if not 1 <= dimensions <= HNSW_MAX_DIMENSIONS:
        raise ValueError(
            f"dimensions must be 1..{HNSW_MAX_DIMENSIONS} for an HNSW index, got {dimensions}"
        )


async def ensure_vector_index(
    target: str | Any, dimensions: int, *, lock_timeout_s: float = 300.0
) -> bool:
    """Create the HNSW index for `dimensions` if it is missing or invalid; True if built now.

    Built CONCURRENTLY, so embedding writes go on while a large table is indexed; an index left
    invalid by an interrupted build is dropped and built again. `target` is a DSN or an open
    connection that is not inside a transaction (and has no short command timeout).
    """
    _check_dimensions(dimensions)
    async with _connection(target) as conn:
        return await _ensure_vector_index(conn, dimensions, lock_timeout_s)


async def _ensure_vector_index(conn: Any, dimensions: int, lock_timeout_s: float) -> bool:
    name = vector_index_name(dimensions)
    # The index of *our* embeddings table (the one search_path finds), valid or not.
    check = (
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = 'embeddings'::regclass AND c.relname = $1"
    )
    with translating():
        if await conn.fetchval(check, name):
            return False
        async with advisory_lock(conn, MIGRATION_LOCK_KEY, timeout_s=lock_timeout_s, what="index"):
            valid = await conn.fetchval(check, name)
            if valid:
                return False
            if valid is False:
                log.warning("store.vector_index.invalid_rebuilt", index=name)
                await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            started = time.perf_counter()
            await conn.execute(vector_index_sql(dimensions))
            log.info(
                "store.vector_index.created",
                index=name,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            return True


async def migrate(
    target: str | Any,
    *,
    dimensions: int | Iterable[int] | None = None,
    lock_timeout_s: float = 300.0,
) -> list[str]:
    """Bring the schema up to date; the versions applied now (empty when it already was).

    `target` is a DSN (a connection of its own is opened and closed) or an open asyncpg
    connection that is not inside a transaction. With `dimensions`, the HNSW index for each
    value is ensured too.
    """
    dims = [dimensions] if isinstance(dimensions, int) else list(dimensions or [])
    for d in dims:
        _check_dimensions(d)
    async with _connection(target) as conn:
        applied = await apply_migrations(conn, lock_timeout_s=lock_timeout_s)
        for d in dims:
            await _ensure_vector_index(conn, d, lock_timeout_s)
    return applied


@asynccontextmanager
async def _connection(target: str | Any) -> AsyncIterator[Any]:
    """`target` itself if it is a connection, else a connection of our own to the DSN `target`.

    Our own has no command timeout and no statement_timeout: building an index over a large
    table may take long, and a cancelled concurrent build leaves an invalid index behind.
    """
    if not isinstance(target, str):
        yield target
        return
    with connecting(target):
        conn = await asyncpg.connect(target, server_settings={"statement_timeout": "0"})
    try:
        yield conn
    finally:
        with translating():
            await conn.close(timeout=10)
