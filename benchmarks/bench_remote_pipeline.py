"""The pipeline against remote services at its default settings: how close `worker all` comes to
LlamaParse's in-flight cap, and whether any group rebalanced on the way.

    .venv/bin/python benchmarks/bench_remote_pipeline.py [--job-s 2] [--waves 6]
        [--openai-latency-s 0.3] [--bootstrap HOST:PORT --database-url URL]

LlamaParse's v2 API (each job `--job-s`) and OpenAI's embeddings API (each request
`--openai-latency-s`) are served by the local servers (tests/servers), each in a process of its
own, as the real services are remote. `ragstream worker all` runs as `stack up` starts it, with
both services in `real` mode and every other setting at its default: the parse process then
handles `services.llamaparse.max_jobs_in_flight` records at once, the embed process 8
(`ragstream worker --help`). `waves` x `max_jobs_in_flight` Markdown documents are uploaded at
once. From the journeys: parse jobs/s while the backlog lasted (from the first parse done to
the start of the last one), against the cap `max_jobs_in_flight / job_s`; and from the workers'
log, how many times each stage's partitions were assigned (1: no rebalance after the start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.bench_embed_scaling import bench_services
from benchmarks.bench_pipeline import Pipeline, upload_all, write_corpus
from ragstream.logs import configure_logging
from ragstream.settings import LlamaParseSettings
from tests.servers.llamaparse_server import LlamaParseServer
from tests.servers.openai_server import OpenAIServer

TARGET = 0.85
API_KEY = "bench-key"
TENANT = "remote-bench"


def serve(conn: Connection, job_s: float, latency_s: float) -> None:
    """Both local servers, until told to stop."""
    with (
        LlamaParseServer(job_duration_s=job_s, api_key=API_KEY) as llamaparse,
        OpenAIServer(latency_s=latency_s, api_key=API_KEY) as openai,
    ):
        conn.send((llamaparse.url, openai.base_url))
        conn.recv()


def assignments(log: Path) -> dict[str, int]:
    """How many times each stage's consumer was given partitions, from the workers' log."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"partitions assigned"' in line:
            stage = str(json.loads(line).get("stage"))
            counts[stage] = counts.get(stage, 0) + 1
    return counts


async def parse_rate(dsn: str) -> tuple[float, int, float, float]:
    """Parse jobs/s while the backlog lasted, the documents counted in it, the mean parse step
    (s) and the mean number of parse steps under way in that window."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM started_at)::float8 AS s, "
            "extract(epoch FROM finished_at)::float8 AS f "
            "FROM document_events WHERE stage = 'parse' AND outcome = 'ok'"
        )
    finally:
        await conn.close()
    first_done = min(r["f"] for r in rows)
    last_start = max(r["s"] for r in rows)
    done = sum(first_done < r["f"] <= last_start for r in rows)
    window = last_start - first_done
    busy = sum(max(0.0, min(r["f"], last_start) - max(r["s"], first_done)) for r in rows)
    mean_step = sum(r["f"] - r["s"] for r in rows) / len(rows)
    return done / window, done, mean_step, busy / window


async def bench(args: argparse.Namespace, bootstrap: str, server_dsn: str, work: Path) -> None:
    cap = LlamaParseSettings().max_jobs_in_flight
    count = args.waves * cap
    paths = write_corpus(work / "corpus", count)
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    servers = multiprocessing.get_context("spawn").Process(
        target=serve, args=(theirs, args.job_s, args.openai_latency_s), daemon=True
    )
    servers.start()
    theirs.close()
    try:
        llamaparse_url, openai_url = ours.recv()
        env = {
            "RAGSTREAM_SERVICES__LLAMAPARSE__MODE": "real",
            "RAGSTREAM_SERVICES__LLAMAPARSE__BASE_URL": llamaparse_url,
            "RAGSTREAM_SERVICES__LLAMAPARSE__API_KEY": API_KEY,
            "RAGSTREAM_SERVICES__OPENAI__MODE": "real",
            "RAGSTREAM_SERVICES__OPENAI__BASE_URL": openai_url,
            "RAGSTREAM_SERVICES__OPENAI__API_KEY": API_KEY,
            # A budget that does not stop the run (the defaults allow 100 requests an hour).
            "RAGSTREAM_BUDGETS__DAILY_USD": "1000",
            "RAGSTREAM_BUDGETS__HOURLY_REQUESTS": "1000000",
        }
        pipeline = await Pipeline.start(bootstrap, server_dsn, work, env=env)
        try:
            progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,
            )
            with progress:
                feed = upload_all(pipeline.settings, paths, TENANT)
                await pipeline.run(feed, count, progress, "remote pipeline")
            rate, counted, step_s, under_way = await parse_rate(pipeline.settings.postgres.dsn())
            assigned = assignments(pipeline.settings.devstack.data_dir / "workers.log")
        finally:
            await pipeline.stop()
        ours.send("stop")
    finally:
        servers.join(10)
        if servers.is_alive():
            servers.kill()
    ceiling = cap / args.job_s
    ratio = rate / ceiling
    table = Table(
        title=f"{count} documents, LlamaParse jobs of {args.job_s:g} s, "
        f"OpenAI requests of {args.openai_latency_s:g} s (local servers)"
    )
    for column in ("jobs in flight", "parse jobs/s", "cap jobs/s", "ratio", "target"):
        table.add_column(column, justify="right")
    table.add_row(str(cap), f"{rate:.2f}", f"{ceiling:.2f}", f"{ratio:.2f}", f"{TARGET:.2f}")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(
        f"documents in the measured window: {counted}; parse step {step_s:.2f} s on average, "
        f"{under_way:.1f} steps under way on average"
    )
    console.print(
        "partitions assigned per consumer (1: no rebalance after the start): "
        + ", ".join(f"{stage} {n}" for stage, n in sorted(assigned.items()))
    )
    if ratio < TARGET or any(n != 1 for n in assigned.values()):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-s", type=float, default=2.0)
    parser.add_argument("--waves", type=int, default=6)
    parser.add_argument("--openai-latency-s", type=float, default=0.3)
    parser.add_argument("--bootstrap", default=os.environ.get("RAGSTREAM_KAFKA_BOOTSTRAP"))
    parser.add_argument("--database-url", default=os.environ.get("RAGSTREAM_DATABASE_URL"))
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    with bench_services(args.bootstrap, args.database_url) as (bootstrap, server_dsn, directory):
        asyncio.run(bench(args, bootstrap, server_dsn, directory))


if __name__ == "__main__":
    main()
