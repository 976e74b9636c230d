"""A backup directory's `manifest.json`: what was backed up, when, and every file's checksum.

The manifest is written last, so a directory without one is a backup that did not finish.
`verify` checks every listed file's size and sha256 before a restore touches anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ragstream.errors import RagstreamError
from ragstream.operator_input import InvalidInput

MANIFEST = "manifest.json"
FORMAT = "ragstream-backup"
FORMAT_VERSION = 1
_CHUNK = 1024 * 1024

OnBytes = Callable[[int], None]  # bytes read since the last call


class BackupDamaged(RagstreamError):
    """A backup file is missing or is not the file the manifest lists: nothing is restored."""


def file_sha256(path: Path, on_bytes: OnBytes | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # relative to the backup directory, '/'-separated
    sha256: str
    size: int


@dataclass
class Manifest:
    ragstream_version: str
    started_at: str
    finished_at: str = ""
    topic_prefix: str = ""
    bootstrap_servers: str = ""
    database: str = ""
    server_version: str = ""
    pg_dump: str = ""
    # Rows per table in the dump's snapshot; the restore checks the restored database against it.
    tables: dict[str, int] = field(default_factory=dict)
    # Per topic of the flow, per partition: [first offset, end offset] when the backup was taken.
    topics: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    blob_root: str = ""
    files: list[FileEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ragstream_version": self.ragstream_version,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "kafka": {
                "bootstrap_servers": self.bootstrap_servers,
                "topic_prefix": self.topic_prefix,
                "topics": self.topics,
            },
            "postgres": {
                "database": self.database,
                "server_version": self.server_version,
                "pg_dump": self.pg_dump,
                "tables": self.tables,
            },
            "blobs": {"root": self.blob_root},
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        kafka, postgres = data["kafka"], data["postgres"]
        return cls(
            ragstream_version=str(data["ragstream_version"]),
            started_at=str(data["started_at"]),
            finished_at=str(data["finished_at"]),
            topic_prefix=str(kafka["topic_prefix"]),
            bootstrap_servers=str(kafka["bootstrap_servers"]),
            topics={t: {p: list(e) for p, e in ps.items()} for t, ps in kafka["topics"].items()},
            database=str(postgres["database"]),
            server_version=str(postgres["server_version"]),
            pg_dump=str(postgres["pg_dump"]),
            tables={str(t): int(n) for t, n in postgres["tables"].items()},
            blob_root=str(data["blobs"]["root"]),
            files=[_entry(f) for f in data["files"]],
        )

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def _entry(data: dict[str, Any]) -> FileEntry:
    path = PurePosixPath(str(data["path"]))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"file {str(path)!r} lies outside the backup directory")
    return FileEntry(str(path), str(data["sha256"]), int(data["size"]))


def read_manifest(directory: Path) -> Manifest:
    """The manifest of the backup in `directory`; InvalidInput when it is not one."""
    if not directory.exists():
        raise InvalidInput(f"backup directory {directory} does not exist")
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise InvalidInput(
            f"{directory} is not a ragstream backup: it has no {MANIFEST} (an unfinished "
            "backup has none either)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {data.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        return Manifest.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"{directory} is not a ragstream backup: {path.name}: {exc}") from None


def verify(directory: Path, manifest: Manifest, on_bytes: OnBytes | None = None) -> None:
    """Check every file the manifest lists: present, its size, its sha256. BackupDamaged names
    the files that differ (all of them), and nothing is restored."""
    bad: list[str] = []
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file():
            bad.append(f"{entry.path} is missing")
        elif path.stat().st_size != entry.size:
            bad.append(
                f"{entry.path} is {path.stat().st_size} bytes, the manifest says {entry.size}"
            )
        elif file_sha256(path, on_bytes) != entry.sha256:
            bad.append(f"{entry.path}: sha256 differs from the manifest")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise BackupDamaged(
            f"backup {directory} is damaged, nothing was restored: {shown} (the file changed "
            "after the backup was written; use another backup)"
        )


def entry_for(directory: Path, path: Path, on_bytes: OnBytes | None = None) -> FileEntry:
    return FileEntry(
        path.relative_to(directory).as_posix(), file_sha256(path, on_bytes), path.stat().st_size
    )
