"""benchmarks/bench_pipeline.py runs end to end on a tiny corpus, against the session's broker
and PostgreSQL, and reports every figure it promises. No speed is asserted: the machine is
shared and the corpus too small to say anything about throughput."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = 30


async def test_bench_pipeline_reports_rates_ratio_latency_and_memory(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_pipeline.py"),
        "--documents",
        str(DOCUMENTS),
        "--latency-s",
        "2",
        "--bootstrap",
        kafka_bootstrap,
        "--database-url",
        database_url,
        "--json",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    done = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())

    for name in ("pipeline", "ceiling", "logic"):
        figures = report[name]
        assert figures["documents"] == DOCUMENTS, name
        assert figures["chunks"] >= DOCUMENTS, name
        assert figures["docs_per_s"] > 0 and figures["chunks_per_s"] > 0, name
    # the ceiling and the logic ran before the pipeline and after it, and count at their mean
    for name in ("ceiling", "logic"):
        runs = report[name]["runs"]
        assert len(runs) == 2, name
        assert all(r["documents"] == DOCUMENTS and r["docs_per_s"] > 0 for r in runs), name
        mean = statistics.mean(r["docs_per_s"] for r in runs)
        assert report[name]["docs_per_s"] == pytest.approx(mean), name
        assert f"runs: {runs[0]['docs_per_s']:.1f}, {runs[1]['docs_per_s']:.1f}" in done.stdout
    slowest = min(report["ceiling"]["docs_per_s"], report["logic"]["docs_per_s"])
    assert 0 < report["combined_docs_per_s"] < slowest
    assert report["ratio"] > 0
    latency = report["latency"]
    assert latency["documents"] >= 5
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    processes = {row["process"]: row["mib"] for row in report["peak_rss"]}
    assert processes.get("pipeline: ragstream worker all", 0) > 0, processes
    for run in ("ceiling", "ceiling, after"):
        assert {f"{run}: {stage} stage" for stage in ("parse", "chunk", "embed")} <= set(processes)
    assert all(mib > 0 for mib in processes.values()), processes
    assert "ratio pipeline / combined" in done.stdout
    # CPU by process group: the broker and PostgreSQL are this session's (not the run's own), so
    # only the passes' own processes are measured
    for name in ("pipeline", "ceiling", "logic"):
        assert report[name]["cpu_s"]["stages"] > 0, (name, report[name]["cpu_s"])
    assert "CPU seconds per 1,000 documents" in done.stdout
    # the machine's speed during each pass, in the order run, against the pipeline pass's
    speeds = report["machine_speed"]
    assert [s["pass"] for s in speeds] == [
        "logic (before)",
        "ceiling (before)",
        "pipeline",
        "latency",
        "ceiling (after)",
        "logic (after)",
    ]
    (pipeline,) = [s for s in speeds if s["pass"] == "pipeline"]
    assert pipeline["probe_ms"] > 0 and pipeline["vs_pipeline"] == pytest.approx(1.0)
    for s in speeds:  # a pass too short for a sample has none
        assert s["probe_ms"] is None or s["vs_pipeline"] > 0, s
    assert "machine speed" in done.stdout
