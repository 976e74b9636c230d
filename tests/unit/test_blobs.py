"""Claim checks belong to a tenant (ragstream.blobs): each path trick is refused by its rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ragstream.blobs import TENANTS_DIR, BlobStore, sha256_hex
from ragstream.errors import ClaimCheckRefused, ConfigError, InvalidEvent, PermanentError

A_BYTES = b"tenant a's confidential report\n" * 100
B_BYTES = b"tenant b's own notes\n" * 100
A_SHA = sha256_hex(A_BYTES)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def refusal(store: BlobStore, uri: str, tenant: str = "b", sha: str = A_SHA) -> str:
    with pytest.raises(ClaimCheckRefused) as info:
        store.get(uri, sha, tenant_id=tenant)
    return str(info.value)


def test_blobs_are_stored_in_the_tenants_own_area_and_read_back(
    store: BlobStore, tmp_path: Path
) -> None:
    uri = store.put(A_BYTES, tenant_id="a")
    path = tmp_path / "blobs" / TENANTS_DIR / "a" / A_SHA[:2] / A_SHA
    assert uri == path.resolve().as_uri() == store.uri_for("a", A_SHA)
    assert store.get(uri, A_SHA, tenant_id="a", size_bytes=len(A_BYTES)) == A_BYTES
    localhost = uri.replace("file://", "file://localhost", 1)
    assert store.get(localhost, A_SHA, tenant_id="a") == A_BYTES
    # The same bytes for another tenant: a file of its own.
    assert store.put(A_BYTES, tenant_id="b") != uri


def test_another_tenants_claim_check_is_refused(store: BlobStore) -> None:
    uri = store.put(A_BYTES, tenant_id="a")
    message = refusal(store, uri)
    assert "outside tenant 'b''s own blob area" in message
    assert "read only there" in message


def test_the_old_shared_layout_and_paths_outside_are_refused(
    store: BlobStore, tmp_path: Path
) -> None:
    old = tmp_path / "blobs" / A_SHA[:2] / A_SHA  # the layout before claim checks had tenants
    old.parent.mkdir(parents=True)
    old.write_bytes(A_BYTES)
    assert "outside tenant 'a''s own blob area" in refusal(store, old.as_uri(), tenant="a")
    assert "outside" in refusal(store, "file:///etc/passwd", tenant="a")


@pytest.mark.parametrize(
    "trick",
    [
        "/tenants/b/../a/{aa}/{sha}",
        "/tenants/b/%2e%2e/a/{aa}/{sha}",
        "/tenants/b%2F..%2Fa/{aa}/{sha}",
        "/tenants/b/./../a/{aa}/{sha}",
    ],
)
def test_dot_dot_is_refused_however_it_is_spelt(store: BlobStore, trick: str) -> None:
    store.put(A_BYTES, tenant_id="a")
    uri = "file://" + str(store.root) + trick.format(aa=A_SHA[:2], sha=A_SHA)
    assert "without '.' or '..' parts" in refusal(store, uri)


def test_percent_encoding_is_decoded_once(store: BlobStore) -> None:
    store.put(A_BYTES, tenant_id="a")
    # %252e decodes to the name '%2e', a directory in b's area: not a way out.
    uri = f"file://{store.root}/tenants/b/%252e%252e/a/{A_SHA[:2]}/{A_SHA}"
    with pytest.raises(PermanentError, match="does not exist"):
        store.get(uri, A_SHA, tenant_id="b")


def test_a_host_a_query_or_another_scheme_is_refused(store: BlobStore) -> None:
    uri = store.put(A_BYTES, tenant_id="b")
    path = uri.removeprefix("file://")
    assert "names no host" in refusal(store, f"file://fileserver{path}")
    assert "query or fragment" in refusal(store, f"{uri}?x=1")
    assert "scheme 's3' is not supported" in refusal(store, f"s3://bucket{path}")
    assert "must be absolute" in refusal(store, f"file:tenants/b/{A_SHA}")


def test_a_symbolic_link_out_of_the_area_is_refused(store: BlobStore) -> None:
    a_uri = store.put(A_BYTES, tenant_id="a")
    a_path = Path(a_uri.removeprefix("file://"))
    b_area = store.root / TENANTS_DIR / "b"
    b_area.mkdir(parents=True)
    (b_area / "report").symlink_to(a_path)
    message = refusal(store, (b_area / "report").as_uri())
    assert "leads outside tenant 'b''s own blob area through a symbolic link" in message
    # A directory of b's that links to a's area.
    (b_area / "shared").symlink_to(a_path.parent)
    assert "symbolic link" in refusal(store, (b_area / "shared" / A_SHA).as_uri())
    # b's whole area replaced by a link to a's.
    b_area.rename(store.root / "b-old")
    b_area.symlink_to(a_path.parent.parent)
    assert "symbolic link" in refusal(store, f"file://{b_area}/{A_SHA[:2]}/{A_SHA}")


def test_a_link_inside_the_tenants_own_area_is_followed(store: BlobStore) -> None:
    uri = store.put(B_BYTES, tenant_id="b")
    path = Path(uri.removeprefix("file://"))
    alias = path.parent / "alias"
    alias.symlink_to(path)
    assert store.get(alias.as_uri(), sha256_hex(B_BYTES), tenant_id="b") == B_BYTES


@pytest.mark.parametrize("tenant", ["a/../b", "..", "b/x", ""])
def test_a_tenant_id_cannot_name_a_path(store: BlobStore, tenant: str) -> None:
    uri = store.put(A_BYTES, tenant_id="a")
    with pytest.raises(InvalidEvent, match="invalid tenant_id"):
        store.get(uri, A_SHA, tenant_id=tenant)
    with pytest.raises(InvalidEvent, match="invalid tenant_id"):
        store.put(A_BYTES, tenant_id=tenant)


def test_the_bytes_must_be_the_events(store: BlobStore) -> None:
    uri = store.put(B_BYTES, tenant_id="b")
    assert "sha256 mismatch" in refusal(store, uri, sha="0" * 64)
    with pytest.raises(ClaimCheckRefused, match="size_bytes says 5"):
        store.get(uri, sha256_hex(B_BYTES), tenant_id="b", size_bytes=5)


def test_only_a_regular_file_is_read(store: BlobStore) -> None:
    area = store.root / TENANTS_DIR / "b"
    area.mkdir(parents=True)
    fifo = area / "pipe"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    assert "not a regular file" in refusal(store, fifo.as_uri())
    assert "not a regular file" in refusal(store, area.as_uri())


def test_allowed_roots_are_laid_out_by_tenant(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    store = BlobStore(tmp_path / "blobs", allowed_roots=[shared])
    mine = shared / TENANTS_DIR / "b" / "export.txt"
    theirs = shared / TENANTS_DIR / "a" / "export.txt"
    loose = shared / "export.txt"
    for path in (mine, theirs, loose):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(B_BYTES)
    sha = sha256_hex(B_BYTES)
    assert store.get(mine.as_uri(), sha, tenant_id="b") == B_BYTES
    assert "outside tenant 'b''s own blob area" in refusal(store, theirs.as_uri(), sha=sha)
    assert "outside tenant 'b''s own blob area" in refusal(store, loose.as_uri(), sha=sha)


def test_a_tenant_root_is_that_tenants_alone(tmp_path: Path) -> None:
    exports = tmp_path / "b-exports"
    exports.mkdir()
    (exports / "q1.txt").write_bytes(B_BYTES)
    store = BlobStore(tmp_path / "blobs", tenant_roots={"b": [exports]})
    sha = sha256_hex(B_BYTES)
    uri = (exports / "q1.txt").as_uri()
    assert store.get(uri, sha, tenant_id="b") == B_BYTES
    assert "outside tenant 'a''s own blob area" in refusal(store, uri, tenant="a", sha=sha)

    with pytest.raises(ConfigError, match="overlaps"):
        BlobStore(tmp_path / "blobs", tenant_roots={"b": [tmp_path]})
    with pytest.raises(ConfigError, match="overlaps"):
        BlobStore(tmp_path / "blobs", tenant_roots={"a": [exports], "b": [exports / "sub"]})
    with pytest.raises(ConfigError, match=r"blobs.tenant_roots: invalid tenant_id"):
        BlobStore(tmp_path / "blobs", tenant_roots={"../a": [exports]})
