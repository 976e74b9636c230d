"""`s3://` claim checks: blob stores in S3 or an S3-compatible object store.

A store is `s3://<bucket>[/<prefix>]`: `blobs.store` (where `ragstream upload` writes) and each
of `blobs.allowed_stores` (other stores laid out the same way). A tenant's area in a store is
`<prefix>/tenants/<tenant>/`; uploads are content-addressed inside it,
`<prefix>/tenants/<tenant>/<sha[:2]>/<sha>`. A parse worker reads `s3://<bucket>/<key>` only
when the bucket is a configured store's and the key lies in the uploading tenant's area there.
Anything else is a `ClaimCheckRefused` naming the rule: a bucket of no configured store (a
user, port, query or fragment included); a key with an empty, `.` or `..` part; a key outside
the tenant's area. The key is taken as written (S3 keys are not percent-decoded).

The client is aiobotocore's (the `s3` extra), configured the standard AWS way: credentials from
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, a profile (`AWS_PROFILE`,
the shared config and credentials files) or an instance or task role; `AWS_DEFAULT_REGION`;
an S3-compatible server by `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`; `AWS_MAX_ATTEMPTS`
for the client's own retries. Its errors are translated here: timeouts, lost connections,
throttling and 5xx are retryable; a missing object or bucket, access denied, other 4xx and
missing credentials are permanent.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from ragstream.blobs.base import TENANTS_DIR, outside, read_capped, verified, wrong_size
from ragstream.errors import (
    ClaimCheckRefused,
    ConfigError,
    PermanentError,
    RagstreamError,
    RetryableError,
)
from ragstream.validation import check_tenant_id, shown

if TYPE_CHECKING:
    from ragstream.settings import Settings

SCHEME: Final = "s3"
_BUCKET: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CHUNK: Final = 256 * 1024
_MISSING: Final = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED: Final = frozenset(
    {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
    | {"ExpiredToken", "InvalidToken", "AccountProblem"}
)
_TRANSIENT: Final = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
    | {"TooManyRequestsException", "ServiceUnavailable", "InternalError", "InternalFailure"}
)


def _clean(parts: Sequence[str]) -> bool:
    return not any(part in ("", ".", "..") for part in parts)


@dataclass(frozen=True)
class S3Store:
    """`s3://<bucket>[/<prefix>]`: a bucket, and a key prefix with no slash at either end."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str, setting: str) -> S3Store:
        """A store URI from the settings; ConfigError naming `setting` if it is not one."""
        parts = urlsplit(uri)
        prefix = parts.path.strip("/")
        if (
            parts.scheme != SCHEME
            or not _BUCKET.match(parts.netloc)
            or parts.query
            or parts.fragment
            or (prefix and not _clean(prefix.split("/")))
        ):
            raise ConfigError(
                f"{setting}: {uri!r} is not an s3://<bucket>[/<prefix>] URI (a bucket name of "
                "3-63 lower-case letters, digits, '.' and '-'; no empty, '.' or '..' parts)"
            )
        return cls(parts.netloc, prefix)

    def area(self, tenant_id: str) -> str:
        """The key prefix of the tenant's area, ending in '/'."""
        return "/".join(p for p in (self.prefix, TENANTS_DIR, tenant_id) if p) + "/"

    def uri(self, key: str) -> str:
        return f"{SCHEME}://{self.bucket}/{key}"


