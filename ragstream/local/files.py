"""Writing the local stack's files."""

from __future__ import annotations

import os
from pathlib import Path


def write_file(path: Path, data: bytes | str, *, private: bool = False) -> None:
    """Write `path` whole or not at all (a temporary file, then a rename); `private` files
    (keys, passwords) are made 0600 from the start, never readable by others even briefly."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
