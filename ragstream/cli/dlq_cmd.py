"""`ragstream dlq list|show|stats|redrive|purge`: the dead-letter topic, for operators.

Each command parses its arguments inside the async function it runs, so a bad argument is an
InvalidInput (a ConfigError) that `run` turns into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from typing import Annotated, Any

import click
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ragstream.cli import dlq_views as views
from ragstream.cli.common import EXIT_FAILURE, console, err_console, fail, run, settings_or_exit
from ragstream.dlq import (
    DlqFilter,
    DlqRecord,
    DlqStats,
    Listing,
    PurgePlan,
    RedriveReport,
    ShownRecord,
    dlq_stats,
    list_records,
    newest_of_document,
    plan_purge,
    purge,
    redrive,
    show_record,
)
from ragstream.errors import RagstreamError
from ragstream.operator_input import POSITION, format_ms, parse_offsets, parse_position, parse_time
from ragstream.settings import Settings
from ragstream.topology import (
    H_ERR_STACKTRACE,
)

app = typer.Typer(
    help="The dead-letter topic: list, show, count, redrive, purge.", no_args_is_help=True
)

EMPTY = "the DLQ is empty"

StageOpt = Annotated[
    list[str], typer.Option("--stage", "-s", help="parse | chunk | embed (repeatable).")
]
ClassOpt = Annotated[
    list[str],
    typer.Option("--error-class", "-e", help="Exception class, e.g. PermanentError (repeatable)."),
]
TenantOpt = Annotated[list[str], typer.Option("--tenant", "-t", help="Tenant id (repeatable).")]
SinceOpt = Annotated[
    str | None,
    typer.Option(help="Dead-lettered at or after: ISO 8601 (UTC if no zone) or an age (2h, 30m)."),
]
UntilOpt = Annotated[
    str | None, typer.Option(help="Dead-lettered before: ISO 8601 or an age (2h, 30m).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


def _settings() -> Settings:
    """The settings, with aiokafka's own log lines muted: its errors (a refused connection,
    say) reach the operator as the command's one-line message instead."""
    settings = settings_or_exit()
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return settings


def _filter(
    stages: list[str],
    error_classes: list[str],
    tenants: list[str],
    since: str | None = None,
    until: str | None = None,
) -> DlqFilter:
    return DlqFilter.build(
        stages=stages, error_classes=error_classes, tenants=tenants, since=since, until=until
    )


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# -- list --------------------------------------------------------------------------------------


@app.command("list")
def list_cmd(
    stage: StageOpt = [],  # noqa: B006
    error_class: ClassOpt = [],  # noqa: B006
    tenant: TenantOpt = [],  # noqa: B006
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters, oldest first."""
    settings = _settings()

    async def load() -> tuple[Listing, dict[str, str]]:
        flt = _filter(stage, error_class, tenant, since, until)
        listing = await list_records(settings, flt, limit)
        return listing, await _filenames(settings, listing.records)

    listing, filenames = run(load)
    if as_json:
        _echo_json([r.summary() for r in listing.records])
        if listing.total == 0:
            err_console.print(EMPTY)
        return
    if listing.total == 0:
        console.print(EMPTY)
        return
    if not listing.records:
        console.print(f"no DLQ record matches ({listing.total} in the DLQ)")
        return
    table = Table(title=f"dead letters ({listing.matched} matching of {listing.total})")
    columns = ("at", "time", "stage", "error class", "kind", "tries", "tenant", "document", "file")
    for col in (*columns, "message"):
        table.add_column(col, justify="right" if col == "tries" else "left", overflow="fold")
    for r in listing.records:
        table.add_row(
            r.position,
            format_ms(r.timestamp_ms),
            r.stage or "",
            r.error_class or "",
            r.kind or "",
            "" if r.attempts is None else str(r.attempts),
            escape(r.tenant or ""),
            escape(r.document or ""),
            escape(filenames.get(r.document or "", "")),
            escape(views.snippet(r.message)),
        )
    console.print(table)
    if listing.matched > len(listing.records):
        console.print(
            f"showing {len(listing.records)} of {listing.matched}; raise --limit for more"
        )


async def _filenames(settings: Settings, records: list[DlqRecord]) -> dict[str, str]:
    """The file names of the records' documents, from PostgreSQL (none when it is away: the
    listing is the DLQ's, and shows without them)."""
    from ragstream.store import Store

    ids = sorted({r.document for r in records if r.document})
    if not ids:
        return {}
    try:
        async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=1) as store:
            documents = await store.get_documents(ids)
    except RagstreamError:
        return {}
    return {d: doc.filename for d, doc in documents.items() if doc.filename}


