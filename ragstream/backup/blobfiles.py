"""The blob store in a backup: copies of the local store's files (`blobs/tenants/<tenant>/...`,
as laid out under `blobs.root`), and a list of the claim checks that point elsewhere (other
roots, a tenant's own directories, remote stores), which a backup does not copy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ragstream.backup.manifest import FileEntry, file_sha256
from ragstream.blobs import TENANTS_DIR

BLOBS_DIR = "blobs"
ELSEWHERE = "blobs-elsewhere.json"
_INCOMING = ".incoming-"  # a blob being written (BlobStore.put)


def blob_files(root: Path) -> Iterator[Path]:
    """Every stored blob under `root` (files being written left out, links not followed)."""
    base = root / TENANTS_DIR
    if not base.is_dir():
        return
    for dirpath, _dirs, files in os.walk(base):
        for name in sorted(files):
            path = Path(dirpath) / name
            if not name.startswith(_INCOMING) and path.is_file() and not path.is_symlink():
                yield path


def _copy(source: Path, target: Path) -> str:
    """Copy through a temporary file and rename (a reader never sees half a file); the
    sha256 of what was copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_INCOMING)
    try:
        with source.open("rb") as src, os.fdopen(fd, "wb") as dst:
            while block := src.read(1024 * 1024):
                digest.update(block)
                dst.write(block)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def copy_out(
    root: Path, directory: Path, on_file: Callable[[int, int], None] | None = None
) -> list[FileEntry]:
    """Copy the store's blobs into `directory/blobs/`; their manifest entries."""
    sources = list(blob_files(root))
    entries = []
    for n, source in enumerate(sources, 1):
        rel = source.relative_to(root)
        target = directory / BLOBS_DIR / rel
        sha = _copy(source, target)
        entries.append(FileEntry(f"{BLOBS_DIR}/{rel.as_posix()}", sha, target.stat().st_size))
        if on_file is not None:
            on_file(n, len(sources))
    return entries


def copy_in(
    directory: Path,
    entries: list[FileEntry],
    root: Path,
    on_file: Callable[[int, int], None] | None = None,
) -> int:
    """Put the backup's blobs under `root` (a file already there with the same bytes is left
    alone); how many were written."""
    wanted = [e for e in entries if e.path.startswith(f"{BLOBS_DIR}/{TENANTS_DIR}/")]
    written = 0
    for n, entry in enumerate(wanted, 1):
        target = root / entry.path.removeprefix(f"{BLOBS_DIR}/")
        same = target.is_file() and target.stat().st_size == entry.size
        if not (same and file_sha256(target) == entry.sha256):
            _copy(directory / entry.path, target)
            written += 1
        if on_file is not None:
            on_file(n, len(wanted))
    return written


def elsewhere(root: Path, claim_checks: list[Any]) -> list[dict[str, Any]]:
    """The documents whose claim check is not a file of the local store under `root` (rows
    with document_id, tenant_id, source_uri, sha256, size_bytes): listed, not copied."""
    base = Path(os.path.realpath(root / TENANTS_DIR))
    out = []
    for row in claim_checks:
        parts = urlsplit(row["source_uri"])
        if parts.scheme == "file" and Path(os.path.realpath(unquote(parts.path))).is_relative_to(
            base
        ):
            continue
        out.append(
            {k: row[k] for k in ("document_id", "tenant_id", "source_uri", "sha256", "size_bytes")}
        )
    return out
