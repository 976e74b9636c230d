"""Pipeline commands: `worker`, `upload`, `doc`, `search`, `db migrate`."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ragstream.cli.common import EXIT_CONFIG, console, fail, run, settings_or_exit
from ragstream.topology import Stage

db_app = typer.Typer(help="The PostgreSQL store.", no_args_is_help=True)

STAGE_CHOICES = [s.value for s in Stage] + ["cost", "all"]


def worker(
    stage: Annotated[
        str, typer.Argument(help="parse | chunk | embed | cost (the accountant) | all")
    ],
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Records handled at once, across partitions and documents "
            "(one document's records stay in order). Default: 1 (micro-batches) for a "
            "stage whose service runs locally; for a remote one, its calls in flight "
            "(parse: services.llamaparse.max_jobs_in_flight, embed: 8).",
        ),
    ] = None,
    one_process: Annotated[
        bool,
        typer.Option(
            "--one-process",
            help="With `all`: every stage and the accountant in this one process "
            "(less memory, one core) instead of a process each.",
        ),
    ] = False,
) -> None:
    """Run a stage worker until SIGTERM/SIGINT: parse, chunk, embed, cost (the accountant),
    or all (each in a supervised process of its own).

    A worker is a member of its stage's consumer group: run more to scale the group, up to
    the partition count. `all --one-process` runs every stage and the accountant in one
    process."""
    if stage not in STAGE_CHOICES:
        raise fail(
            f"unknown stage {stage!r}; choose one of {', '.join(STAGE_CHOICES)}", EXIT_CONFIG
        )
    from consumers.processes import run_processes, sized_concurrency
    from consumers.worker import freeze_start_up, run_workers

    settings = settings_or_exit(quiet=False, traced=stage != "all" or one_process)
    if stage == "all" and not one_process:
        code = run(run_processes, settings, concurrency=concurrency)
        if code:
            raise typer.Exit(code)
        return
    stages = list(Stage) if stage == "all" else [] if stage == "cost" else [Stage(stage)]
    freeze_start_up()
    run(
        run_workers,
        settings,
        stages,
        concurrency=concurrency or (sized_concurrency(settings, stage) if len(stages) == 1 else 1),
        handle_signals=True,
        accountant=stage in ("cost", "all"),
    )


def _parse_metadata(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--metadata {item!r}: expected key=value")
        out[key] = value
    return out


def upload(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories (recursive).")],
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant the documents belong to.")],
    metadata: Annotated[
        list[str], typer.Option("--metadata", "-m", help="key=value, repeatable.")
    ] = [],  # noqa: B006
    include: Annotated[
        list[str], typer.Option("--include", "-i", help="Glob on file names, repeatable.")
    ] = [],  # noqa: B006
    force: Annotated[
        bool, typer.Option(help="Process even if the tenant already has these bytes.")
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="Follow the documents to 'embedded' and print a table.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 600.0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object: published documents with full ids (and, with --wait, "
            "their status), refused files with the reason. Progress goes to stderr.",
        ),
    ] = False,
) -> None:
    """Publish documents to the uploaded topic."""
    from producers.upload import upload_paths

    settings = settings_or_exit(traced=True)
    meta = _parse_metadata(metadata)
    receipts, rejected = run(
        upload_paths, settings, paths, tenant_id=tenant, metadata=meta, include=include, force=force
    )
    if as_json:
        _upload_json(settings, tenant, receipts, rejected, wait, timeout)
        return
    for refusal in rejected:
        console.print(f"[yellow]refused[/] {refusal.reason}", highlight=False)
    console.print(f"published {len(receipts)} document(s) for tenant {tenant!r}")
    if wait and receipts:
        from producers.wait import result_table, wait_for_documents

        results = run(wait_for_documents, settings, [r.document_id for r in receipts], timeout)
        console.print(result_table(receipts, results))
        if any(r.status not in ("embedded", "duplicate") for r in results.values()):
            raise typer.Exit(1)
    elif not wait:
        for r in receipts:
            console.print(f"  {r.document_id}  {r.filename}", highlight=False)
    if rejected and not receipts:
        raise typer.Exit(1)


def _upload_json(
    settings: Any, tenant: str, receipts: list[Any], rejected: list[Any], wait: bool, timeout: float
) -> None:
    from rich.console import Console

    from producers.wait import wait_for_documents

    results: dict[str, Any] = {}
    if wait and receipts:
        ids = [r.document_id for r in receipts]
        results = run(wait_for_documents, settings, ids, timeout, console=Console(stderr=True))
    published = []
    for r in receipts:
        entry: dict[str, Any] = {
            "document_id": r.document_id,
            "correlation_id": r.correlation_id,
            "filename": r.filename,
            "sha256": r.sha256,
            "size_bytes": r.size_bytes,
            "content_type": r.content_type,
        }
        if r.document_id in results:
            res = results[r.document_id]
            entry |= {"status": res.status, "reason": res.reason, "pages": res.pages,
                      "chunks": res.chunks, "duplicate_of": res.duplicate_of}  # fmt: skip
        published.append(entry)
    refused = [{"path": x.path, "reason": x.reason} for x in rejected]
    typer.echo(json.dumps({"tenant": tenant, "published": published, "refused": refused}))
    unfinished = any(e.get("status") not in (None, "embedded", "duplicate") for e in published)
    if unfinished or (rejected and not receipts):
        raise typer.Exit(1)


def doc(
    identifier: Annotated[str, typer.Argument(help="Document id or correlation id.")],
) -> None:
    """Show one document's journey: each stage, when, how long, what came out."""
    from ragstream.store import Store

    settings = settings_or_exit()

    async def load() -> Any:
        async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2) as store:
            return await store.journey(identifier)

    journey = run(load)
    if journey is None:
        raise fail(f"no document with id or correlation id {identifier!r}")
    d = journey.document
    reason = f" ({d.status_reason})" if d.status_reason else ""
    console.print(
        f"[bold]{d.filename}[/]  document {d.document_id}  tenant {d.tenant_id}\n"
        f"status [bold]{d.status}[/]{reason}  sha256 {d.sha256[:16]}  correlation {d.correlation_id}",
        highlight=False,
    )
    table = Table(title="journey")
    for col in ("stage", "outcome", "attempt", "started", "ms", "detail"):
        table.add_column(col)
    for step in journey.steps:
        detail = ", ".join(f"{k}={v}" for k, v in step.detail.items())
        table.add_row(
            step.stage,
            step.outcome,
            str(step.attempt),
            step.started_at.isoformat(timespec="milliseconds"),
            f"{step.duration_ms:.1f}",
            detail,
        )
    console.print(table)


