"""`file://` claim checks: the local blob store.

Blobs belong to a tenant. Locally the store is a directory with an area per tenant,
content-addressed inside it: `<root>/tenants/<tenant>/<sha[:2]>/<sha>`, so a tenant's bytes are
stored once and no two tenants share a file.

A parse worker reads a `file://` claim check only inside the uploading tenant's own areas:

- `<blob root>/tenants/<tenant>/`;
- `<allowed root>/tenants/<tenant>/` for each of `blobs.allowed_roots` (other blob stores laid
  out like this one, e.g. a share another system writes to);
- each directory `blobs.tenant_roots.<tenant>` names: a directory that is that tenant's alone.

Anything else is a `ClaimCheckRefused` naming the rule it broke: a scheme other than `file`;
a host (`file://host/...`; only `file:///...` and `file://localhost/...`); a query or fragment;
a relative path, or one with a `.` or `..` part or a NUL byte once percent-decoded (decoded
once: `%252e` stays the name `%2e`); a path outside the tenant's areas as written, or once
symbolic links are resolved (checked again on the file actually opened, which must be a
regular file); a file whose size or sha256 is not the event's. A path outside the areas is
refused before the file system is touched, so a refusal says nothing of what exists there.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from ragstream.blobs.base import TENANTS_DIR, outside, sha256_hex, verified, wrong_size
from ragstream.errors import (
    ClaimCheckRefused,
    ConfigError,
    InvalidEvent,
    PermanentError,
    RetryableError,
)
from ragstream.validation import check_tenant_id, shown

if TYPE_CHECKING:
    from ragstream.settings import Settings

_LOCAL_HOSTS: Final = ("", "localhost")
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _real(path: Path | PurePosixPath | str) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path | PurePosixPath, areas: Sequence[Path]) -> bool:
    return any(path.is_relative_to(area) for area in areas)


class BlobStore:
    """A directory of per-tenant blob areas, and the reader of `file://` claim checks
    (a `ClaimCheckReader` and a `BlobWriter`)."""

    def __init__(
        self,
        root: Path,
        allowed_roots: Sequence[Path] = (),
        tenant_roots: Mapping[str, Sequence[Path]] | None = None,
    ) -> None:
        self.root = _real(root)
        # Each root as configured and with symbolic links resolved: a claim check may be
        # written either way; what is read is checked against the resolved form.
        self._shared = [(Path(os.path.abspath(p)), _real(p)) for p in (root, *allowed_roots)]
        self._owned = {
            t: [(Path(os.path.abspath(p)), _real(p)) for p in paths]
            for t, paths in (tenant_roots or {}).items()
        }
        self._check_tenant_roots()

    @classmethod
    def from_settings(cls, settings: Settings) -> BlobStore:
        blobs = settings.blobs
        return cls(settings.blob_root(), blobs.allowed_roots, blobs.tenant_roots)

    def _check_tenant_roots(self) -> None:
        """A tenant root must name a valid tenant and be that tenant's alone: it may not hold
        or lie in a shared root or another tenant's root."""
        owned = [(t, real) for t, paths in self._owned.items() for _, real in paths]
        for tenant, path in owned:
            try:
                check_tenant_id(tenant)
            except InvalidEvent as exc:
                raise ConfigError(f"blobs.tenant_roots: {exc}") from None
            others = [*(real for _, real in self._shared), *(p for t, p in owned if t != tenant)]
            for other in others:
                if path.is_relative_to(other) or other.is_relative_to(path):
                    raise ConfigError(
                        f"blobs.tenant_roots.{tenant}: {path} overlaps {other}; a tenant root "
                        "must be that tenant's alone"
                    )

    def _areas(self, tenant_id: str) -> list[tuple[Path, Path]]:
        """The tenant's areas, each as configured and resolved. The tenant's own directory
        under a shared root is not resolved: a symbolic link there leads elsewhere, and what
        it leads to is refused."""
        check_tenant_id(tenant_id)  # one safe path component: no '/', no '..'
        shared = [
            (written / TENANTS_DIR / tenant_id, real / TENANTS_DIR / tenant_id)
            for written, real in self._shared
        ]
        return [*shared, *self._owned.get(tenant_id, [])]

    def areas(self, tenant_id: str) -> list[Path]:
        """Where `tenant_id`'s claim checks may lead (symbolic links of the roots resolved)."""
        return [real for _, real in self._areas(tenant_id)]

    async def check(self, uri: str, tenant_id: str) -> None:
        await asyncio.to_thread(self.locate, uri, tenant_id)

    async def read(self, uri: str, sha256: str, *, tenant_id: str, size_bytes: int) -> bytes:
        return await asyncio.to_thread(
            self.get, uri, sha256, tenant_id=tenant_id, size_bytes=size_bytes
        )

    async def write(self, data: bytes, sha256: str, *, tenant_id: str) -> str:
        return await asyncio.to_thread(self.put, data, sha256, tenant_id=tenant_id)

    def uri_for(self, tenant_id: str, sha256: str) -> str:
        """The `file://` URI of these bytes in the tenant's own area (see `put`)."""
        return self._path_for(tenant_id, sha256).as_uri()

    def _path_for(self, tenant_id: str, sha256: str) -> Path:
        check_tenant_id(tenant_id)
        return self.root / TENANTS_DIR / tenant_id / sha256[:2] / sha256

    def put(self, data: bytes, sha256: str | None = None, *, tenant_id: str) -> str:
        """Store bytes in the tenant's area (once per content) and return their `file://` URI."""
        digest = sha256 or sha256_hex(data)
        target = self._path_for(tenant_id, digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)  # atomic: readers never see a partial blob
        return target.as_uri()

    def locate(self, uri: str, tenant_id: str) -> Path:
        """The file a claim check names, if `tenant_id` may read it (symbolic links resolved);
        else ClaimCheckRefused naming the rule. Touches the file system only inside the
        tenant's areas."""
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise ClaimCheckRefused(
                f"claim check refused: scheme {parts.scheme!r} is not supported "
                f"(only file:// claim checks are read): {shown(uri)}"
            )
        if parts.netloc not in _LOCAL_HOSTS:
            raise ClaimCheckRefused(
                f"claim check refused: a file:// claim check names no host, this one names "
                f"{shown(parts.netloc)}"
            )
        if parts.query or parts.fragment:
            raise ClaimCheckRefused(
                f"claim check refused: a query or fragment is not allowed: {shown(uri)}"
            )
        try:
            decoded = unquote(parts.path, errors="strict")
        except UnicodeDecodeError:
            raise ClaimCheckRefused(
                f"claim check refused: the path is not UTF-8 once percent-decoded: {shown(uri)}"
            ) from None
        if "\x00" in decoded:
            raise ClaimCheckRefused("claim check refused: the path holds a NUL byte")
        path = PurePosixPath(decoded)
        if not path.is_absolute() or {".", ".."} & set(decoded.split("/")):
            raise ClaimCheckRefused(
                f"claim check refused: the path must be absolute, without '.' or '..' parts: "
                f"{shown(uri)}"
            )
        areas = self._areas(tenant_id)
        if not _inside(path, [p for pair in areas for p in pair]):
            own = self.root / TENANTS_DIR / tenant_id
            raise outside(uri, tenant_id, f"{own}/ and the roots configured for it")
        real = _real(path)
        if not _inside(real, [r for _, r in areas]):
            raise ClaimCheckRefused(
                f"claim check refused: {shown(uri)} leads outside tenant {tenant_id!r}'s own "
                "blob area through a symbolic link"
            )
        return real

    def get(
        self,
        uri: str,
        sha256: str,
        *,
        tenant_id: str,
        size_bytes: int | None = None,
    ) -> bytes:
        """The bytes a claim check names, read only inside the tenant's own areas (`locate`)
        and verified against `sha256` (and `size_bytes` when given)."""
        path = self.locate(uri, tenant_id)
        data = self._read(uri, path, self.areas(tenant_id), size_bytes)
        return verified(uri, data, sha256, size_bytes)

    @staticmethod
    def _read(uri: str, path: Path, areas: Sequence[Path], size_bytes: int | None) -> bytes:
        """Open without following a last symbolic link, check that the file opened is a
        regular file still inside the areas (a link swapped in after `locate` is caught here)
        and of the expected size, and read it."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise PermanentError(f"source_uri {shown(uri)} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the last part became a symbolic link
                raise ClaimCheckRefused(
                    f"claim check refused: {shown(uri)} is a symbolic link"
                ) from None
            raise RetryableError(f"cannot read {shown(uri)}: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ClaimCheckRefused(f"claim check refused: {shown(uri)} is not a regular file")
            opened = Path(f"/proc/self/fd/{fd}")
            if opened.is_symlink() and not _inside(Path(os.readlink(opened)), areas):
                raise ClaimCheckRefused(
                    f"claim check refused: {shown(uri)} moved outside the tenant's own blob area"
                )
            if size_bytes is not None and info.st_size != size_bytes:
                raise wrong_size(uri, info.st_size, size_bytes)
            with os.fdopen(os.dup(fd), "rb") as fh:  # a file that grew since is caught too
                return fh.read() if size_bytes is None else fh.read(size_bytes + 1)
        except OSError as exc:
            raise RetryableError(f"cannot read {shown(uri)}: {exc.strerror}") from exc
        finally:
            os.close(fd)
