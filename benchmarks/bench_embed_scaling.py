"""How much faster a backlog drains with three embed processes than with one.

    .venv/bin/python benchmarks/bench_embed_scaling.py [--documents 150] [--latency-ms 200]
        [--partitions 6] [--processes 1,3]

It starts its own Kafka broker and PostgreSQL in a temporary directory, as the test suite does
(or uses the ones RAGSTREAM_KAFKA_BOOTSTRAP and RAGSTREAM_DATABASE_URL name), and the local
server that speaks OpenAI's embeddings API (tests/servers/openai_server.py) with a fixed
latency per request, so the embed stage is I/O bound as it is against the real API. For each
process count it builds a fresh backlog: topics of their own (a new prefix, `--partitions`
each), documents of their own (new text, so no embedding is cached), parse and chunk run in
this process until every document waits on the chunked topic. Then it starts that many
`ragstream worker embed` processes and times them until every document is `embedded`.

Two rates per process count: from launch to done (process start, joining the group and its
rebalances included), and steady (records handled once every process held its partitions,
over the time from then to the last one). Each process handles one record at a time
(`--concurrency 1`), and gives partitions away within `kafka.shutdown_grace_s` = 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from uuid import uuid4

from producers.upload import upload_paths
from ragstream.admin import ensure_topics
from ragstream.logs import configure_logging
from ragstream.settings import Settings, load_settings
from ragstream.store import Store, migrate
from ragstream.topology import Stage, Topology
from tests.integration.pipeline_helpers import (
    WorkerProcess,
    make_corpus,
    read_topic,
    variant,
    wait_for_statuses,
    workers,
)
from tests.servers import free_port
from tests.servers.openai_server import OpenAIServer


def local_services(stack: ExitStack, directory: Path) -> tuple[str, str]:
    """A Kafka broker and a PostgreSQL of this run's own: (bootstrap, database url)."""
    from ragstream.devstack.kafka import LocalKafka
    from ragstream.devstack.postgres import LocalPostgres

    ports = {"kafka_port": free_port(), "kafka_controller_port": free_port()}
    own = load_settings(devstack={"data_dir": directory, "postgres_port": free_port(), **ports})
    kafka, postgres = LocalKafka.from_settings(own), LocalPostgres.from_settings(own)
    stack.callback(kafka.stop)
    kafka.start()
    stack.callback(postgres.stop)
    postgres.start()
    return kafka.bootstrap, postgres.ensure_database("ragstream_bench")


@contextmanager
def bench_services(
    bootstrap: str | None = None, database_url: str | None = None
) -> Iterator[tuple[str, str, Path]]:
    """(bootstrap, database url, a scratch directory) for one benchmark run: the broker and
    PostgreSQL given, else ones of the run's own; all removed at the end."""
    directory = Path(tempfile.mkdtemp(prefix="ragstream-bench-"))
    directory.chmod(0o711)  # PostgreSQL's system user passes through
    try:
        with ExitStack() as stack:
            if not (bootstrap and database_url):
                print("starting a Kafka broker and PostgreSQL for this run", file=sys.stderr)
                bootstrap, database_url = local_services(stack, directory)
            yield bootstrap, database_url, directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _seconds(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()


async def drain(
    base: Settings, server: OpenAIServer, processes: int, documents: int, partitions: int, run: int
) -> tuple[float, float, list[int]]:
    """One backlog drained by `processes` embed processes: (launch-to-done s, steady docs/s,
    records handled per process)."""
    prefix = f"bench{uuid4().hex[:8]}"
    settings = variant(base, kafka={"topic_prefix": prefix, "partitions": partitions})
    tenant = f"bench-{prefix}"
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    await ensure_topics(settings)
    paths = make_corpus(work / "docs", documents, seed=run, start=run * documents)
    print(f"  {processes} process(es): parsing and chunking {documents} documents", flush=True)
    async with workers(settings, [Stage.PARSE, Stage.CHUNK]):
        receipts, _ = await upload_paths(settings, paths, tenant_id=tenant)
        await read_topic(settings, Topology(prefix).chunked, at_least=documents, timeout_s=300)
    ids = [r.document_id for r in receipts]
    env = {
        "RAGSTREAM_SERVICES__OPENAI__MODE": "real",
        "RAGSTREAM_SERVICES__OPENAI__BASE_URL": server.base_url,
        "RAGSTREAM_SERVICES__OPENAI__API_KEY": "bench-key",
        "RAGSTREAM_BUDGETS__DAILY_USD": "100000",
        "RAGSTREAM_BUDGETS__HOURLY_REQUESTS": "10000000",
        "RAGSTREAM_KAFKA__SHUTDOWN_GRACE_S": "1",
    }
    procs = [
        WorkerProcess(settings, "embed", work / f"embed-{n}.log", client_id=f"embed-{n}", env=env)
        for n in range(processes)
    ]
    print(f"  {processes} process(es): draining the backlog", flush=True)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2)
        )
        for proc in procs:
            stack.push_async_callback(proc.stop)
        launched = time.monotonic()
        for proc in procs:
            proc.start()
        await wait_for_statuses(store, ids, 1800, running=procs)
        wall = time.monotonic() - launched
    handled = [p.handled() for p in procs]
    stable = max(_seconds(p.events("partitions assigned")[-1]) for p in procs)
    times = sorted(_seconds(h) for hs in handled for h in hs)
    after = [t for t in times if t > stable]
    steady = len(after) / (after[-1] - stable) if len(after) > 1 else float("nan")
    shutil.rmtree(work, ignore_errors=True)
    return wall, steady, [len(hs) for hs in handled]


async def bench(args: argparse.Namespace, bootstrap: str, database: str, data: Path) -> None:
    base = load_settings(
        kafka={"bootstrap_servers": bootstrap},
        postgres={"url": database},
        devstack={"data_dir": data},
        observability={"metrics_port": 0},
    )
    await migrate(base.postgres.dsn(), dimensions=base.embed.dimensions)
    counts = [int(n) for n in args.processes.split(",")]
    results: dict[int, tuple[float, float, list[int]]] = {}
    with OpenAIServer(latency_s=args.latency_ms / 1000, api_key="bench-key") as server:
        for run, n in enumerate(counts, start=1):
            results[n] = await drain(base, server, n, args.documents, args.partitions, run)
    one = results.get(counts[0])
    print(
        f"\n{args.documents} documents, {args.partitions} partitions, {args.latency_ms:g} ms per "
        "embeddings request, one record at a time per process\n"
    )
    header = (
        f"{'processes':>9} {'launch to done':>15} {'docs/s':>8} {'speedup':>8} "
        f"{'steady docs/s':>14} {'speedup':>8}   records per process"
    )
    print(header)
    print("-" * len(header))
    for n, (wall, steady, per) in results.items():
        rate = args.documents / wall
        base_rate = args.documents / one[0] if one else rate
        base_steady = one[1] if one else steady
        print(
            f"{n:>9} {wall:>14.1f}s {rate:>8.2f} {rate / base_rate:>7.2f}x "
            f"{steady:>14.2f} {steady / base_steady:>7.2f}x   {per}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=150)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--processes", default="1,3", help="process counts, the first the base")
    args = parser.parse_args()
    configure_logging("WARNING", "console")  # the table, not every record handled
    given = os.environ.get("RAGSTREAM_KAFKA_BOOTSTRAP"), os.environ.get("RAGSTREAM_DATABASE_URL")
    with bench_services(*given) as (bootstrap, database, directory):
        asyncio.run(bench(args, bootstrap, database, directory / "data"))


if __name__ == "__main__":
    main()
