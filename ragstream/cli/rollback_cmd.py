"""`ragstream rollback chunker|embedding --to ...`: point documents back at a version they
still hold (see ragstream.rollback).

Arguments are parsed inside the async function `run` calls, so a bad one is an InvalidInput:
one line and exit code 2; a version never produced for the documents asked exits 1.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ragstream.cli.common import console, full_document_ids, run, settings_or_exit
from ragstream.rollback import RollbackReport, RollbackRequest, rollback

app = typer.Typer(
    help="Point documents back at an older chunker version or embedding model they still "
    "hold: no parse, chunk or embedding work; search follows at once.",
    no_args_is_help=True,
)

TenantOpt = Annotated[
    list[str], typer.Option("--tenant", "-t", help="Only this tenant's documents (repeatable).")
]
DocumentOpt = Annotated[
    list[str],
    typer.Option(
        "--document",
        "-d",
        help="Only this document (repeatable): its id, or the start of it the tables show.",
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Count what would move; change nothing.")
]


@app.command("chunker")
def chunker(
    to: Annotated[
        str, typer.Option("--to", help="The chunker version, e.g. md-1:cl100k_base:t400:o40.")
    ],
    tenant: TenantOpt = [],  # noqa: B006
    document: DocumentOpt = [],  # noqa: B006
    dry_run: DryRunOpt = False,
) -> None:
    """Point documents at their chunks of an earlier chunker version (and those chunks'
    embeddings at the documents' current model), wherever they still hold them."""
    _rollback("chunker", to, tenant, document, dry_run)


@app.command("embedding")
def embedding(
    to: Annotated[str, typer.Option("--to", help="MODEL:DIMS, e.g. text-embedding-3-small:1536.")],
    tenant: TenantOpt = [],  # noqa: B006
    document: DocumentOpt = [],  # noqa: B006
    dry_run: DryRunOpt = False,
) -> None:
    """Point documents at their embeddings of an earlier model and dimensions, wherever every
    chunk of their current chunker version still has one."""
    _rollback("embedding", to, tenant, document, dry_run)


def _rollback(kind: str, to: str, tenants: list[str], documents: list[str], dry_run: bool) -> None:
    settings = settings_or_exit()

    async def go() -> RollbackReport:
        request = RollbackRequest.build(
            kind, to, tenants=tenants, documents=await full_document_ids(settings, documents)
        )
        return await rollback(settings, request, dry_run=dry_run)

    _print(run(go))


def _print(report: RollbackReport) -> None:
    move, request = report.move, report.request

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    say(f"rollback to {request.target} for {request.scope()}: {move.documents} document(s)")
    if report.dry_run:
        say(f"  would point at it: {move.ready}")
    else:
        say(f"  pointed at it: {move.moved} (in {report.seconds:.2f} s); search reads its rows now")
    say(f"  already at it: {move.already}")
    shown = ", ".join(move.lacking_ids[:5]) + (", ..." if move.lacking > 5 else "")
    lacking = f"  lacking its results, left as they are: {move.lacking}"
    say(lacking + (f" ({shown})" if move.lacking else ""))
    command = report.fill_command()
    if command is not None:
        say(f"to fill them, run {report.fill_settings()}, then:")
        say(f"  {command}")
    if report.dry_run:
        say("dry run: nothing changed")
