"""The pool of child processes that local parsing and chunking run in: a child that overruns or
is given up on is killed and replaced, closing kills at once, and no child outlives its owner."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ragstream.errors import PermanentError, RetryableError
from ragstream.isolation import LimitedPool
from ragstream.settings import ChildLimits
from tests.hostile import burning, cpu_seconds, descendants, running

FOREVER = range(10**15)  # sum() over it holds the CPU, in C, for hours


def _pool(**limits: float) -> LimitedPool:
    return LimitedPool("parse", ChildLimits(**limits))


async def _until(condition: object, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.05)


async def test_cancelling_a_call_kills_its_process_and_the_pool_replaces_it() -> None:
    pool = _pool(workers=1)
    try:
        before = await pool.run(os.getpid, what="asking")
        idle = {before: cpu_seconds(before)}
        call = asyncio.create_task(pool.run(sum, FOREVER, what="summing"))
        await _until(lambda: burning([before], idle), 2, "the child summing")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await _until(lambda: not running(before), 2, "the cancelled process is gone")
        after = await pool.run(os.getpid, what="asking")
        assert after != before
    finally:
        await pool.aclose()


async def test_a_process_that_dies_fails_its_call_permanently_and_is_replaced() -> None:
    pool = _pool(workers=1)
    try:
        with pytest.raises(PermanentError) as info:
            await pool.run(os.abort, what="parsing 'a.pdf'")
        assert str(info.value) == "parsing 'a.pdf' ended its worker process (killed by SIGABRT)"
        assert await pool.run(sum, range(4), what="summing") == 6
    finally:
        await pool.aclose()


async def test_a_pool_broken_by_an_idle_child_killed_from_outside_is_replaced() -> None:
    pool = _pool(workers=1)
    try:
        idle = await pool.run(os.getpid, what="asking")
        os.kill(idle, signal.SIGKILL)  # pebble gives up a pool whose idle worker dies
        await _until(lambda: not pool._pool or not pool._pool.active, 5, "pebble giving it up")
        assert await pool.run(os.getpid, what="asking") not in (idle, None)
    finally:
        await pool.aclose()


async def test_the_cpu_limit_is_per_call_not_per_process() -> None:
    pool = _pool(workers=1, cpu_s=1)
    try:
        pid = await pool.run(os.getpid, what="asking")
        for _ in range(4):  # each call some 0.4 s of CPU, together more than the limit
            await pool.run(sum, range(15_000_000), what="summing")
        assert await pool.run(os.getpid, what="asking") == pid
    finally:
        await pool.aclose()


async def test_closing_kills_busy_children_at_once_and_fails_what_waits() -> None:
    pool = _pool(workers=2)
    pids = {await pool.run(os.getpid, what="asking") for _ in range(8)}
    idle = {pid: cpu_seconds(pid) for pid in pids}
    calls = [asyncio.create_task(pool.run(sum, FOREVER, what="summing")) for _ in range(3)]
    await _until(lambda: len(burning(pids, idle)) == len(pids), 2, "the children summing")
    started = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - started < 1.0
    for call in calls:
        with pytest.raises(RetryableError, match="closed"):
            await call
    await _until(lambda: not any(running(pid) for pid in pids), 1, "the children are gone")
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run(os.getpid, what="asking")


OWNER = textwrap.dedent(
    """
    import asyncio, os
    from ragstream.isolation import LimitedPool
    from ragstream.settings import ChildLimits

    async def main():
        pool = LimitedPool("parse", ChildLimits(workers=2))
        await pool.run(os.getpid, what="warming")
        print("busy", flush=True)
        await asyncio.gather(*(pool.run(sum, range(10**15), what="burn") for _ in range(2)))

    asyncio.run(main())
    """
)


def test_children_die_with_their_owner_even_when_it_is_killed() -> None:
    def until(condition: object, within_s: float, what: str) -> None:
        deadline = time.monotonic() + within_s
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
            time.sleep(0.05)

    with subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as owner:
        try:
            assert owner.stdout is not None
            assert owner.stdout.readline() == b"busy\n"
            until(lambda: len(descendants(owner.pid)) >= 4, 5, "forkserver and two workers")
            below = descendants(owner.pid)
            owner.send_signal(signal.SIGKILL)
            owner.wait(5)
            until(lambda: not [p for p in below if running(p)], 3, "no child outlives it")
        finally:
            if owner.poll() is None:
                owner.kill()
