"""Local CPU-heavy work on untrusted input (parsing, chunking) in child processes that can be
killed.

A `LimitedPool` is a small pebble `ProcessPool` that its owner (the local parser, the chunker)
starts on first use and closes with `aclose()`. A task that runs past `timeout_s` of wall-clock
time is killed by the pool, past `cpu_s` seconds of CPU time by the kernel (RLIMIT_CPU,
SIGXCPU), and one that asks for more than `memory_mb` of address space (RLIMIT_AS) fails its
allocation; the pool replaces a killed process at once, and the caller gets a `PermanentError`
that names the limit (`parse.timeout_s=2.0`). Other tasks go on in the other processes.

The children are forked by the multiprocessing forkserver (started once per process, with the
parsing and chunking modules imported), so a replacement costs a fork rather than an
interpreter start, and no child inherits the threads or locks of the asyncio process. The CPU
and memory limits are set around each task only (and lifted after it), so the time a warm
process spent on earlier tasks does not count, and the pool's own messages are never cut off.
A child has no SIGTERM handler, so SIGTERM kills it at once, and it is killed when the
forkserver dies, which happens when the process that owns the pool dies, even by SIGKILL
(PR_SET_PDEATHSIG).

Futures are bridged into asyncio by callbacks (no thread waits on them); cancelling the awaiting
task cancels the pebble future, and pebble kills the process that was running it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import resource
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver
from typing import Any, Final, TypeVar

from pebble import ProcessExpired, ProcessPool

from ragstream.errors import PermanentError, RetryableError
from ragstream.settings import ChildLimits

T = TypeVar("T")

# Imported once by the forkserver, so every child starts with them loaded.
PRELOAD: Final = (
    "__main__",
    "pebble",
    "ragstream.isolation",
    "ragstream.providers.parse.local",
    "ragstream.chunking",
)
_MIB: Final = 1024 * 1024
_PR_SET_PDEATHSIG: Final = 1
_STOP_WAIT_S: Final = 10.0


class _OutOfMemory(Exception):
    """Raised in the child when the task hit its address-space limit."""


class LimitedPool:
    """Child processes for one kind of work (`section` names its settings in messages)."""

    def __init__(self, section: str, limits: ChildLimits) -> None:
        self.section = section
        self.limits = limits
        self._pool: ProcessPool | None = None
        self._lock = asyncio.Lock()
        self._waiting: set[asyncio.Future[Any]] = set()
        self._started: asyncio.Future[bool] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any, what: str) -> T:
        """`fn(*args)` in a child; `what` ("parsing 'a.pdf'") opens the messages of errors.

        Exceptions `fn` raises come back as they are; a limit hit is a `PermanentError`; a
        pool that broke is a `RetryableError` (the next call starts a new one)."""
        pool = await self._ready()
        limits = self.limits
        try:
            future = pool.schedule(
                _call, args=(limits.cpu_s, limits.memory_mb, fn, *args), timeout=limits.timeout_s
            )
        except RuntimeError as exc:  # broke since _ready looked
            self._discard(pool)
            raise RetryableError(f"the local {self.section} pool is broken: {exc}") from exc
        try:
            return await self._wait(future)
        except TimeoutError:
            raise PermanentError(
                f"{what} took longer than the limit {self.section}.timeout_s={limits.timeout_s}"
            ) from None
        except _OutOfMemory:
            raise PermanentError(
                f"{what} needed more memory than the limit {self.section}.memory_mb="
                f"{limits.memory_mb}"
            ) from None
        except ProcessExpired as exc:
            if exc.exitcode == -signal.SIGXCPU:
                raise PermanentError(
                    f"{what} used more than the limit {self.section}.cpu_s={limits.cpu_s} "
                    "of CPU time"
                ) from None
            raise PermanentError(
                f"{what} ended its worker process ({_ended(exc.exitcode)})"
            ) from None
        except BrokenProcessPool as exc:
            self._discard(pool)
            raise RetryableError(f"the local {self.section} pool broke: {exc!r}") from exc

    async def aclose(self) -> None:
        """Kill the children at once (whatever they are doing) and stop the pool's threads."""
        self._closed = True
        for waiter in list(self._waiting):
            if not waiter.done():
                waiter.set_exception(
                    RetryableError(f"the local {self.section} pool was closed before it answered")
                )
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._started is not None:  # a pool still starting is stopped once it is up
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._started), _STOP_WAIT_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_in_thread(lambda: _stop(pool)), _STOP_WAIT_S)

    async def _ready(self) -> ProcessPool:
        async with self._lock:
            if self._closed:
                raise RuntimeError(f"the local {self.section} pool is closed")
            up = self._started is not None and self._started.done()
            if self._pool is not None and up and not self._pool.active:
                self._discard(self._pool)  # it broke (say, a child was killed while idle)
            pool = self._pool
            if pool is None:
                pool = self._pool = ProcessPool(
                    max_workers=self.limits.workers,
                    initializer=_init_child,
                    initargs=(os.getpid(),),
                    context=_context(),
                )
                # A pool whose owner is dropped without aclose() is stopped all the same.
                self._finalizer = weakref.finalize(self, _stop_in_background, pool)
                self._finalizer.atexit = False  # type: ignore[misc]  # a documented attribute
                # Starting it starts the forkserver the first time (an interpreter and
                # imports): off the event loop, and carried on if this caller is cancelled.
                self._started = asyncio.ensure_future(_in_thread(lambda: pool.active))
            assert self._started is not None
            try:
                await asyncio.shield(self._started)
            except Exception:
                self._discard(pool)
                raise
            return pool

    def _discard(self, pool: ProcessPool) -> None:
        """Stop a broken pool in the background; the next call starts a new one."""
        if self._pool is pool:
            self._pool = None
            self._started = None
            if self._finalizer is not None:
                self._finalizer.detach()
        _stop_in_background(pool)

    async def _wait(self, future: Future[T]) -> T:
        """Await a pebble future from the event loop; cancelling the wait cancels the task."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()

        def settle(done: Future[T]) -> None:
            if waiter.done():
                return
            if done.cancelled():
                waiter.cancel()
            elif (exc := done.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(done.result())

        def from_pool(done: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, done)

        future.add_done_callback(from_pool)
        self._waiting.add(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            future.cancel()  # pebble kills the process running it
            raise
        finally:
            self._waiting.discard(waiter)


def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


async def _in_thread(fn: Callable[[], T]) -> T:
    """`fn()` in a daemon thread of its own: not the default executor (which stage code uses
    for blob reads), and never holding up the interpreter's exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:
            result, exc = None, error
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=target, name="ragstream-pool", daemon=True).start()
    return await done