SHORT_ID = 8  # the start of a document id the tables show; `ragstream doc` accepts it


class SearchModeOption(StrEnum):
    vector = "vector"
    text = "text"
    hybrid = "hybrid"


def search(
    question: Annotated[str, typer.Argument(help="What to look for.")],
    tenant: Annotated[str, typer.Option("--tenant", "-t")],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="How many chunks.")] = 5,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: models and hits, full ids.")
    ] = False,
    mode: Annotated[
        SearchModeOption | None,
        typer.Option(
            "--mode",
            help="vector (nearest by meaning), text (full-text match) or hybrid (both, fused "
            "by rank); default search.mode (hybrid).",
        ),
    ] = None,
) -> None:
    """The tenant's chunks that best answer the question: the nearest by meaning (the question
    embedded as the tenant's documents were), the best full-text matches, or both fused."""
    from ragstream.search import provider_of
    from ragstream.search import search as run_search

    settings = settings_or_exit()
    result = run(run_search, settings, question, tenant, k, mode.value if mode else None)
    if as_json:
        payload = {
            "question": question,
            "tenant": tenant,
            "mode": result.mode,
            "degraded": result.degraded,
            "models": [
                {"provider": provider_of(m.model), "model": m.model, "dimensions": m.dimensions,
                 "documents": m.documents}
                for m in result.models
            ],
            "hits": [
                {"rank": i, "score": round(h.score, 6), "document_id": h.document_id,
                 "filename": h.filename, "heading_path": h.heading_path, "page": h.page,
                 "chunk_index": h.chunk_index, "chunker_version": h.chunker_version,
                 "text": h.text}
                for i, h in enumerate(result.hits, 1)
            ],
        }  # fmt: skip
        typer.echo(json.dumps(payload, ensure_ascii=False))
        if not result.hits:
            raise typer.Exit(1)
        return
    if not result.hits:
        found = "matching chunks" if result.mode == "text" else "embedded chunks"
        console.print(f"no {found} for tenant {tenant!r}", highlight=False)
        raise typer.Exit(1)
    models = ", ".join(
        f"{provider_of(m.model)} {m.model} ({m.dimensions}d, {m.documents} documents)"
        for m in result.models
    )
    how = {
        "vector": f"question embedded with {models}",
        "text": "full-text match (PostgreSQL, English stemming)",
        "hybrid": f"hybrid: question embedded with {models}, and full-text match; fused by rank",
    }[result.mode]
    if result.degraded:
        how = f"full-text matches only: the question could not be embedded ({result.degraded})"
    console.print(how, highlight=False)
    title = "nearest chunks" if result.mode == "vector" else "best chunks"
    table = Table(title=f"{title} for {question!r} (tenant {tenant}, {result.mode})")
    for col in ("score", "document", "file", "heading path", "page", "snippet"):
        # Ids and file names whole on any terminal (people copy them); the rest wraps.
        table.add_column(col, overflow="fold", no_wrap=col in ("score", "document", "file", "page"))
    for hit in result.hits:
        snippet = " ".join(hit.text.split())[:160]
        table.add_row(
            f"{hit.score:.3f}",
            hit.document_id[:SHORT_ID],
            hit.filename or "",
            " > ".join(hit.heading_path),
            "" if hit.page is None else str(hit.page),
            snippet,
        )
    console.print(table)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending SQL migrations (also done on every worker start)."""
    from ragstream.store.migrate import migrate

    settings = settings_or_exit()
    applied = run(migrate, settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    console.print(f"migrations applied: {', '.join(applied) if applied else 'none pending'}")
