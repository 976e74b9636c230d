"""`ragstream backup DIR`, `ragstream restore DIR [--force]` and `ragstream prune
--keep-versions N [--dry-run]` (see ragstream.backup and the store's pruning)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import TaskID
from rich.table import Table

from ragstream.cli.common import console, err_console, progress_bar, run, settings_or_exit

if TYPE_CHECKING:
    from ragstream.backup.run import OnProgress
    from ragstream.settings import Settings
    from ragstream.store import StoredVersion

DirArg = Annotated[Path, typer.Argument(metavar="DIR", help="The backup directory.")]


@contextmanager
def steps() -> Iterator[OnProgress]:
    """A progress line per step on stderr (a terminal's only), fed by `on_progress(step, done,
    total)`."""
    progress = progress_bar("{task.description:<20}")
    tasks: dict[str, TaskID] = {}

    def update(step: str, done: int, total: int | None) -> None:
        if step not in tasks:
            tasks[step] = progress.add_task(step, total=total)
        progress.update(tasks[step], completed=done, total=total)

    with progress:
        yield update


def _summary(line: str, notes: list[str], label: str) -> None:
    """The outcome in one line on stdout, then each note on stderr."""
    console.print(line, highlight=False, soft_wrap=True)
    for note in notes:
        err_console.print(f"[yellow]{label}:[/] {note}", highlight=False, soft_wrap=True)


def backup(directory: DirArg) -> None:
    """Write a backup to DIR (new or empty): a PostgreSQL dump, every group's committed offsets,
    the control topic's state, the blob store's files, and manifest.json with their checksums."""
    from ragstream.backup import take_backup

    settings = settings_or_exit()
    with steps() as on_progress:
        report = run(take_backup, settings, directory, on_progress)
    m = report.manifest
    table = Table(title=f"consumer groups (prefix {m.topic_prefix})")
    for col in ("group", "state", "members", "partitions committed", "sum of offsets"):
        table.add_column(col, justify="left" if col in ("group", "state") else "right")
    for g in report.groups:
        offsets = [o for ps in g.offsets.values() for o in ps.values()]
        table.add_row(g.group_id, g.state, str(g.members), str(len(offsets)), str(sum(offsets)))
    console.print(table)
    size = sum(f.size for f in m.files)
    _summary(
        f"backup written to {directory} in {report.seconds:.1f} s: database {m.database} "
        f"({len(m.tables)} tables, {sum(m.tables.values())} rows), {len(report.groups)} groups' "
        f"offsets, {report.control_records} control record(s), {report.blobs} blob(s); "
        f"manifest.json lists {len(m.files)} files, {size} bytes",
        report.notes,
        "note",
    )


def restore(
    directory: DirArg,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Restore into a database that holds data: what the backup holds replaces it.",
        ),
    ] = False,
) -> None:
    """Restore a backup into an empty stack (workers stopped): checksums first, then the
    database, the blobs, the control topic's modes and throttle states, and the groups'
    committed offsets, so processing resumes where the backup left it."""
    from ragstream.backup import restore_backup

    settings = settings_or_exit()
    with steps() as on_progress:
        report = run(restore_backup, settings, directory, force=force, on_progress=on_progress)
    table = Table(title="rows restored")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in report.tables.items():
        table.add_row(name, str(rows))
    console.print(table)
    committed = report.offsets.committed
    _summary(
        f"restored {directory} (taken {report.manifest.started_at}) in "
        f"{report.seconds:.1f} s: {report.blobs_written} blob(s) written, "
        f"{report.control_records} control record(s) published, committed offsets of "
        f"{len(committed)} group(s) ({sum(len(o) for o in committed.values())} partitions)",
        report.notes,
        "warning",
    )


def prune(
    keep_versions: Annotated[
        int,
        typer.Option(
            "--keep-versions",
            min=1,
            help="Versions to keep per document regardless (the newest N), besides the ones "
            "it points at.",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would go; remove nothing.")
    ] = False,
) -> None:
    """Remove chunk and embedding versions no document points at, keeping each document's
    newest N versions; what a document points at is never touched."""
    settings = settings_or_exit()
    with steps() as on_progress:
        versions = run(_prune, settings, keep_versions, dry_run, on_progress)
    from ragstream.store import versions_per_tenant

    counts = versions_per_tenant(versions)
    verb = "would remove" if dry_run else "removed"
    table = Table(title=f"{verb} (keeping the newest {keep_versions} per document)")
    for col in ("tenant", "kind", "versions", "rows"):
        table.add_column(col, justify="right" if col in ("versions", "rows") else "left")
    for (tenant, kind), (count, rows) in counts.items():
        table.add_row(tenant, kind, str(count), str(rows))
    console.print(table)
    total = sum(rows for _, rows in counts.values())
    tail = "; nothing removed" if dry_run else ""
    console.print(
        f"{'dry run: ' if dry_run else ''}{verb} {len(versions)} version(s), {total} row(s){tail}",
        highlight=False,
    )


async def _prune(
    settings: Settings, keep: int, dry_run: bool, on_progress: OnProgress
) -> list[StoredVersion]:
    from ragstream.store import Store

    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2) as store:
        if dry_run:
            return await store.prunable_versions(keep)
        return await store.prune_versions(keep, lambda n, t: on_progress("documents", n, t))
