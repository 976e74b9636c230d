"""Claim checks: document bytes live in a blob store; events carry a URI and a sha256.

Locally the store is a directory, content-addressed (`<root>/<sha[:2]>/<sha>`), so the same bytes
are stored once. Readers accept `file://` URIs under the blob root or a configured allowed root.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ragstream.errors import PermanentError, RetryableError


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, root: Path, allowed_roots: list[Path] | None = None) -> None:
        self.root = root.resolve()
        self.allowed = [self.root, *(p.resolve() for p in allowed_roots or [])]

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store bytes (once per content) and return their `file://` URI."""
        digest = sha256 or sha256_hex(data)
        target = self.root / digest[:2] / digest
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)  # atomic: readers never see a partial blob
        return target.as_uri()

    def get(self, uri: str, sha256: str | None = None) -> bytes:
        """Read the bytes a URI names; verify them against sha256 when given."""
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise PermanentError(f"unsupported source_uri scheme {parts.scheme!r} in {uri!r}")
        path = Path(unquote(parts.path)).resolve()
        if not any(path.is_relative_to(root) for root in self.allowed):
            raise PermanentError(f"source_uri {uri!r} is outside the allowed roots")
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise PermanentError(f"source_uri {uri!r} does not exist") from exc
        except OSError as exc:
            raise RetryableError(f"cannot read {uri!r}: {exc}") from exc
        if sha256 is not None and sha256_hex(data) != sha256:
            raise PermanentError(f"sha256 mismatch for {uri!r}: the blob changed after upload")
        return data