class S3Blobs:
    """Reads `s3://` claim checks in the tenant's areas of `stores`, and writes uploads to the
    first of them (a `ClaimCheckReader` and a `BlobWriter`). `timeout_s` bounds one read or
    write from first byte sent to last byte received."""

    def __init__(self, stores: Sequence[S3Store], *, timeout_s: float) -> None:
        if not stores:
            raise ValueError("S3Blobs needs at least one store")
        try:
            from aiobotocore.session import get_session
        except ImportError:
            raise ConfigError(
                "blobs: s3:// stores need the s3 extra (pip install 'ragstream[s3]')"
            ) from None
        self.stores = list(stores)
        self.timeout_s = timeout_s
        self._session = get_session()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Blobs | None:
        """The S3 stores the settings name (`blobs.store` first), or None if they name none."""
        blobs = settings.blobs
        uris = [(blobs.store, "blobs.store")] if blobs.store else []
        uris += [(u, "blobs.allowed_stores") for u in blobs.allowed_stores]
        stores = [S3Store.parse(uri, setting) for uri, setting in uris]
        return cls(stores, timeout_s=blobs.read_timeout_s) if stores else None

    @asynccontextmanager
    async def _call(self, uri: str, doing: str) -> AsyncIterator[Any]:
        """A client for one call on `uri`: the whole call within `timeout_s`, its errors
        translated (a refusal raised inside passes as it is)."""
        from aiobotocore.config import AioConfig

        config = AioConfig(connect_timeout=self.timeout_s, read_timeout=self.timeout_s)
        errors = _client_errors()
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                self._session.create_client(SCHEME, config=config) as s3,
            ):
                yield s3
        except TimeoutError:
            raise RetryableError(
                f"{doing} {shown(uri)} took longer than {self.timeout_s:g} s (blobs.read_timeout_s)"
            ) from None
        except errors as exc:
            raise translate(exc, uri, doing) from exc

    def locate(self, uri: str, tenant_id: str) -> tuple[str, str]:
        """The bucket and key a claim check names, if `tenant_id` may read them; else
        ClaimCheckRefused naming the rule. Sends nothing anywhere."""
        check_tenant_id(tenant_id)
        parts = urlsplit(uri)
        if parts.scheme != SCHEME:
            raise ClaimCheckRefused(f"claim check refused: {shown(uri)} is not an s3:// URI")
        if parts.query or parts.fragment:
            raise ClaimCheckRefused(
                f"claim check refused: a query or fragment is not allowed: {shown(uri)}"
            )
        stores = [s for s in self.stores if s.bucket == parts.netloc]
        if not stores:
            raise ClaimCheckRefused(
                f"claim check refused: bucket {shown(parts.netloc)} is not a blob store of this "
                "deployment (blobs.store, blobs.allowed_stores); claim checks are read only there"
            )
        key = parts.path.removeprefix("/")
        if not _clean(key.split("/")):
            raise ClaimCheckRefused(
                f"claim check refused: the key must have no empty, '.' or '..' parts: {shown(uri)}"
            )
        if not any(key.startswith(s.area(tenant_id)) for s in stores):
            areas = " or ".join(s.uri(s.area(tenant_id)) for s in stores)
            raise outside(uri, tenant_id, areas)
        return parts.netloc, key

    async def check(self, uri: str, tenant_id: str) -> None:
        self.locate(uri, tenant_id)

    async def read(self, uri: str, sha256: str, *, tenant_id: str, size_bytes: int) -> bytes:
        bucket, key = self.locate(uri, tenant_id)
        async with self._call(uri, "reading") as s3:
            answer = await s3.get_object(Bucket=bucket, Key=key)
            async with answer["Body"] as body:  # closed however this ends
                length = answer.get("ContentLength")
                if length is not None and length != size_bytes:
                    raise wrong_size(uri, length, size_bytes)
                data = await read_capped(uri, body.iter_chunks(_CHUNK), size_bytes)
        return verified(uri, data, sha256, size_bytes)

    def _key_for(self, tenant_id: str, sha256: str) -> str:
        check_tenant_id(tenant_id)
        return f"{self.stores[0].area(tenant_id)}{sha256[:2]}/{sha256}"

    def uri_for(self, tenant_id: str, sha256: str) -> str:
        return self.stores[0].uri(self._key_for(tenant_id, sha256))

    async def write(self, data: bytes, sha256: str, *, tenant_id: str) -> str:
        home, key = self.stores[0], self._key_for(tenant_id, sha256)
        uri = home.uri(key)
        async with self._call(uri, "writing") as s3:
            await s3.put_object(
                Bucket=home.bucket,
                Key=key,
                Body=data,
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
            )
        return uri


def _client_errors() -> tuple[type[Exception], ...]:
    """What the client raises when a call fails (imported only where S3 is used)."""
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, aiohttp.ClientError, OSError)


def translate(exc: Exception, uri: str, doing: str) -> RagstreamError:
    """An S3 client error as what the caller must do: retry or give up."""
    from botocore.exceptions import (
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    what = f"{doing} {shown(uri)}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        said = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in _MISSING or status == 404:
            return PermanentError(f"{what}: it does not exist ({said})")
        if code in _DENIED or status in (401, 403):
            return PermanentError(f"{what}: access denied ({said})")
        if code in _TRANSIENT or status == 429 or status >= 500:
            return RetryableError(f"{what}: the object store is busy or failing ({said})")
        return PermanentError(f"{what}: refused ({said})")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | ProfileNotFound):
        return PermanentError(
            f"{what}: {exc} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
            "or run with an instance or task role)"
        )
    return RetryableError(f"{what}: {type(exc).__name__}: {exc}")  # timeouts, lost connections
