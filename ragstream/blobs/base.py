"""The ports of the blob store, and the checks every claim-check reader shares.

A claim check (`source_uri` + `sha256` + `size_bytes`) is read by the reader of its scheme
(`file`, `s3`, `https`), only inside the uploading tenant's own area of a configured store, at
most `size_bytes` bytes (which the door holds to `blobs.max_upload_bytes`), and verified
against its sha256. A refusal is a `ClaimCheckRefused` naming the rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Final, Protocol

from ragstream.errors import ClaimCheckRefused
from ragstream.validation import shown

TENANTS_DIR: Final = "tenants"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ClaimCheckReader(Protocol):
    """Reads the claim checks of one kind (or, `ClaimChecks`, of every configured kind)."""

    async def check(self, uri: str, tenant_id: str) -> None:
        """Refuse a claim check `tenant_id` may not read (ClaimCheckRefused), before anything
        is written. Looks at nothing outside the tenant's own areas."""
        ...

    async def read(self, uri: str, sha256: str, *, tenant_id: str, size_bytes: int) -> bytes:
        """The bytes the claim check names: read inside the tenant's own areas, no more than
        `size_bytes` of them, and verified against `size_bytes` and `sha256`."""
        ...


class BlobWriter(Protocol):
    """Where `ragstream upload` puts the bytes of a document over the inline limit."""

    def uri_for(self, tenant_id: str, sha256: str) -> str:
        """The claim check these bytes get in the tenant's own area."""
        ...

    async def write(self, data: bytes, sha256: str, *, tenant_id: str) -> str:
        """Store the bytes (once per content) and return their claim check."""
        ...


def outside(uri: str, tenant_id: str, area: str) -> ClaimCheckRefused:
    return ClaimCheckRefused(
        f"claim check refused: {shown(uri)} is outside tenant {tenant_id!r}'s own blob area "
        f"({area}); a tenant's claim checks are read only there"
    )


def wrong_size(uri: str, size: int | str, size_bytes: int) -> ClaimCheckRefused:
    return ClaimCheckRefused(
        f"claim check refused: {shown(uri)} is {size} bytes, the event's size_bytes says "
        f"{size_bytes}"
    )


def verified(uri: str, data: bytes, sha256: str, size_bytes: int | None) -> bytes:
    """`data`, if it is `size_bytes` long (when given) and its sha256 is `sha256`."""
    if size_bytes is not None and len(data) != size_bytes:
        raise wrong_size(uri, len(data), size_bytes)
    if sha256_hex(data) != sha256:
        raise ClaimCheckRefused(
            f"claim check refused: sha256 mismatch for {shown(uri)}: the blob is not the "
            "bytes the event names (or it changed after upload)"
        )
    return data


async def read_capped(uri: str, chunks: AsyncIterator[bytes], size_bytes: int) -> bytes:
    """Read a remote body as it arrives, stopping as soon as it holds more than `size_bytes`
    (what the object's metadata says is not trusted alone)."""
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > size_bytes:
            raise wrong_size(uri, f"more than {size_bytes}", size_bytes)
    return bytes(data)
