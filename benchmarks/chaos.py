"""The long chaos run: documents flowing through worker processes while a random worker is
SIGKILLed at intervals, the broker is SIGKILLed and restarted and PostgreSQL is stopped and
restarted; then what became of every document.

    .venv/bin/python benchmarks/chaos.py [--documents 2000] [--kill-interval 10]
        [--broker-restarts 2] [--postgres-restarts 2] [--postgres-stop 20] [--broker-down 5]
        [--workers all,all,parse,chunk,embed] [--partitions 6] [--duration S]
        [--settle-timeout 600] [--seed N] [--keep]

It starts a Kafka broker and a PostgreSQL of its own in a temporary directory (it kills them,
so it never uses the ones RAGSTREAM_KAFKA_BOOTSTRAP or RAGSTREAM_DATABASE_URL name), runs the
workers as `ragstream worker` processes under a supervisor that starts again whatever ends,
uploads the documents (distinct small Markdown files) in batches over the first 80% of the
chaos window, and brings the faults on a schedule: the broker and PostgreSQL outages in
turns, a worker SIGKILL every `--kill-interval` seconds. When the window is over it waits for
the pipeline to settle and prints a table: uploaded / embedded / dead-lettered / lost /
duplicate rows, DLQ depth, what the workers and services went through, and every document that
went wrong with its status and DLQ headers. Exit code 0 when nothing was lost, duplicated or
dead-lettered, 1 otherwise. The bounded version is tests/integration/test_chaos.py, on the same
driver (tests/integration/chaos_driver.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ragstream.logs import configure_logging
from tests.integration.chaos_driver import ChaosPlan, Snapshot, run_chaos, start_services
from tests.integration.chaos_report import ChaosEvent, ChaosReport

# The long run; every field below can be changed from the command line.
LONG_RUN = ChaosPlan(documents=2000, broker_restarts=2, postgres_restarts=2, settle_timeout_s=600)
OPTIONS = (  # (option, ChaosPlan field, type, help)
    ("--documents", "documents", int, "distinct small Markdown documents to upload"),
    ("--kill-interval", "kill_interval_s", float, "seconds between worker SIGKILLs (0: none)"),
    ("--broker-restarts", "broker_restarts", int, "broker SIGKILLs, each followed by a restart"),
    ("--broker-down", "broker_down_s", float, "seconds from a broker SIGKILL to its restart"),
    ("--postgres-restarts", "postgres_restarts", int, "PostgreSQL stops, each then a restart"),
    ("--postgres-stop", "postgres_stop_s", float, "seconds PostgreSQL stays stopped"),
    ("--partitions", "partitions", int, "partitions of each stage topic"),
    ("--duration", "duration_s", float, "the chaos window (default: room for every outage)"),
    ("--settle-timeout", "settle_timeout_s", float, "seconds to wait for the pipeline to settle"),
    ("--seed", "seed", int, "seed of the documents and of the choice of worker to kill"),
)


async def chaos(plan: ChaosPlan, directory: Path, console: Console) -> ChaosReport:
    console.print("starting a Kafka broker and PostgreSQL for this run")
    services = await asyncio.to_thread(start_services, directory / "services")
    columns = (
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("embedded  {task.fields[info]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("starting", total=plan.documents, info="")

            def on_progress(snap: Snapshot) -> None:
                statuses = snap.statuses
                info = (
                    "PostgreSQL does not answer"
                    if statuses is None
                    else ", ".join(
                        f"{k} {v}" for k, v in sorted(statuses.items()) if k != "embedded"
                    )
                )
                down = f" | DOWN: {snap.outage}" if snap.outage else ""
                progress.update(
                    task,
                    description=snap.phase,
                    completed=(statuses or {}).get("embedded", progress.tasks[0].completed),
                    info=f"| published {snap.published} | {info or 'nothing else'} | kills "
                    f"{snap.kills}, exits {snap.unplanned_exits}{down}",
                )

            def on_event(event: ChaosEvent) -> None:
                progress.console.print(f"[dim]{event.at_s:7.1f}s[/]  {event.what}", highlight=False)

            return await run_chaos(
                services, plan, directory / "run", on_progress=on_progress, on_event=on_event
            )
    finally:
        await asyncio.to_thread(services.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    for option, name, kind, text in OPTIONS:
        default = getattr(LONG_RUN, name)
        text += "" if default is None else f" ({default})"
        parser.add_argument(
            option, type=kind, default=default, dest=name, metavar=kind.__name__, help=text
        )
    parser.add_argument(
        "--workers",
        default=",".join(LONG_RUN.workers),
        help="the `ragstream worker` processes, comma-separated (%(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    args = parser.parse_args()
    workers = tuple(w.strip() for w in args.workers.split(",") if w.strip())
    plan = replace(
        LONG_RUN, workers=workers, **{name: getattr(args, name) for _, name, *_ in OPTIONS}
    )
    configure_logging("WARNING", "console")  # the progress and the table, not every record
    # The broker outages are the point: the run reports them; the client's own lines would bury it.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    console = Console()
    directory = Path(tempfile.mkdtemp(prefix="ragstream-chaos-"))
    directory.chmod(0o711)  # PostgreSQL's system user passes through
    failed = True
    try:
        console.print(f"chaos run: {plan}")
        report = asyncio.run(chaos(plan, directory, console))
        console.print(report.table())
        for line in report.details():
            console.print(line, highlight=False, markup=False)
        failed = bool(report.problems())
    finally:
        if args.keep or failed:
            console.print(f"kept {directory} (logs under run/logs)")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
