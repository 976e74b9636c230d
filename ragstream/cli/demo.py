"""The main job (`ragstream demo`, `make demo`): the local stack, every worker, the bundled
sample set uploaded for a fresh tenant, a summary, a search, and a clean stop.

Part of the CLI, the composition root: it puts producers and consumers together, which nothing
else in the core package does.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from ragstream.samples import sample_dir
from ragstream.settings import Settings, with_devstack_password
from ragstream.stack import StackInfo, stack_down, stack_up
from ragstream.store import Store
from ragstream.store.models import SearchHit, Summary
from ragstream.topology import Stage

SAMPLE_PATTERNS = ("*.pdf", "*.md", "*.html", "*.txt")
DEMO_QUESTION = "how does a consumer group share partitions between its members"


@dataclass
class DemoReport:
    tenant: str
    stack: StackInfo
    uploaded: int
    refused: int
    statuses: dict[str, int]
    summary: Summary
    stage_ms: dict[str, tuple[int, float, float]]  # stage -> (steps, mean ms, max ms)
    wall_s: float
    hits: list[SearchHit] = field(default_factory=list)


async def _stage_times(
    store: Store, document_ids: list[str]
) -> dict[str, tuple[int, float, float]]:
    durations: dict[str, list[float]] = {}
    for doc_id in document_ids:
        journey = await store.journey(doc_id)
        for step in journey.steps if journey else []:
            durations.setdefault(step.stage, []).append(step.duration_ms)
    return {
        stage.value: (len(d), sum(d) / len(d), max(d))
        for stage in Stage
        if (d := durations.get(stage.value))
    }


async def run_demo(settings: Settings, console: Console, timeout_s: float = 300.0) -> DemoReport:
    from consumers.worker import run_workers
    from producers.upload import upload_paths
    from producers.wait import result_table, wait_for_documents
    from ragstream.search import search_chunks

    t0 = time.monotonic()
    with console.status("starting Kafka and PostgreSQL (the first run resolves Kafka's jars)"):
        stack = await stack_up(settings, workers=False)
        settings = with_devstack_password(settings)  # a first start made the server's password
    console.print(
        f"kafka {stack.kafka_bootstrap}   postgresql {stack.postgres_dsn}", highlight=False
    )
    stop = asyncio.Event()
    # The demo's own workers serve metrics on a free port: a running stack may hold the default.
    obs = settings.observability.model_copy(update={"metrics_port": 0})
    worker_settings = settings.model_copy(update={"observability": obs})
    workers = asyncio.create_task(run_workers(worker_settings, list(Stage), stop=stop))
    try:
        tenant = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        receipts, refused = await upload_paths(
            settings,
            [sample_dir()],
            tenant_id=tenant,
            include=SAMPLE_PATTERNS,
            metadata={"source": "ragstream-samples"},
        )
        console.print(f"uploaded {len(receipts)} sample documents for tenant [bold]{tenant}[/]")
        ids = [r.document_id for r in receipts]
        waiting = asyncio.create_task(wait_for_documents(settings, ids, timeout_s, console=console))
        done, _ = await asyncio.wait({waiting, workers}, return_when=asyncio.FIRST_COMPLETED)
        if workers in done:  # a worker crashed: say why rather than wait for the timeout
            waiting.cancel()
            await workers
        results = await waiting
        console.print(result_table(receipts, results))
        async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2) as store:
            summary = await store.summary(tenant)
            stage_ms = await _stage_times(store, ids)
        hits = await search_chunks(settings, DEMO_QUESTION, tenant, 3)
        statuses: dict[str, int] = {}
        for res in results.values():
            statuses[res.status] = statuses.get(res.status, 0) + 1
        return DemoReport(
            tenant,
            stack,
            len(receipts),
            len(refused),
            statuses,
            summary,
            stage_ms,
            time.monotonic() - t0,
            hits,
        )
    finally:
        stop.set()
        await asyncio.gather(workers, return_exceptions=True)
        await asyncio.to_thread(stack_down, settings, stack.started)


def summary_table(report: DemoReport) -> Table:
    s = report.summary
    table = Table(title=f"ragstream demo: tenant {report.tenant}")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [
        ("documents uploaded", report.uploaded),
        ("embedded", report.statuses.get("embedded", 0)),
        ("duplicates (not processed again)", s["duplicates"]),
        ("failed", report.statuses.get("failed", 0) + report.statuses.get("dead-lettered", 0)),
        ("pages", s["pages"]),
        ("chunks", s["chunks"]),
        ("embeddings (searchable)", s["embeddings"]),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    for stage, (steps, mean, worst) in report.stage_ms.items():
        table.add_row(
            f"{stage} time per document (mean / max)",
            f"{mean:.0f} ms / {worst:.0f} ms ({steps} steps)",
        )
    table.add_row("wall time, start to summary", f"{report.wall_s:.1f} s")
    return table


def hits_table(hits: list[SearchHit], question: str) -> Table:
    table = Table(title=f"ragstream search {question!r}")
    for col in ("score", "document", "heading path", "snippet"):
        table.add_column(col, overflow="fold")
    for hit in hits:
        snippet = " ".join(hit.text.split())[:100]
        table.add_row(f"{hit.score:.3f}", hit.filename or "", " > ".join(hit.heading_path), snippet)
    return table
