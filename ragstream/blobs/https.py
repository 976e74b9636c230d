"""`https://` claim checks, from the hosts `blobs.https_hosts` allows.

Each entry is a base, `https://<host>[:<port>][/<path>]` (a bare `<host>[:<port>][/<path>]`
means the same), laid out like every other store: a tenant's area is
`<base>/tenants/<tenant>/`. A parse worker reads an `https://` claim check only inside the
uploading tenant's area of an allowed base. Anything else is a `ClaimCheckRefused` naming the
rule: a user or password in the URL; a host and port no entry names; a query or fragment; a
path with an empty, `.` or `..` part, a backslash or a NUL byte, as written or once
percent-decoded (the server may decode it either way); a path outside the tenant's area.

The read is one GET through httpx: certificates verified (`SSL_CERT_FILE` or `SSL_CERT_DIR` name
other CAs; `HTTPS_PROXY` a proxy), redirects not followed (one could lead anywhere), at most
`size_bytes` read (a larger Content-Length is refused at once, the body is counted as it
arrives), all within `blobs.read_timeout_s`. 429, 5xx, timeouts and lost connections are
retryable (a Retry-After is honoured); a redirect, 404 or 410, 401 or 403 and other answers are
permanent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, unquote, urlsplit

import httpx

from ragstream.blobs.base import TENANTS_DIR, outside, read_capped, verified, wrong_size
from ragstream.errors import ClaimCheckRefused, ConfigError, PermanentError, RetryableError
from ragstream.validation import check_tenant_id, shown

SCHEME: Final = "https"
_CHUNK: Final = 256 * 1024
_RETRYABLE_STATUS: Final = frozenset({408, 425, 429})


def _netloc(parts: SplitResult) -> str:
    """`host[:port]` as compared: the host lower-cased, port 443 left out. ValueError if the
    port is not a number."""
    host, port = parts.hostname or "", parts.port
    host = f"[{host}]" if ":" in host else host
    return host if port in (None, 443) else f"{host}:{port}"


def _clean_path(path: str) -> bool:
    parts = path.split("/")[1:]
    return (
        path.startswith("/")
        and not any(p in ("", ".", "..") for p in parts)
        and not {"\\", "\x00"} & set(path)
    )


@dataclass(frozen=True)
class HttpsBase:
    """An allowed base: `host[:port]` as compared, and a path ("" or "/a/b")."""

    netloc: str
    path: str = ""

    @classmethod
    def parse(cls, entry: str) -> HttpsBase:
        parts = urlsplit(entry if "://" in entry else f"{SCHEME}://{entry}")
        path = parts.path.rstrip("/")
        try:
            netloc = _netloc(parts)
        except ValueError:
            netloc = ""
        if (
            parts.scheme != SCHEME
            or not parts.hostname
            or not netloc
            or "@" in parts.netloc
            or parts.query
            or parts.fragment
            or (path and not _clean_path(path))
        ):
            raise ConfigError(
                f"blobs.https_hosts: {entry!r} is not an https://<host>[:<port>][/<path>] base"
            )
        return cls(netloc, path)

    def area(self, tenant_id: str) -> str:
        return f"{self.path}/{TENANTS_DIR}/{tenant_id}/"


class HttpsBlobs:
    """Reads `https://` claim checks in the tenant's areas of `bases` (a `ClaimCheckReader`)."""

    def __init__(self, bases: Sequence[HttpsBase], *, timeout_s: float) -> None:
        self.bases = list(bases)
        self.timeout_s = timeout_s

    @classmethod
    def from_entries(cls, entries: Sequence[str], *, timeout_s: float) -> HttpsBlobs | None:
        bases = [HttpsBase.parse(e) for e in entries]
        return cls(bases, timeout_s=timeout_s) if bases else None

    def locate(self, uri: str, tenant_id: str) -> None:
        """Refuse (ClaimCheckRefused, naming the rule) what `tenant_id` may not read. Sends
        nothing anywhere."""
        check_tenant_id(tenant_id)
        parts = urlsplit(uri)
        if parts.scheme != SCHEME:
            raise ClaimCheckRefused(f"claim check refused: {shown(uri)} is not an https:// URI")
        if "@" in parts.netloc:
            raise ClaimCheckRefused(
                "claim check refused: an https:// claim check names no user or password"
            )
        try:
            netloc = _netloc(parts)
        except ValueError:
            netloc = parts.netloc
        bases = [b for b in self.bases if b.netloc == netloc]
        if not bases:
            raise ClaimCheckRefused(
                f"claim check refused: host {shown(netloc)} is not one blobs.https_hosts allows"
            )
        if parts.query or parts.fragment:
            raise ClaimCheckRefused(
                f"claim check refused: a query or fragment is not allowed: {shown(uri)}"
            )
        forms = (parts.path, unquote(parts.path))
        if not all(_clean_path(form) for form in forms):
            raise ClaimCheckRefused(
                "claim check refused: the path must have no empty, '.' or '..' parts, backslash "
                f"or NUL byte, as written or percent-decoded: {shown(uri)}"
            )
        if not any(all(f.startswith(b.area(tenant_id)) for f in forms) for b in bases):
            areas = " or ".join(f"https://{b.netloc}{b.area(tenant_id)}" for b in bases)
            raise outside(uri, tenant_id, areas)

    async def check(self, uri: str, tenant_id: str) -> None:
        self.locate(uri, tenant_id)

    async def read(self, uri: str, sha256: str, *, tenant_id: str, size_bytes: int) -> bytes:
        self.locate(uri, tenant_id)
        timeout = httpx.Timeout(self.timeout_s)
        try:
            async with (
                asyncio.timeout(self.timeout_s),  # the whole read, however slowly it trickles
                httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client,
                client.stream("GET", uri, headers={"Accept-Encoding": "identity"}) as answer,
            ):
                _check_status(answer, uri)
                length = answer.headers.get("content-length", "")
                if length.isdigit() and int(length) != size_bytes:
                    raise wrong_size(uri, int(length), size_bytes)
                data = await read_capped(uri, answer.aiter_bytes(_CHUNK), size_bytes)
        except httpx.DecodingError as exc:
            raise PermanentError(f"reading {shown(uri)}: the body does not decode: {exc}") from exc
        except (TimeoutError, httpx.TimeoutException):
            raise RetryableError(
                f"reading {shown(uri)} took longer than {self.timeout_s:g} s (blobs.read_timeout_s)"
            ) from None
        except httpx.HTTPError as exc:
            raise RetryableError(f"reading {shown(uri)}: {type(exc).__name__}: {exc}") from exc
        return verified(uri, data, sha256, size_bytes)


def _check_status(answer: httpx.Response, uri: str) -> None:
    status = answer.status_code
    what = f"reading {shown(uri)}: HTTP {status}"
    if status == 200:
        return
    if status in _RETRYABLE_STATUS or status >= 500:
        after = answer.headers.get("retry-after", "")
        retry_after = float(after) if after.isdigit() else None
        raise RetryableError(f"{what}, the server is busy or failing", retry_after=retry_after)
    if 300 <= status < 400:
        raise PermanentError(f"{what}: redirects are not followed (one could lead anywhere)")
    if status in (404, 410):
        raise PermanentError(f"{what}: it does not exist")
    if status in (401, 403):
        raise PermanentError(f"{what}: access denied")
    raise PermanentError(f"{what}: refused")
