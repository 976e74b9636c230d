"""`ragstream backup DIR` and `ragstream restore DIR`: the steps, in the order that keeps a
backup consistent and a restore safe.

Backup reads the groups' committed offsets first and the database after: everything the
offsets say was processed is in the dump. A worker that runs meanwhile may process more before
the dump's snapshot; after a restore those records are processed again, which the stages'
idempotent writes make harmless. Nothing is lost either way; with the workers stopped the
backup is exact. The blobs are copied last, so every claim check the dump holds finds its file.

Restore verifies every checksum before it changes anything, refuses live workers and (without
`force`) a database that holds data, then restores the database in one transaction, the blobs,
the control topic's modes and throttle states, and the groups' offsets.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ragstream.admin import ensure_topics
from ragstream.backup import blobfiles, pgtools, streams
from ragstream.backup.manifest import FileEntry, Manifest, entry_for, read_manifest, verify
from ragstream.errors import RagstreamError
from ragstream.operator_input import InvalidInput
from ragstream.settings import Settings

DUMP = "postgres.dump"
OFFSETS = "offsets.json"
CONTROL = "control.json"
# Statuses of a document still on its way through the stages.
IN_FLIGHT = ("uploaded", "parsed", "chunked")

OnProgress = Callable[[str, int, int | None], None]  # step, done so far, total (None: unknown)


def _quiet(step: str, done: int, total: int | None) -> None:
    pass


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


@dataclass
class BackupReport:
    directory: Path
    manifest: Manifest
    groups: list[streams.SavedGroup]
    control_records: int
    blobs: int
    elsewhere: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _fresh_directory(directory: Path) -> bool:
    """Make `directory` ready for a backup; True when it was created here."""
    if directory.exists():
        if not directory.is_dir():
            raise InvalidInput(f"{directory} exists and is not a directory")
        if any(directory.iterdir()):
            raise InvalidInput(
                f"{directory} is not empty: a backup goes into a new or empty directory"
            )
        return False
    directory.mkdir(parents=True)
    return True


async def take_backup(
    settings: Settings, directory: Path, on_progress: OnProgress = _quiet
) -> BackupReport:
    started = time.monotonic()
    created = _fresh_directory(directory)
    try:
        return await _take(settings, directory, on_progress, started)
    except BaseException:
        _discard(directory, created)
        raise


def _discard(directory: Path, created: bool) -> None:
    """Remove what an unfinished backup wrote (the directory too when it made it)."""
    if created:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


async def _take(
    settings: Settings, directory: Path, on_progress: OnProgress, started: float
) -> BackupReport:
    pg_dump = pgtools.tool(settings.postgres, "pg_dump")  # before anything else: none, no backup
    manifest = Manifest(
        ragstream_version=version("ragstream"),
        pg_dump=pgtools.tool_version(pg_dump),
        started_at=_now(),
        topic_prefix=settings.kafka.topic_prefix,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        blob_root=str(settings.blob_root().resolve()),
    )
    on_progress("consumer groups", 0, None)
    groups = await streams.read_groups(settings)
    found = await streams.extents(settings)
    manifest.topics = {t: {str(p): list(e) for p, e in ps.items()} for t, ps in found.items()}
    control = await streams.read_control(settings)
    on_progress("consumer groups", 1, 1)
    dsn = settings.postgres.dsn()
    async with pgtools.snapshot(dsn) as snap:
        manifest.database, manifest.server_version = snap.database, snap.server_version
        manifest.tables = await snap.table_rows()
        claim_checks = await snap.fetch(
            "SELECT document_id, tenant_id, source_uri, sha256, size_bytes FROM documents "
            "WHERE source_uri IS NOT NULL ORDER BY document_id"
        ) if "documents" in manifest.tables else []  # fmt: skip
        tables = len(manifest.tables)
        on_progress("database dump", 0, tables)
        await pgtools.dump(
            settings.postgres,
            snap,
            directory / DUMP,
            lambda n: on_progress("database dump", n, tables),
        )
        on_progress("database dump", tables, tables)
    root = settings.blob_root()
    saved = {"topic_prefix": settings.kafka.topic_prefix, "groups": [g.to_json() for g in groups]}
    outside = blobfiles.elsewhere(root, claim_checks)
    manifest.files = await asyncio.to_thread(
        _write_files, directory, root, saved, control, outside, on_progress
    )
    manifest.finished_at = _now()
    await asyncio.to_thread(manifest.write, directory)
    notes = [
        f"group {g.group_id} had {g.members} live member(s): what they handled after its "
        "offsets were read is handled again after a restore (idempotent, nothing lost)"
        for g in groups
        if g.members
    ]
    if outside:
        notes.append(
            f"{len(outside)} claim check(s) point outside the blob store ({root}): listed in "
            f"{blobfiles.ELSEWHERE}, not copied"
        )
    return BackupReport(
        directory, manifest, groups, len(control),
        sum(f.path.startswith(f"{blobfiles.BLOBS_DIR}/") for f in manifest.files), len(outside),
        time.monotonic() - started, notes,
    )  # fmt: skip


def _write_files(
    directory: Path,
    root: Path,
    saved: dict[str, Any],
    control: list[dict[str, Any]],
    outside: list[dict[str, Any]],
    on_progress: OnProgress,
) -> list[FileEntry]:
    """Copy the blobs, write the JSON files, checksum the lot: the manifest's file entries."""
    on_progress("blobs", 0, None)
    blob_entries = blobfiles.copy_out(root, directory, lambda n, t: on_progress("blobs", n, t))
    _write_json(directory / OFFSETS, saved)
    _write_json(directory / CONTROL, {"records": control})
    _write_json(directory / blobfiles.ELSEWHERE, {"claim_checks": outside})
    files = [directory / n for n in (DUMP, OFFSETS, CONTROL, blobfiles.ELSEWHERE)]
    total = sum(f.stat().st_size for f in files)
    done = 0

    def read(n: int) -> None:
        nonlocal done
        done += n
        on_progress("checksums", done, total)

    return [entry_for(directory, f, read) for f in files] + blob_entries


