"""https:// claim checks (ragstream.blobs.https): the allow-list and tenant rules, then reads
through httpx against a local TLS server (its CA trusted through SSL_CERT_FILE) that answers
as told."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ragstream.blobs import sha256_hex
from ragstream.blobs.https import HttpsBase, HttpsBlobs
from ragstream.errors import ClaimCheckRefused, ConfigError, PermanentError, RetryableError
from tests.remote_blobs import Answer, ScriptedServer

DATA = b"# Exported notes\n\nFetched from an allowed host.\n" * 40
SHA = sha256_hex(DATA)


def reader(*entries: str, timeout_s: float = 5.0) -> HttpsBlobs:
    found = HttpsBlobs.from_entries(entries or ("files.example.com/exports",), timeout_s=timeout_s)
    assert found is not None
    return found


def refusal(blobs: HttpsBlobs, uri: str, tenant: str = "b") -> str:
    with pytest.raises(ClaimCheckRefused) as info:
        blobs.locate(uri, tenant)
    return str(info.value)


# -- the rules (nothing is sent anywhere) -------------------------------------------------------


def test_an_allowed_host_is_a_base_url_or_a_bare_host() -> None:
    assert HttpsBase.parse("Files.Example.com") == HttpsBase("files.example.com")
    assert HttpsBase.parse("https://files.example.com:443/a/") == HttpsBase(
        "files.example.com", "/a"
    )
    assert HttpsBase.parse("files.example.com:8443/a") == HttpsBase("files.example.com:8443", "/a")
    for bad in ("http://files.example.com", "https://u:p@files.example.com", "https://x/a/../b"):
        with pytest.raises(ConfigError, match=r"^blobs.https_hosts: "):
            HttpsBase.parse(bad)
    assert HttpsBlobs.from_entries([], timeout_s=1) is None


def test_a_tenants_claim_checks_are_read_only_in_its_own_area_of_an_allowed_host() -> None:
    blobs = reader()
    blobs.locate("https://files.example.com/exports/tenants/b/notes.md", "b")
    blobs.locate("https://FILES.example.com:443/exports/tenants/b/2024/notes.md", "b")

    message = refusal(blobs, "https://files.example.com/exports/tenants/a/notes.md")
    assert "outside tenant 'b''s own blob area (https://files.example.com/exports/tenants/b/);" in (
        message
    )
    assert "outside" in refusal(blobs, "https://files.example.com/tenants/b/notes.md")
    assert "outside" in refusal(blobs, "https://files.example.com/exports/tenants/bb/x", "b")
    for host in ("https://other.example.com", "https://files.example.com:8443"):
        assert "is not one blobs.https_hosts allows" in refusal(
            blobs, f"{host}/exports/tenants/b/x"
        )
    assert "no user or password" in refusal(
        blobs, "https://files.example.com@evil.example/exports/tenants/b/x"
    )
    assert "not an https:// URI" in refusal(blobs, "http://files.example.com/exports/tenants/b/x")
    assert "query or fragment" in refusal(
        blobs, "https://files.example.com/exports/tenants/b/x?file=../../a"
    )
    for trick in (
        "b/../a/x",
        "b/%2e%2e/a/x",
        "b/%2E%2E/a/x",
        "b//x",
        "b/x%2f..%2f..%2fa",
        "b/a%5cb",
    ):
        assert "no empty, '.' or '..' parts" in refusal(
            blobs, f"https://files.example.com/exports/tenants/{trick}"
        ), trick


# -- reading from a local TLS server ----------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer(tls_dir=tmp_path / "tls") as running:
        monkeypatch.setenv("SSL_CERT_FILE", str(running.ca_file))
        yield running


def at(server: ScriptedServer, name: str) -> str:
    return f"https://localhost:{server.port}/exports/tenants/b/{name}"


async def test_an_allowed_claim_check_is_read_and_verified(server: ScriptedServer) -> None:
    blobs = reader(f"https://localhost:{server.port}/exports")
    server.answers = {"/exports/tenants/b/notes.md": Answer(body=DATA)}
    got = await blobs.read(at(server, "notes.md"), SHA, tenant_id="b", size_bytes=len(DATA))
    assert got == DATA
    with pytest.raises(ClaimCheckRefused, match="sha256 mismatch"):
        await blobs.read(at(server, "notes.md"), "0" * 64, tenant_id="b", size_bytes=len(DATA))
    with pytest.raises(ClaimCheckRefused, match=f"is {len(DATA)} bytes, the event's size_bytes"):
        await blobs.read(at(server, "notes.md"), SHA, tenant_id="b", size_bytes=100)
    assert server.requests == ["GET /exports/tenants/b/notes.md"] * 3
    with pytest.raises(ClaimCheckRefused, match="outside tenant 'a'"):
        await blobs.read(at(server, "notes.md"), SHA, tenant_id="a", size_bytes=len(DATA))
    assert len(server.requests) == 3, "a refused claim check is not fetched"


async def test_failures_are_retryable_or_permanent_by_what_they_are(
    server: ScriptedServer,
) -> None:
    blobs = reader(f"localhost:{server.port}/exports", timeout_s=1.5)
    server.answers = {
        f"/exports/tenants/b/{name}": answer
        for name, answer in {
            "busy": Answer(503, {"Retry-After": "7"}),
            "throttled": Answer(429),
            "gone": Answer(404),
            "denied": Answer(403),
            "moved": Answer(302, {"Location": "https://elsewhere.example/tenants/a/x"}),
            "silent": Answer(silent=True),
            "endless": Answer(endless=True),
            "big": Answer(body=b"x" * 5000),
        }.items()
    }
    cases: list[tuple[str, type[Exception], str]] = [
        ("busy", RetryableError, "HTTP 503, the server is busy or failing"),
        ("throttled", RetryableError, "HTTP 429, the server is busy or failing"),
        ("silent", RetryableError, "took longer than 1.5 s (blobs.read_timeout_s)"),
        ("gone", PermanentError, "HTTP 404: it does not exist"),
        ("denied", PermanentError, "HTTP 403: access denied"),
        ("moved", PermanentError, "HTTP 302: redirects are not followed"),
        ("endless", ClaimCheckRefused, "is more than 300000 bytes, the event's size_bytes"),
        ("big", ClaimCheckRefused, "is 5000 bytes, the event's size_bytes says 1000"),
    ]
    for name, kind, expected in cases:
        started = time.monotonic()
        size = 300_000 if name == "endless" else 1000
        with pytest.raises(kind) as info:
            await blobs.read(at(server, name), SHA, tenant_id="b", size_bytes=size)
        assert expected in str(info.value), (name, str(info.value))
        assert time.monotonic() - started < 5, name
        if name == "busy":
            assert isinstance(info.value, RetryableError) and info.value.retry_after == 7
    assert not any("elsewhere" in r for r in server.requests), "the redirect was not followed"


async def test_a_certificate_no_trusted_ca_signed_is_not_read(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    blobs = reader(f"https://localhost:{server.port}/exports")
    server.answers = {"/exports/tenants/b/notes.md": Answer(body=DATA)}
    with pytest.raises(RetryableError, match="ConnectError"):
        await blobs.read(at(server, "notes.md"), SHA, tenant_id="b", size_bytes=len(DATA))
    assert server.requests == []
