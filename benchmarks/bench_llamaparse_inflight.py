"""How close LlamaParse jobs come to the in-flight cap: achieved jobs/s over
`max_jobs_in_flight` / job time.

    .venv/bin/python benchmarks/bench_llamaparse_inflight.py [--job-s 2] [--waves 10]
        [--prep-ms 50] [--max-jobs-in-flight N] [--poll-interval-s S]

It serves LlamaParse's v2 API from the local server (tests/servers/llamaparse_server.py) in a
process of its own, as the real service is remote, each job taking `--job-s`; and parses
`waves` x `max_jobs_in_flight` documents through `LlamaParseParser` with the default
`services.llamaparse` settings (the options override them), from `max_jobs_in_flight` callers
at once, as a parse worker with that `--concurrency` does. Like a stage slot, each caller does
work of its own between one job and the next (registering the upload, writing the result,
publishing: a random 0 to 2 x `--prep-ms`), so jobs start whenever a caller is ready, not in
step with the polls. Jobs/s can reach at most `max_jobs_in_flight / job_s`; what is lost is
mostly the time from a job completing to a poll seeing it. Status polls per job say what the
polling costs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ragstream.logs import configure_logging
from ragstream.providers.parse.llamaparse import LlamaParseParser
from ragstream.settings import LlamaParseSettings, Mode
from tests.servers.llamaparse_server import LlamaParseServer

TARGET = 0.85
API_KEY = "bench-key"


@dataclass(frozen=True)
class ServerReport:
    polls: list[int]  # status polls per job
    seen_late_s: list[float]  # per job: from completing to the poll that saw it complete
    max_running: int


def serve(conn: Connection, job_s: float) -> None:
    """The local LlamaParse server, until told to stop; then what it saw."""
    with LlamaParseServer(job_duration_s=job_s, api_key=API_KEY) as server:
        conn.send(server.url)
        conn.recv()
        jobs = list(server.jobs.values())
        conn.send(
            ServerReport(
                polls=[job.polls for job in jobs],
                seen_late_s=[job.poll_times[-1] - job.duration_s for job in jobs],
                max_running=server.max_running(),
            )
        )


async def parse_all(
    settings: LlamaParseSettings, jobs: int, prep_s: float, console: Console
) -> float:
    """Parse `jobs` documents with `max_jobs_in_flight` callers, each a stage slot: it does its
    own work on a record (a random 0 to 2 x `prep_s`), calls the parser, and takes the next.
    Jobs/s while every caller still had records: from the first job done to the first caller
    that found none left."""
    parser = LlamaParseParser(settings)
    documents = iter(range(jobs))
    rng = random.Random(15)
    done: list[float] = []
    drained: list[float] = []
    progress = Progress(
        TextColumn("[bold]LlamaParse jobs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("jobs", total=jobs)

    async def caller() -> None:
        for n in documents:
            await asyncio.sleep(rng.uniform(0, 2 * prep_s))
            data = f"document {n}".encode()
            await parser.parse(data, filename=f"{n}.txt", content_type="text/plain")
            done.append(time.monotonic())
            progress.advance(task)
        drained.append(time.monotonic())

    try:
        with progress:
            await asyncio.gather(*(caller() for _ in range(settings.max_jobs_in_flight)))
    finally:
        await parser.aclose()
    first, end = done[0], min(drained)
    return sum(first < t <= end for t in done) / (end - first)


def bench(args: argparse.Namespace, console: Console) -> float:
    defaults = LlamaParseSettings()
    cap = args.max_jobs_in_flight or defaults.max_jobs_in_flight
    interval = args.poll_interval_s or defaults.poll_interval_s
    jobs = args.waves * cap
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=serve, args=(theirs, args.job_s), daemon=True
    )
    server.start()
    theirs.close()  # so a server that dies ends our reads instead of hanging them
    try:
        url = ours.recv()
        settings = defaults.model_copy(
            update={
                "mode": Mode.REAL,
                "base_url": url,
                "api_key": SecretStr(API_KEY),
                "max_jobs_in_flight": cap,
                "poll_interval_s": interval,
            }
        )
        rate = asyncio.run(parse_all(settings, jobs, args.prep_ms / 1000, console))
        ours.send("stop")
        report: ServerReport = ours.recv()
    finally:
        server.join(10)
        if server.is_alive():
            server.kill()
    ceiling = cap / float(args.job_s)
    ratio = rate / ceiling
    late = report.seen_late_s
    table = Table(title=f"{jobs} LlamaParse jobs of {args.job_s:g} s (local server)")
    for column in ("jobs in flight", "poll_interval_s", "jobs/s", "cap jobs/s", "ratio"):
        table.add_column(column, justify="right")
    table.add_column("seen done after, p50 / max", justify="right")
    table.add_column("polls per job", justify="right")
    table.add_row(
        f"{report.max_running} of {cap}",
        f"{interval:g}",
        f"{rate:.2f}",
        f"{ceiling:.2f}",
        f"[{'green' if ratio >= TARGET else 'red'}]{ratio:.2f}",
        f"{statistics.median(late) * 1000:.0f} / {max(late) * 1000:.0f} ms",
        f"{statistics.mean(report.polls):.1f}",
    )
    console.print(table)
    console.print(f"ratio = jobs/s / (max_jobs_in_flight / job time); target >= {TARGET}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-s", type=float, default=2.0, help="how long each job runs")
    parser.add_argument("--waves", type=int, default=10, help="jobs = waves x max_jobs_in_flight")
    parser.add_argument(
        "--prep-ms", type=float, default=50.0, help="mean work of a caller between jobs"
    )
    parser.add_argument("--max-jobs-in-flight", type=int, default=None, help="default: settings")
    parser.add_argument("--poll-interval-s", type=float, default=None, help="default: settings")
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    bench(args, Console())


if __name__ == "__main__":
    main()