# -- restore ---------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    manifest: Manifest
    tables: dict[str, int] = field(default_factory=dict)
    blobs_written: int = 0
    control_records: int = 0
    offsets: streams.CommitReport = field(default_factory=streams.CommitReport)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _load(directory: Path, name: str) -> Any:
    try:
        return json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{directory} is not a ragstream backup: {name}: {exc}") from None


async def restore_backup(
    settings: Settings, directory: Path, *, force: bool = False, on_progress: OnProgress = _quiet
) -> RestoreReport:
    started = time.monotonic()
    manifest = read_manifest(directory)
    total = sum(f.size for f in manifest.files)
    done = 0

    def read(n: int) -> None:
        nonlocal done
        done += n
        on_progress("checksums", done, total)

    on_progress("checksums", 0, total)
    await asyncio.to_thread(verify, directory, manifest, read)
    groups = [streams.SavedGroup.from_json(g) for g in _load(directory, OFFSETS)["groups"]]
    control = _load(directory, CONTROL)["records"]
    await streams.refuse_live_groups(settings, groups)
    dsn = settings.postgres.dsn()
    before = await pgtools.table_rows(dsn)
    holding = {t: n for t, n in before.items() if n and t != pgtools.MIGRATIONS_TABLE}
    if holding and not force:
        shown = ", ".join(f"{t}: {n} rows" for t, n in sorted(holding.items()))
        raise streams.RestoreRefused(
            f"database {settings.postgres.redacted_dsn()} is not empty ({shown}): restore into "
            "an empty database, or add --force to replace what it holds; nothing was restored"
        )
    report = RestoreReport(manifest)
    tables = len(manifest.tables)
    await pgtools.restore(
        settings.postgres, directory / DUMP, lambda n: on_progress("database", n, tables)
    )
    on_progress("database", tables, tables)
    after = await pgtools.table_rows(dsn)
    differ = [
        f"{t}: {after.get(t)} rows, the backup {n}"
        for t, n in manifest.tables.items()
        if after.get(t) != n
    ]
    if differ:
        raise RagstreamError(f"the restored database differs from the backup: {'; '.join(differ)}")
    report.tables = {t: after[t] for t in manifest.tables}
    root = settings.blob_root()
    report.blobs_written = await asyncio.to_thread(
        blobfiles.copy_in, directory, manifest.files, root, lambda n, t: on_progress("blobs", n, t)
    )
    on_progress("control and offsets", 0, None)
    await ensure_topics(_with_partitions(settings, manifest))
    report.control_records = await streams.republish_control(settings, control)
    report.offsets = await streams.commit_offsets(settings, groups, manifest.topic_prefix)
    on_progress("control and offsets", 1, 1)
    report.notes = await _notes(settings, directory, manifest, report)
    report.seconds = time.monotonic() - started
    return report


def _with_partitions(settings: Settings, manifest: Manifest) -> Settings:
    """Settings that create missing stage topics with as many partitions as the backup's had,
    so every saved offset has its partition."""
    prefix = manifest.topic_prefix
    stage_topics = [ps for t, ps in manifest.topics.items() if t.startswith(f"{prefix}.documents.")]
    if not stage_topics:
        return settings
    partitions = max(len(ps) for ps in stage_topics)
    kafka = settings.kafka.model_copy(update={"partitions": partitions})
    return settings.model_copy(update={"kafka": kafka})


async def _notes(
    settings: Settings, directory: Path, manifest: Manifest, report: RestoreReport
) -> list[str]:
    notes = []
    gone: dict[str, list[streams.Clamped]] = {}
    for c in report.offsets.clamped:
        gone.setdefault(c.topic, []).append(c)
    if gone:
        async with pgtools.snapshot(settings.postgres.dsn()) as snap:
            rows = await snap.fetch(
                "SELECT count(*) AS n FROM documents WHERE status = ANY($1::text[])",
                list(IN_FLIGHT),
            )
        in_flight = int(rows[0]["n"])
    if gone:
        whys = sorted({c.why for c in report.offsets.clamped})
        notes.append(
            f"the records of {', '.join(sorted(gone))} are gone (another cluster, a re-created "
            f"topic, or retention): {len(report.offsets.clamped)} saved offset(s) "
            f"{' or '.join(whys)} were committed at the log as it is, so nothing there is read "
            "twice, and what the groups had not read when the backup was taken is not processed"
        )
    if gone and in_flight:
        notes.append(
            f"{in_flight} document(s) were on their way through the stages ({', '.join(IN_FLIGHT)}): "
            "upload them again (`ragstream upload --force`) to finish them"
        )
    copied = [f for f in manifest.files if f.path.startswith(f"{blobfiles.BLOBS_DIR}/")]
    here = str(settings.blob_root().resolve())
    if copied and manifest.blob_root != here:
        notes.append(
            f"blobs restored under {here}, but the claim checks in the database and on the "
            f"topics name files under {manifest.blob_root}: copy its tenants/ there (or restore "
            "with blobs.root set to it) before documents still to be parsed are parsed, or the "
            "parse stage is replayed"
        )
    outside = _load(directory, blobfiles.ELSEWHERE)["claim_checks"]
    if outside:
        notes.append(
            f"{len(outside)} claim check(s) point outside the blob store and were not in the "
            f"backup ({blobfiles.ELSEWHERE} lists them)"
        )
    return notes
