"""`ragstream worker all` as the default shape: a process per stage and one for the cost
accountant, supervised, behind one /metrics and /ready."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ragstream.admin import ensure_topics
from ragstream.settings import Settings
from ragstream.stack import worker_processes
from ragstream.store import Store
from tests.conftest import free_port
from tests.integration.pipeline_helpers import (
    WorkerProcess,
    make_corpus,
    wait_for_statuses,
    wait_until,
)
from tests.integration.test_outages import _upload
from tests.integration.test_worker_health import _get, _until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024


def _samples(text: str, name: str) -> dict[str, float]:
    """`name`'s value per `worker` label in a /metrics text (summed over other labels)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                worker = sample.labels.get("worker", "")
                values[worker] = values.get(worker, 0.0) + sample.value
    return values


async def test_worker_all_runs_a_supervised_process_per_stage_behind_one_metrics_endpoint(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    port = free_port()
    proc = WorkerProcess(
        settings,
        "all",
        tmp_path / "all.log",
        env={"RAGSTREAM_OBSERVABILITY__METRICS_PORT": str(port)},
    ).start()
    assert proc.proc is not None
    base = f"http://127.0.0.1:{port}"
    try:
        await _until(f"{base}/ready", 200, within_s=90)
        children = worker_processes(proc.proc.pid)
        assert set(children) == {"parse", "chunk", "embed", "cost", "exporter"}, children

        ids = await _upload(settings, make_corpus(tmp_path / "in", 6), tenant)
        await wait_for_statuses(store, ids, 90, running=[proc])
        text = await asyncio.to_thread(_get, f"{base}/metrics")
        handled = _samples(text, "ragstream_records_total")
        assert {w for w, n in handled.items() if n >= len(ids)} >= {"parse", "chunk", "embed"}
        rss = _samples(text, "process_resident_memory_bytes")
        assert set(rss) >= {"parse", "chunk", "embed", "cost", "exporter"}, rss
        assert all(v < 150 * MiB for v in rss.values()), rss
        assert _samples(text, "ragstream_worker_process_up") == {
            "parse": 1.0,
            "chunk": 1.0,
            "embed": 1.0,
            "cost": 1.0,
            "exporter": 1.0,
        }
        # The groups from outside, through the same endpoint: every stage drained.
        lag = _samples(text, "ragstream_group_lag")
        assert lag.get("exporter") == 0, lag

        # A stage process that dies is started again; the others go on.
        os.kill(children["embed"], signal.SIGKILL)

        def restarted() -> bool:
            now = worker_processes(proc.proc.pid) if proc.proc else {}
            return "embed" in now and now["embed"] != children["embed"]

        await wait_until(restarted, 30, "the embed process started again", explain=proc.tail)
        assert worker_processes(proc.proc.pid)["parse"] == children["parse"]
        more = await _upload(settings, make_corpus(tmp_path / "more", 3, seed=9), tenant)
        await wait_for_statuses(store, more, 90, running=[proc])
        text = await asyncio.to_thread(_get, f"{base}/metrics")
        assert _samples(text, "ragstream_worker_process_restarts_total")["embed"] == 1.0
    finally:
        code = await proc.stop()
    assert code == 0, proc.tail()
    assert not worker_processes(proc.proc.pid)
    assert "worker process exited; starting it again" in proc.log_path.read_text()