def _stop(pool: ProcessPool) -> None:
    pool.stop()  # type: ignore[no-untyped-call]
    pool.join()


def _stop_in_background(pool: ProcessPool) -> None:
    threading.Thread(target=_stop, args=(pool,), name="ragstream-pool-stop", daemon=True).start()


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


# -- in the child --------------------------------------------------------------------------------


def _init_child(owner: int) -> None:
    """Die with the forkserver (which dies with the owner), at once on SIGTERM, without a core."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The forkserver lives while anyone holds its "alive" pipe, and every child is handed one
    # end of it: let go, so that the owner's death (even by SIGKILL) ends the forkserver...
    server = forkserver._forkserver
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int):
        os.close(alive)
        setattr(server, "_forkserver_alive_fd", None)  # noqa: B010
    # ...and the forkserver's death ends this process, whatever it is doing.
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        os.kill(owner, 0)
    except ProcessLookupError:  # the owner, and so the forkserver, died before prctl held
        os._exit(1)
    _set_soft(resource.RLIMIT_CORE, 0)


def _call(cpu_s: int, memory_mb: int, fn: Callable[..., T], *args: Any) -> T:
    """Run one task under its CPU and address-space limits, lifted again afterwards."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(usage.ru_utime + usage.ru_stime) + 1
    _set_soft(resource.RLIMIT_CPU, spent + cpu_s)
    _set_soft(resource.RLIMIT_AS, memory_mb * _MIB)
    try:
        return fn(*args)
    except MemoryError:
        pass  # leaving the handler frees what the task held
    finally:
        _set_soft(resource.RLIMIT_AS, None)
        _set_soft(resource.RLIMIT_CPU, None)
    raise _OutOfMemory()


def _set_soft(which: int, value: int | None) -> None:
    """Set a soft limit (None: up to the hard limit), never above the hard one."""
    _, hard = resource.getrlimit(which)
    if value is None or (hard != resource.RLIM_INFINITY and value > hard):
        value = hard
    resource.setrlimit(which, (value, hard))
