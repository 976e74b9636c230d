"""A worker's HTTP endpoints: GET /metrics, /healthz and /ready.

    /metrics   the process's `Metrics` in Prometheus's text format
    /healthz   liveness: 200 whenever the worker's event loop runs (it serves this very answer)
    /ready     readiness: 200 when the readiness callback says so, else 503; a JSON body
               {"ready": bool, "checks": {...}} either way

A small HTTP/1.1 server on asyncio streams, on the worker's own loop and with nothing beyond the
standard library: one request per connection (`Connection: close`), GET and HEAD only, a
request must arrive within `request_timeout_s` and fit in 16 KiB of headers.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, suppress
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import urlsplit

import structlog

from ragstream.errors import InfrastructureError
from ragstream.metrics import CONTENT_TYPE
from ragstream.scrape import announce, withdraw

log = structlog.get_logger(__name__)

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Check = Callable[[], bool | Awaitable[bool]]

JSON: Final = "application/json"
TEXT: Final = "text/plain; charset=utf-8"
_MAX_HEADER_BYTES: Final = 16 * 1024
_MAX_HEADER_LINES: Final = 100


class Exposes(Protocol):
    """What /metrics serves: a `Metrics`, or anything with an exposition (sync or async)."""

    def exposition(self) -> bytes | Awaitable[bytes]: ...


class HealthServer:
    """Serves /metrics, /healthz and /ready until `stop()` (or the end of `async with`)."""

    def __init__(
        self,
        metrics: Exposes,
        host: str,
        port: int,
        ready: Readiness,
        *,
        ready_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
        scrape_dir: str = "",
        name: str = "",
    ) -> None:
        """`scrape_dir` and `name`: announce the bound address for Prometheus's file-based
        discovery while serving (ragstream.scrape)."""
        self.metrics = metrics
        self.scrape_dir = scrape_dir
        self.name = name
        self._announced: Path | None = None
        self.host = host
        self.port = port
        self.ready = ready
        self.ready_timeout_s = ready_timeout_s
        self.request_timeout_s = request_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        """Listen; returns the bound port (the one the OS picked when `port` is 0)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=_MAX_HEADER_BYTES
            )
        except OSError as exc:
            raise InfrastructureError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("health server listening", host=self.host, port=self.port)
        self._announced = announce(self.scrape_dir, self.name, self.host, self.port)
        return self.port

    async def stop(self) -> None:
        withdraw(self._announced)
        self._announced = None
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- one connection, one request -------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    request_line = await _read_head(reader)
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                return  # the client went away or never finished asking
            except ValueError:  # a line over the limit, or too many of them
                await _respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, TEXT, b"")
                return
            method, path = _parse_request_line(request_line)
            if not method:
                await _respond(writer, HTTPStatus.BAD_REQUEST, TEXT, b"bad request\n")
            elif method not in ("GET", "HEAD"):
                await _respond(
                    writer,
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    TEXT,
                    b"only GET and HEAD\n",
                    extra={"Allow": "GET, HEAD"},
                )
            else:
                status, content_type, body = await self._route(path)
                await _respond(writer, status, content_type, body, head=method == "HEAD")
        except Exception as exc:  # never let one request take the server down
            log.warning("health request failed", error=repr(exc))
            with suppress(Exception):
                await _respond(writer, HTTPStatus.INTERNAL_SERVER_ERROR, TEXT, b"error\n")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        if path == "/metrics":
            exposition = self.metrics.exposition()
            if inspect.isawaitable(exposition):
                exposition = await exposition
            return HTTPStatus.OK, CONTENT_TYPE, exposition
        if path == "/healthz":
            return HTTPStatus.OK, JSON, b'{"status":"ok"}\n'
        if path == "/ready":
            ok, body = await self._readiness()
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            return status, JSON, (json.dumps(body, default=str, sort_keys=True) + "\n").encode()
        return HTTPStatus.NOT_FOUND, TEXT, b"not found: try /metrics, /healthz or /ready\n"

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                ok, checks = await self.ready()
        except TimeoutError:
            return False, {"ready": False, "error": f"timed out after {self.ready_timeout_s}s"}
        except Exception as exc:
            return False, {"ready": False, "error": type(exc).__name__}
        return bool(ok), {"ready": bool(ok), "checks": checks}


def readiness(checks: Mapping[str, Check]) -> Readiness:
    """A readiness callback from named checks (plain or async functions returning bool), run
    together; ready when all pass. A check that raises counts as failed."""

    async def run_one(check: Check) -> bool:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        return result is True

    async def ready() -> tuple[bool, dict[str, Any]]:
        names = list(checks)
        results = await asyncio.gather(*(run_one(checks[n]) for n in names), return_exceptions=True)
        verdicts = {name: result is True for name, result in zip(names, results, strict=True)}
        return all(verdicts.values()), dict(verdicts)

    return ready


@runtime_checkable
class _Queryable(Protocol):
    """An asyncpg pool or connection."""

    async def fetchval(self, query: str, *args: Any) -> Any: ...


class _ConnectionSource(Protocol):
    """ragstream's Store (its connection seam)."""

    def _conn(self) -> AbstractAsyncContextManager[Any]: ...


async def database_ready(db: _Queryable | _ConnectionSource, *, timeout_s: float = 1.0) -> bool:
    """Does the database answer `SELECT 1` within `timeout_s`? Takes a Store or an asyncpg
    pool; never raises."""
    try:
        async with asyncio.timeout(timeout_s):
            if isinstance(db, _Queryable):
                return bool(await db.fetchval("SELECT 1") == 1)
            async with db._conn() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
    except Exception as exc:
        log.debug("database not ready", error=repr(exc))
        return False


# -- HTTP/1.1, the little of it needed here ----------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> str:
    """The request line; the header lines are read up to the blank line and ignored."""
    request_line = (await reader.readline()).decode("latin-1")
    if not request_line.endswith("\n"):
        raise asyncio.IncompleteReadError(request_line.encode("latin-1"), None)
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        if line in (b"\r\n", b"\n"):
            return request_line
    raise ValueError("too many header lines")


def _parse_request_line(line: str) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "", ""
    return parts[0].upper(), urlsplit(parts[1]).path or "/"


async def _respond(
    writer: asyncio.StreamWriter,
    status: HTTPStatus,
    content_type: str,
    body: bytes,
    *,
    head: bool = False,
    extra: Mapping[str, str] | None = None,
) -> None:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **(extra or {}),
    }
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()