# -- show --------------------------------------------------------------------------------------


@app.command("show")
def show_cmd(
    position: Annotated[
        str,
        typer.Argument(
            help="PARTITION:OFFSET, as `dlq list` shows it; or a document's id, or the start "
            "of it: that document's newest dead letter."
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """One dead letter: every header and the decoded payload (or a hex preview)."""
    settings = _settings()

    async def load() -> ShownRecord:
        if POSITION.fullmatch(position):
            partition, offset = parse_position(position)
        else:
            partition, offset = await newest_of_document(settings, position)
        return await show_record(settings, partition, offset)

    shown = run(load)
    if as_json:
        _echo_json(views.shown_json(shown))
        return
    r = shown.record
    console.print(
        f"[bold]{r.topic}[/] {r.position}  time {format_ms(r.timestamp_ms)}  "
        f"key {escape(str(views.text_or_hex(r.key)))}",
        highlight=False,
    )
    headers = Table(title="headers", show_header=False)
    headers.add_column("header", style="cyan", no_wrap=True)
    headers.add_column("value", overflow="fold")
    stack = None
    for key, value in r.headers:
        text = views.header_text(key, value)
        if key == H_ERR_STACKTRACE:
            stack = value.decode("utf-8", errors="replace")
            text = f"({stack.count(chr(10)) + 1} lines, below)"
        headers.add_row(key, escape(text))
    console.print(headers)
    if shown.event is not None:
        payload = Table(title=f"payload: {shown.event.EVENT_TYPE}", show_header=False)
        payload.add_column("field", style="cyan", no_wrap=True)
        payload.add_column("value", overflow="fold")
        for f in dataclasses.fields(shown.event):
            payload.add_row(f.name, escape(str(views.field_text(getattr(shown.event, f.name)))))
        console.print(payload)
    else:
        console.print(f"undecodable: {escape(shown.undecodable or '')}", highlight=False)
        if r.value:
            console.print(views.hex_preview(r.value), highlight=False)
    if stack:
        console.print("[bold]stack trace[/] (truncated at the source)")
        console.print(escape(stack), highlight=False)


# -- stats -------------------------------------------------------------------------------------


@app.command("stats")
def stats_cmd(as_json: JsonOpt = False) -> None:
    """Counts by stage and error class, the total, the oldest record's time."""
    settings = _settings()
    stats: DlqStats = run(dlq_stats, settings)
    if as_json:
        _echo_json(
            {
                "total": stats.total,
                "by_stage_and_class": [
                    {"stage": s, "error_class": c, "count": n}
                    for (s, c), n in sorted(stats.by_stage_and_class.items())
                ],
                "by_kind": dict(sorted(stats.by_kind.items())),
                "oldest": format_ms(stats.oldest_ms) or None,
                "newest": format_ms(stats.newest_ms) or None,
            }
        )
        return
    if stats.total == 0:
        console.print(EMPTY)
        return
    table = Table(title="dead letters")
    table.add_column("stage")
    table.add_column("error class")
    table.add_column("records", justify="right")
    for (stage, error_class), count in sorted(stats.by_stage_and_class.items()):
        table.add_row(stage, error_class, str(count))
    console.print(table)
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(stats.by_kind.items()))
    console.print(
        f"total {stats.total} ({kinds}); oldest {format_ms(stats.oldest_ms)}, "
        f"newest {format_ms(stats.newest_ms)}",
        highlight=False,
    )


# -- redrive -----------------------------------------------------------------------------------


def _report_skips(report: RedriveReport) -> None:
    for reason, count in sorted(report.skipped.items()):
        console.print(f"skipped {count}: {reason}", highlight=False)
    reasons = Counter(reason for _, reason in report.unroutable)
    for reason, count in sorted(reasons.items()):
        where = ", ".join(r.position for r, why in report.unroutable if why == reason)
        err_console.print(
            f"[yellow]cannot redrive {count}:[/] {escape(reason)} ({where})", highlight=False
        )


@app.command("redrive")
def redrive_cmd(
    stage: StageOpt = [],  # noqa: B006
    error_class: ClassOpt = [],  # noqa: B006
    tenant: TenantOpt = [],  # noqa: B006
    since: SinceOpt = None,
    until: UntilOpt = None,
    include_poison: Annotated[
        bool, typer.Option(help="Also send undecodable (poison) records back.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would move; send nothing.")
    ] = False,
) -> None:
    """Send dead letters back to their original topic, each at most once."""
    settings = _settings()
    progress = Progress(
        TextColumn("redriving"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=dry_run or not console.is_terminal,
    )
    task = progress.add_task("redrive", total=None)

    def advance(sent: int, total: int) -> None:
        progress.update(task, completed=sent, total=total)

    async def go(settings: Settings) -> RedriveReport:
        flt = _filter(stage, error_class, tenant, since, until)
        return await redrive(
            settings, flt, include_poison=include_poison, dry_run=dry_run, on_progress=advance
        )

    with progress:
        report = run(go, settings)
    _report_skips(report)
    if not report.selected:
        console.print("nothing to redrive")
    elif dry_run:
        console.print(views.moves_table(report.selected))
        console.print(f"dry run: would redrive {len(report.selected)} record(s); nothing sent")
    else:
        topics = ", ".join(sorted({r.origin_topic or "" for r in report.selected}))
        console.print(f"redrove {report.sent} record(s) to {topics}", highlight=False)
    if report.unroutable:
        raise typer.Exit(EXIT_FAILURE)


# -- purge -------------------------------------------------------------------------------------


def _positions(text: str) -> dict[int, int]:
    """`--up-to P:O[,...]` → {partition: offset}."""
    return {p: r.start for p, r in parse_offsets(text, option="--up-to", ends=False).items()}


@app.command("purge")
def purge_cmd(
    before: Annotated[
        str | None,
        typer.Option(help="Delete records dead-lettered before: ISO 8601 or an age (7d)."),
    ] = None,
    up_to: Annotated[
        str | None,
        typer.Option(
            "--up-to",
            help="PARTITION:OFFSET[,...]: delete the records below OFFSET (OFFSET stays).",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show counts per partition; delete nothing.")
    ] = False,
) -> None:
    """Delete dead letters before a time or offsets (Kafka's DeleteRecords: for good)."""
    settings = _settings()

    async def plan_it() -> PurgePlan:
        return await plan_purge(
            settings,
            before=parse_time(before, option="--before") if before is not None else None,
            up_to=_positions(up_to) if up_to is not None else None,
        )

    plan = run(plan_it)
    if plan.total == 0:
        console.print("nothing to purge")
        return
    console.print(views.plan_table(plan))
    if dry_run:
        console.print(f"dry run: would delete {plan.total} record(s); nothing deleted")
        return
    if not yes:
        try:
            confirmed = typer.confirm(f"delete {plan.total} record(s) from {plan.dlq_topic}?")
        except click.Abort:
            confirmed = False
        if not confirmed:
            raise fail("purge cancelled; nothing deleted (--yes skips the question)")
    lows = run(purge, settings, plan)
    console.print(
        f"deleted {plan.total} record(s); first offsets now "
        + ", ".join(f"{p}:{low}" for p, low in sorted(lows.items())),
        highlight=False,
    )
