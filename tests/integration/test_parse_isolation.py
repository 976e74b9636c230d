"""Issue 13's acceptance check against a real `ragstream worker all` process: crafted PDFs that
take pypdf hours cannot hold the parse stage. Each is killed at its limit and dead-lettered with
the limit named, a small file uploaded after them is embedded within seconds, the worker's
memory (with its children) stays bounded, and SIGTERM stops it in time, leaving no child."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from pipeline_helpers import WorkerProcess, wait_for_statuses, wait_until

from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Topology
from tests.hostile import burning, cpu_bomb_pdf, cpu_seconds, descendants, rss_bytes, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 2.0
GRACE_S = 1.0
PARSE_WORKERS = 4
ENV = {
    "RAGSTREAM_PARSE__TIMEOUT_S": str(TIMEOUT_S),
    "RAGSTREAM_PARSE__CPU_S": "30",
    "RAGSTREAM_PARSE__WORKERS": str(PARSE_WORKERS),
    "RAGSTREAM_KAFKA__SHUTDOWN_GRACE_S": str(GRACE_S),
}
MEMORY_BOUND = 1536 * 1024 * 1024  # worker all's 5 processes, 6 pool processes, 2 forkservers


class Watch:
    """Samples the RSS of the worker and all its descendants, and how many there are."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.peak_children = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            below = descendants(self.pid)
            self.peak_children = max(self.peak_children, len(below))
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pid, *below))
            await asyncio.sleep(0.1)

    def __enter__(self) -> Watch:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_crafted_pdfs_are_killed_at_the_limit_and_cannot_hold_the_worker(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    worker = WorkerProcess(
        settings, "all", tmp_path / "all.log", env=ENV, args=("--concurrency", "8")
    ).start()
    try:
        deadline = time.monotonic() + 60
        while worker.assigned(topology.uploaded) is None:
            assert worker.alive(), worker.tail()
            assert time.monotonic() < deadline, f"no partitions assigned:\n{worker.tail()}"
            await asyncio.sleep(0.1)

        with Watch(worker.pid) as watch:
            async with Uploader(settings) as uploader:
                bombs = [
                    (
                        await uploader.upload_bytes(
                            cpu_bomb_pdf(tag=f"bomb {n}"), f"bomb-{n}.pdf", tenant_id=tenant
                        )
                    ).document_id
                    for n in range(7)
                ]
                uploaded_at = time.monotonic()
                small = (
                    await uploader.upload_bytes(
                        b"# Still flowing\n\nA small file behind seven crafted ones.\n",
                        "still-flowing.md",
                        tenant_id=tenant,
                    )
                ).document_id
            (doc,) = (
                await wait_for_statuses(
                    store, [small], 30, statuses=frozenset({"embedded"}), running=[worker]
                )
            ).values()
            embedded_after = time.monotonic() - uploaded_at
            docs = await wait_for_statuses(store, bombs, 60, running=[worker])
            print(
                f"\nsmall file embedded {embedded_after:.1f} s after upload; peak RSS of the "
                f"worker and its {watch.peak_children} processes {watch.peak_rss / 2**20:.0f} MiB"
            )

            # The seven bombs fill two rounds of the four parsing processes; the small file
            # waits for the first round at most.
            assert doc.status == "embedded"
            assert embedded_after < 3 * TIMEOUT_S + 8, worker.tail()
            for bomb in docs.values():
                assert bomb.status == "dead-lettered", bomb
                assert bomb.status_reason is not None
                assert bomb.status_reason.startswith("parse: PermanentError: parsing 'bomb-")
                assert bomb.status_reason.endswith(
                    f"took longer than the limit parse.timeout_s={TIMEOUT_S}"
                )
            # worker all's five processes; the parse and chunk pools, each process's
            # forkserver and resource tracker: no more.
            assert watch.peak_children <= 5 + PARSE_WORKERS + 2 + 2 * 2, watch.peak_children
            assert watch.peak_rss < MEMORY_BOUND

            # SIGTERM while a parsing process is busy with a bomb: the worker stops within the
            # shutdown grace and 5 s, and leaves no process behind.
            idle = {pid: cpu_seconds(pid) for pid in descendants(worker.pid)}
            async with Uploader(settings) as uploader:
                for n in range(7, 7 + PARSE_WORKERS):
                    await uploader.upload_bytes(
                        cpu_bomb_pdf(tag=f"bomb {n}"), f"bomb-{n}.pdf", tenant_id=tenant
                    )
            # worker all > parse stage process > forkserver > the pool's parsing processes
            await wait_until(
                lambda: burning(descendants(worker.pid, below=3), idle),
                TIMEOUT_S,
                "a parsing process busy with a bomb",
                poll_s=0.05,
                explain=worker.tail,
            )
            below = descendants(worker.pid)
        assert worker.proc is not None
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.proc.wait, GRACE_S + 5)
        stopped_after = time.monotonic() - started
        print(f"SIGTERM with {PARSE_WORKERS} bombs in hand: stopped after {stopped_after:.1f} s")
        assert stopped_after < GRACE_S + 5
        assert code == 0, worker.tail()
        deadline = time.monotonic() + 2
        while left := [pid for pid in below if running(pid)]:
            assert time.monotonic() < deadline, f"processes left behind: {left}"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
