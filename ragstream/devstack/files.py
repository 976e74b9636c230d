"""The local stack's files: written whole, locked against a concurrent start, and the last
lines of its logs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path


def write_file(path: Path, data: bytes | str, *, private: bool = False) -> None:
    """Write `path` whole or not at all (a temporary file, then a rename); `private` files
    (keys, passwords) are made 0600 from the start, never readable by others even briefly."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes do not start or resolve at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tail(
    path: Path, lines: int = 60, *, window: int = 128 * 1024, drop: re.Pattern[str] | None = None
) -> str:
    """The last `lines` lines of a text file ('' if it does not exist), read from its last
    `window` bytes, leaving out the lines `drop` matches."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - window))
            data = fh.read()
    except FileNotFoundError:
        return ""
    kept = data.decode("utf-8", "replace").splitlines()
    if drop is not None:
        kept = [line for line in kept if not drop.match(line)]
    return "\n".join(kept[-lines:])
