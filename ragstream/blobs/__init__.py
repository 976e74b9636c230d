"""Claim checks: document bytes live in a blob store; events carry a URI and a sha256.

Blobs belong to a tenant: every store keeps a tenant's bytes in an area of its own,
`.../tenants/<tenant>/`, and a claim check is read only inside the uploading tenant's areas.

    base.py    the ports (ClaimCheckReader, BlobWriter) and the checks readers share
    files.py   `file://`: the local store under `blobs.root`, allowed roots, tenant roots
    s3.py      `s3://`: `blobs.store` and `blobs.allowed_stores` (the `s3` extra)
    https.py   `https://`: the hosts `blobs.https_hosts` allows

`ClaimChecks` reads every kind the settings configure; `blob_writer` is where uploads go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ragstream.blobs.base import TENANTS_DIR, BlobWriter, ClaimCheckReader, sha256_hex
from ragstream.blobs.files import BlobStore
from ragstream.blobs.https import HttpsBlobs
from ragstream.blobs.s3 import S3Blobs
from ragstream.errors import ClaimCheckRefused
from ragstream.validation import shown

if TYPE_CHECKING:
    from ragstream.settings import Settings

__all__ = [
    "TENANTS_DIR",
    "BlobStore",
    "BlobWriter",
    "ClaimCheckReader",
    "ClaimChecks",
    "blob_writer",
    "sha256_hex",
]


class ClaimChecks:
    """Reads claim checks by their scheme, with the reader configured for it (a
    `ClaimCheckReader`). A scheme no reader is configured for is refused."""

    def __init__(self, readers: Mapping[str, ClaimCheckReader]) -> None:
        self.readers = dict(readers)

    @classmethod
    def from_settings(cls, settings: Settings) -> ClaimChecks:
        """`file` always; `s3` when `blobs.store` or `blobs.allowed_stores` names a bucket;
        `https` when `blobs.https_hosts` names a host. A wrong value is a ConfigError."""
        blobs = settings.blobs
        readers: dict[str, ClaimCheckReader] = {"file": BlobStore.from_settings(settings)}
        s3 = S3Blobs.from_settings(settings)
        if s3 is not None:
            readers["s3"] = s3
        https = HttpsBlobs.from_entries(blobs.https_hosts, timeout_s=blobs.read_timeout_s)
        if https is not None:
            readers["https"] = https
        return cls(readers)

    def _reader(self, uri: str) -> ClaimCheckReader:
        try:
            scheme = urlsplit(uri).scheme
        except ValueError:
            raise ClaimCheckRefused(f"claim check refused: not a URI: {shown(uri)}") from None
        reader = self.readers.get(scheme)
        if reader is None:
            kinds = ", ".join(f"{s}://" for s in self.readers)
            raise ClaimCheckRefused(
                f"claim check refused: scheme {scheme!r} is not read here (this deployment "
                f"reads {kinds} claim checks): {shown(uri)}"
            )
        return reader

    async def check(self, uri: str, tenant_id: str) -> None:
        await self._reader(uri).check(uri, tenant_id)

    async def read(self, uri: str, sha256: str, *, tenant_id: str, size_bytes: int) -> bytes:
        reader = self._reader(uri)
        return await reader.read(uri, sha256, tenant_id=tenant_id, size_bytes=size_bytes)


def blob_writer(settings: Settings) -> BlobWriter:
    """Where uploads over the inline limit go: the S3 store `blobs.store` names, else the
    local store under `blobs.root`."""
    s3 = S3Blobs.from_settings(settings) if settings.blobs.store else None
    return s3 or BlobStore.from_settings(settings)
