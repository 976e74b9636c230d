"""Following uploaded documents to the end of the pipeline, with a progress bar."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producers.upload import UploadReceipt
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store.models import Document

TERMINAL = frozenset({"embedded", "duplicate", "failed", "dead-lettered"})
POLL_BATCH = 10_000  # ids per status query


@dataclass(frozen=True)
class DocumentResult:
    status: str
    reason: str | None
    pages: int | None
    chunks: int | None
    duplicate_of: str | None


def _result(doc: Document | None) -> DocumentResult:
    if doc is None:
        return DocumentResult("published", None, None, None, None)
    return DocumentResult(
        doc.status, doc.status_reason, doc.page_count, doc.chunk_count, doc.duplicate_of
    )


async def poll_documents(store: Store, document_ids: Sequence[str]) -> dict[str, DocumentResult]:
    """Every document's state, in one query (a few for very many ids)."""
    found: dict[str, Document] = {}
    for start in range(0, len(document_ids), POLL_BATCH):
        found |= await store.get_documents(document_ids[start : start + POLL_BATCH])
    return {d: _result(found.get(d)) for d in document_ids}


async def wait_for_documents(
    settings: Settings,
    document_ids: Sequence[str],
    timeout_s: float = 600.0,
    *,
    console: Console | None = None,
    poll_s: float = 0.5,
) -> dict[str, DocumentResult]:
    """Poll PostgreSQL until every document is embedded, a duplicate, or failed (or timeout)."""
    deadline = time.monotonic() + timeout_s
    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=8) as store:
        with Progress(
            TextColumn("[bold]documents"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[breakdown]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("wait", total=len(document_ids), breakdown="")
            while True:
                results = await poll_documents(store, document_ids)
                done = sum(r.status in TERMINAL for r in results.values())
                counts: dict[str, int] = {}
                for r in results.values():
                    counts[r.status] = counts.get(r.status, 0) + 1
                breakdown = "  ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                progress.update(task, completed=done, breakdown=breakdown)
                if done == len(document_ids) or time.monotonic() > deadline:
                    return results
                await asyncio.sleep(poll_s)


def result_table(receipts: Sequence[UploadReceipt], results: dict[str, DocumentResult]) -> Table:
    table = Table(title="documents")
    for col in ("file", "document", "status", "pages", "chunks", "note"):
        table.add_column(col, overflow="fold")
    for r in receipts:
        res = results.get(r.document_id)
        if res is None:
            continue
        style = {"embedded": "green", "duplicate": "cyan"}.get(res.status, "red")
        note = f"duplicate of {res.duplicate_of[:8]}" if res.duplicate_of else (res.reason or "")
        table.add_row(
            r.filename,
            r.document_id[:8],
            f"[{style}]{res.status}[/]",
            "" if res.pages is None else str(res.pages),
            "" if res.chunks is None else str(res.chunks),
            note,
        )
    return table
