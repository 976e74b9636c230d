"""asyncpg's errors translated into ragstream's at the store boundary, in one place.

    lost or refused connection, server starting or shutting down, too many
    connections, disk full, pool/connect/command timeouts, a failover to a
    read-only replica                                                      → InfrastructureUnavailable
        (not the record's fault: the consumer runtime holds the record and waits)
    serialization failures, deadlocks, lock timeouts, statement cancelled  → RetryableError
    bad credentials, unknown database                                      → ConfigError
    bad data (invalid text, wrong vector dimensions, violated constraint)  → PermanentError
    unique violation                                                       → UniqueViolation
        (internal: an idempotent write lost a race; `translate_errors` runs it again once,
         and the second run sees the winner's row; inside a caller's transaction, which
         is now aborted, it becomes RetryableError so the whole unit is done again)

Errors that are not the database's (a TypeError from a bug) pass through untouched.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import asyncpg

from ragstream.errors import (
    POSTGRES,
    AuthenticationFailed,
    ConfigError,
    InfrastructureUnavailable,
    PermanentError,
    RagstreamError,
    RetryableError,
)
from ragstream.scrub import Scrubber

P = ParamSpec("P")
T = TypeVar("T")

_exc = asyncpg.exceptions

# SQLSTATE classes and codes that say one transaction lost a race: try it again.
_RETRYABLE_TYPES: tuple[type[BaseException], ...] = (
    _exc.TransactionRollbackError,  # class 40: serialization failure, deadlock
    _exc.LockNotAvailableError,  # 55P03: lock_timeout
    _exc.QueryCanceledError,  # 57014: statement_timeout or a cancel request
)
# ...and the ones that say the server (or the way to it) is not answering: wait for it.
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    _exc.PostgresConnectionError,  # class 08
    _exc.InsufficientResourcesError,  # class 53: disk full, out of memory, too many connections
    _exc.OperatorInterventionError,  # class 57: admin/crash shutdown, cannot connect now
    _exc.ReadOnlySQLTransactionError,  # 25006: a failover left us on a replica
    _exc.InternalClientError,  # protocol trouble inside asyncpg: reconnecting helps
    ConnectionError,
    OSError,
    TimeoutError,  # pool acquire, connect and command timeouts (asyncio.TimeoutError too)
)
_CONFIG_TYPES: tuple[type[BaseException], ...] = (
    _exc.InvalidAuthorizationSpecificationError,  # class 28: bad user or password
    _exc.InvalidCatalogNameError,  # 3D000: the database does not exist
)
_CLOSED_MARKERS = (
    "connection is closed",
    "connection was closed",
    "pool is closed",
    "pool is closing",
)


class UniqueViolation(RetryableError):
    """A unique violation inside an idempotent write: another writer won the race."""


def translate(exc: BaseException) -> BaseException:
    """The ragstream error for a database-side exception, or `exc` itself if it is not one."""
    unchanged = exc  # asyncpg is untyped: isinstance() against it would make `exc` Any
    if isinstance(exc, RagstreamError):
        return exc
    if isinstance(exc, _exc.UniqueViolationError):
        return UniqueViolation(f"unique violation: {exc}")
    if isinstance(exc, _CONFIG_TYPES):
        return ConfigError(f"postgres.url: {type(exc).__name__}: {exc}")
    if isinstance(exc, _RETRYABLE_TYPES):
        return RetryableError(f"database busy: {type(exc).__name__}: {exc}")
    if isinstance(exc, _UNAVAILABLE_TYPES) or isinstance(exc, asyncio.TimeoutError):
        return InfrastructureUnavailable(
            f"database unavailable: {type(exc).__name__}: {exc}", dependency=POSTGRES
        )
    if isinstance(exc, _exc.InterfaceError) and not isinstance(exc, _exc.DataError):
        if any(marker in str(exc) for marker in _CLOSED_MARKERS):
            return InfrastructureUnavailable(
                f"database connection lost: {exc}", dependency=POSTGRES
            )
        return unchanged  # a client-side misuse: a bug, not a data problem
    if isinstance(exc, _exc.UndefinedTableError | _exc.UndefinedFunctionError):
        return PermanentError(f"the store's schema is missing or old (run migrations): {exc}")
    if isinstance(exc, _exc.PostgresError):
        sqlstate: str = getattr(exc, "sqlstate", "?")
        return PermanentError(
            f"database rejected the data ({sqlstate} {type(exc).__name__}): {exc}"
        )
    if isinstance(exc, _exc.DataError):  # asyncpg could not encode an argument
        return PermanentError(f"invalid value for the database: {exc}")
    return exc


@contextmanager
def translating() -> Iterator[None]:
    """Re-raise database errors as ragstream errors (the cause is kept as __cause__)."""
    try:
        yield
    except BaseException as exc:
        new = translate(exc)
        if new is exc:
            raise
        raise new from exc


def translate_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorate a store method: translate errors; run it again once after a unique violation.

    The method's owner says whether it may be re-run through `_may_rerun()` (False inside a
    caller's transaction or batch: that transaction is aborted, so the violation becomes retryable).
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        owner: Any = args[0] if args else None
        for attempt in (1, 2):
            try:
                with translating():
                    return await fn(*args, **kwargs)
            except UniqueViolation:
                may_rerun = getattr(owner, "_may_rerun", None)
                allowed = (
                    may_rerun() if callable(may_rerun) else getattr(owner, "_can_rerun", False)
                )
                if attempt == 2 or not allowed:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


@contextmanager
def connecting(dsn: str) -> Iterator[None]:
    """`translating()` for opening connections, with the server named (password masked) and
    what to check: unreachable, refused credentials, unknown database."""
    where = Scrubber()(dsn)
    try:
        with translating():
            yield
    except InfrastructureUnavailable as exc:
        raise InfrastructureUnavailable(
            f"cannot reach PostgreSQL at {where} ({exc}): is it running (`ragstream stack up`) "
            "and postgres.url right?",
            dependency=POSTGRES,
        ) from exc
    except ConfigError as exc:
        if isinstance(exc.__cause__, _exc.InvalidAuthorizationSpecificationError):
            raise AuthenticationFailed(
                f"postgres.password: PostgreSQL at {where} refused the credentials "
                f"({type(exc.__cause__).__name__}: {exc.__cause__})"
            ) from exc
        raise
