"""s3:// claim checks (ragstream.blobs.s3): the tenant rules, then reads and writes through the
real client (aiobotocore) against moto's S3 server and against a scripted server that fails on
purpose."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from aiobotocore.session import get_session

from ragstream.blobs import BlobStore, ClaimChecks, blob_writer, sha256_hex
from ragstream.blobs.s3 import S3Blobs, S3Store
from ragstream.errors import (
    ClaimCheckRefused,
    ConfigError,
    InvalidEvent,
    PermanentError,
    RetryableError,
)
from ragstream.settings import load_settings
from tests.conftest import free_port
from tests.remote_blobs import Answer, ScriptedServer, s3_error

A_BYTES = b"tenant a's confidential report\n" * 100
A_SHA = sha256_hex(A_BYTES)
STORE = S3Store("docs", "ragstream")


def refusal(reader: S3Blobs, uri: str, tenant: str = "b") -> str:
    with pytest.raises(ClaimCheckRefused) as info:
        reader.locate(uri, tenant)
    return str(info.value)


# -- the rules (nothing is sent anywhere) -------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [("s3://docs", "docs", ""), ("s3://docs/", "docs", ""), ("s3://docs/a/b/", "docs", "a/b")],
)
def test_a_store_is_a_bucket_and_a_prefix(uri: str, bucket: str, prefix: str) -> None:
    assert S3Store.parse(uri, "blobs.store") == S3Store(bucket, prefix)


@pytest.mark.parametrize(
    "uri", ["gs://docs", "s3://Docs", "s3://d", "s3://docs/../x", "s3://docs?x=1", "s3://k@docs"]
)
def test_a_store_that_is_not_one_stops_start_up_naming_the_setting(uri: str) -> None:
    with pytest.raises(ConfigError, match=r"^blobs.allowed_stores: .* is not an s3://<bucket>"):
        S3Store.parse(uri, "blobs.allowed_stores")
    settings = load_settings(blobs={"store": uri})
    with pytest.raises(ConfigError, match=r"^blobs.store: "):
        ClaimChecks.from_settings(settings)


def test_a_tenants_claim_checks_are_read_only_in_its_own_area() -> None:
    reader = S3Blobs([STORE], timeout_s=5)
    key = f"ragstream/tenants/b/{A_SHA[:2]}/{A_SHA}"
    assert reader.locate(f"s3://docs/{key}", "b") == ("docs", key)

    message = refusal(reader, f"s3://docs/ragstream/tenants/a/{A_SHA[:2]}/{A_SHA}")
    assert "is outside tenant 'b''s own blob area (s3://docs/ragstream/tenants/b/);" in message
    assert "read only there" in message
    assert "outside tenant 'a'" in refusal(reader, "s3://docs/ragstream/tenants/ab/x", "a")
    assert "outside tenant" in refusal(reader, "s3://docs/tenants/b/x")
    assert "outside tenant" in refusal(reader, "s3://docs/ragstream-old/tenants/b/x")

    for other in ("s3://other/ragstream/tenants/b/x", "s3://k@docs/ragstream/tenants/b/x"):
        assert "is not a blob store of this deployment (blobs.store, blobs.allowed_stores)" in (
            refusal(reader, other)
        )
    for trick in ("b/../a/x", "b/./x", "b//x", "b/", "b/x/"):
        assert "no empty, '.' or '..' parts" in refusal(
            reader, f"s3://docs/ragstream/tenants/{trick}"
        )
    assert "a query or fragment" in refusal(reader, f"s3://docs/{key}?versionId=1")
    assert "not an s3:// URI" in refusal(reader, f"file:///{key}")


def test_allowed_stores_are_laid_out_by_tenant_too() -> None:
    reader = S3Blobs([STORE, S3Store("shared")], timeout_s=5)
    assert reader.locate("s3://shared/tenants/b/x", "b") == ("shared", "tenants/b/x")
    assert "outside tenant" in refusal(reader, "s3://shared/ragstream/tenants/b/x")
    assert reader.uri_for("b", A_SHA) == f"s3://docs/ragstream/tenants/b/{A_SHA[:2]}/{A_SHA}"


@pytest.mark.parametrize("tenant", ["a/../b", "..", "a/b", ""])
def test_a_tenant_id_cannot_name_a_key_prefix(tenant: str) -> None:
    reader = S3Blobs([STORE], timeout_s=5)
    with pytest.raises(InvalidEvent):
        reader.locate("s3://docs/ragstream/tenants/b/x", tenant)
    with pytest.raises(InvalidEvent):
        reader.uri_for(tenant, A_SHA)


async def test_claim_checks_are_read_by_scheme_and_only_the_configured_ones(
    tmp_path: Path,
) -> None:
    local = ClaimChecks({"file": BlobStore(tmp_path / "blobs")})
    with pytest.raises(ClaimCheckRefused) as info:
        await local.check("s3://docs/ragstream/tenants/b/x", "b")
    assert "scheme 's3' is not read here (this deployment reads file:// claim checks)" in str(
        info.value
    )
    with pytest.raises(ClaimCheckRefused, match="not a URI"):
        await local.check("s3://[docs/x", "b")

    settings = load_settings(
        devstack={"data_dir": tmp_path / "data"},
        blobs={"store": "s3://docs/ragstream", "https_hosts": ["files.example.com"]},
    )
    configured = ClaimChecks.from_settings(settings)
    assert set(configured.readers) == {"file", "s3", "https"}
    await configured.check("s3://docs/ragstream/tenants/b/x", "b")
    writer = blob_writer(settings)
    assert writer.uri_for("b", A_SHA).startswith("s3://docs/ragstream/tenants/b/")
    assert isinstance(blob_writer(load_settings(devstack={"data_dir": tmp_path})), BlobStore)


# -- against moto's S3 server ------------------------------------------------------------------


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    return f"docs-{uuid.uuid4().hex[:12]}"


async def make_bucket(name: str) -> None:
    async with get_session().create_client("s3") as s3:
        await s3.create_bucket(Bucket=name)


async def put(bucket: str, key: str, data: bytes) -> None:
    async with get_session().create_client("s3") as s3:
        await s3.put_object(Bucket=bucket, Key=key, Body=data)


async def test_an_upload_lands_in_the_tenants_area_and_reads_back_verified(bucket: str) -> None:
    await make_bucket(bucket)
    store = S3Blobs([S3Store(bucket, "ragstream")], timeout_s=10)
    uri = await store.write(A_BYTES, A_SHA, tenant_id="a")
    key = f"ragstream/tenants/a/{A_SHA[:2]}/{A_SHA}"
    assert uri == f"s3://{bucket}/{key}" == store.uri_for("a", A_SHA)
    async with get_session().create_client("s3") as s3:
        listed = await s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == [key]
    assert await store.read(uri, A_SHA, tenant_id="a", size_bytes=len(A_BYTES)) == A_BYTES

    with pytest.raises(ClaimCheckRefused, match="outside tenant 'b''s own blob area"):
        await store.read(uri, A_SHA, tenant_id="b", size_bytes=len(A_BYTES))
    mine = f"ragstream/tenants/b/{A_SHA[:2]}/{A_SHA}"
    await put(bucket, mine, A_BYTES.replace(b"a's", b"b's"))  # the same size, other bytes
    with pytest.raises(ClaimCheckRefused, match=r"sha256 mismatch for .*the blob is not the bytes"):
        await store.read(f"s3://{bucket}/{mine}", A_SHA, tenant_id="b", size_bytes=len(A_BYTES))
    with pytest.raises(ClaimCheckRefused, match=r"is 3100 bytes, the event's size_bytes says 10"):
        await store.read(uri, A_SHA, tenant_id="a", size_bytes=10)


async def test_a_missing_object_or_bucket_is_permanent_and_no_refusal(bucket: str) -> None:
    await make_bucket(bucket)
    store = S3Blobs([S3Store(bucket, "ragstream"), S3Store(f"{bucket}-gone")], timeout_s=10)
    for uri, code in [
        (f"s3://{bucket}/ragstream/tenants/a/{A_SHA}", "NoSuchKey"),
        (f"s3://{bucket}-gone/tenants/a/{A_SHA}", "NoSuchBucket"),
    ]:
        with pytest.raises(PermanentError) as info:
            await store.read(uri, A_SHA, tenant_id="a", size_bytes=len(A_BYTES))
        assert not isinstance(info.value, ClaimCheckRefused)
        assert str(info.value).startswith(f"reading '{uri[:40]}"), str(info.value)
        assert f"': it does not exist ({code}: " in str(info.value)


# -- against a server that fails on purpose ----------------------------------------------------


AREA = "/docs/ragstream/tenants/b"
FAILURES: dict[str, tuple[Answer, type[Exception], str]] = {
    "slow-down": (s3_error("SlowDown", 503), RetryableError, "busy or failing (SlowDown: "),
    "internal": (s3_error("InternalError", 500), RetryableError, "(InternalError: "),
    "too-many": (s3_error("TooManyRequests", 429), RetryableError, "(TooManyRequests: "),
    "silent": (
        Answer(silent=True),
        RetryableError,
        "took longer than 1.5 s (blobs.read_timeout_s)",
    ),
    "denied": (s3_error("AccessDenied", 403), PermanentError, ": access denied (AccessDenied: "),
    "bad-request": (s3_error("InvalidRequest", 400), PermanentError, ": refused (InvalidRequest: "),
    # No length given, and a body that never ends: read no further than the event's size.
    "endless": (Answer(endless=True), ClaimCheckRefused, "is more than 300000 bytes, the event's"),
}


async def test_failures_are_retryable_or_permanent_by_what_they_are(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the client's own retries off: one try each
    store = S3Blobs([STORE], timeout_s=1.5)
    async with ScriptedServer() as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.port}")
        server.answers = {f"{AREA}/{name}": answer for name, (answer, _, _) in FAILURES.items()}
        for name, (_, kind, expected) in FAILURES.items():
            started = time.monotonic()
            with pytest.raises(kind) as info:
                await store.read(f"s3:/{AREA}/{name}", A_SHA, tenant_id="b", size_bytes=300_000)
            assert expected in str(info.value), (name, str(info.value))
            assert kind is not PermanentError or not isinstance(info.value, ClaimCheckRefused)
            assert time.monotonic() - started < 5, name

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nobody there
    with pytest.raises(RetryableError, match="EndpointConnectionError"):
        await store.read(f"s3:/{AREA}/x", A_SHA, tenant_id="b", size_bytes=100)
