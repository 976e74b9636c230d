"""`consumers.worker.supervise`: a consumer that crashes is reported and run again; the others
in the process go on; a wrong setting stops the process. A worker process freezes what its
start-up made before it runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from consumers import worker
from consumers.worker import supervise
from ragstream.cli import app, pipeline_cmd
from ragstream.errors import ConfigError
from ragstream.metrics import Metrics


class Member:
    """Stands in for a StageRunner: crashes `crashes` times, then runs until stopped."""

    def __init__(self, name: str, crashes: int, error: Exception | None = None) -> None:
        self.name = name
        self.crashes = crashes
        self.error = error or RuntimeError(f"{name}: a bug")
        self.runs = 0
        self.metrics = Metrics(process_metrics=False)

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise self.error
        await stop.wait()


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "RESTART_BASE_S", 0.01)


def _restarts(member: Member) -> float:
    value = member.metrics.registry.get_sample_value(
        "ragstream_consumer_restarts_total", {"stage": member.name}
    )
    return value or 0.0


async def test_a_crashing_consumer_restarts_and_the_others_go_on() -> None:
    stop = asyncio.Event()
    crashing, steady = Member("embed", crashes=3), Member("parse", crashes=0)
    tasks = [
        asyncio.create_task(supervise(m, stop))  # type: ignore[arg-type]
        for m in (crashing, steady)
    ]
    for _ in range(200):
        if crashing.runs == 4:
            break
        await asyncio.sleep(0.01)
    assert crashing.runs == 4 and _restarts(crashing) == 3
    assert steady.runs == 1 and not any(t.done() for t in tasks)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_a_wrong_setting_stops_the_process() -> None:
    member = Member("embed", crashes=1, error=ConfigError("budgets.prices: no price for x"))
    with pytest.raises(ConfigError, match=r"budgets\.prices"):
        await asyncio.wait_for(supervise(member, asyncio.Event()), 5)  # type: ignore[arg-type]
    assert member.runs == 1


def test_freezing_start_up_takes_the_modules_out_of_full_collections() -> None:
    # in a process of its own: freezing is for a worker's whole life, not for the test run's
    script = (
        "import gc; from consumers.worker import freeze_start_up; "
        "before = gc.get_freeze_count(); freeze_start_up(); print(before, gc.get_freeze_count())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    before, frozen = map(int, out.stdout.split())
    assert before == 0 and frozen > 10_000, out.stdout


@pytest.mark.parametrize("stage", ["parse", "cost", "all --one-process"])
def test_a_worker_process_freezes_its_start_up_before_it_runs(
    stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(worker, "freeze_start_up", lambda: calls.append("freeze"))
    monkeypatch.setattr(pipeline_cmd, "run", lambda fn, *a, **k: calls.append(fn.__name__))
    result = CliRunner().invoke(app, ["worker", *stage.split()])
    assert result.exit_code == 0, result.output
    assert calls == ["freeze", "run_workers"]
