"""The rules an upload event must keep at the door (ragstream.validation)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from ragstream.errors import InvalidEvent, PermanentError
from ragstream.events import DocumentUploaded
from ragstream.validation import check_key, check_upload

MAX = 1000
DATA = b"# Notes\n\nSome words.\n"


def upload(**changes: Any) -> DocumentUploaded:
    good = DocumentUploaded(
        document_id="0b5e0f6c-3d0e-4c55-9a8f-0a7c1d1f2e3a",
        tenant_id="acme",
        correlation_id="corr-1",
        filename="notes.md",
        content_type="text/markdown",
        size_bytes=len(DATA),
        sha256=hashlib.sha256(DATA).hexdigest(),
        content=DATA,
        metadata={"source": "wiki"},
        source_system="crm",
    )
    return dataclasses.replace(good, **changes)


def refused(event: DocumentUploaded) -> str:
    with pytest.raises(InvalidEvent) as info:
        check_upload(event, max_size_bytes=MAX)
    assert isinstance(info.value, PermanentError)  # dead-lettered at once
    return str(info.value)


def test_a_well_formed_upload_passes() -> None:
    check_upload(upload(), max_size_bytes=MAX)
    check_upload(upload(content_type="Text/HTML; charset=utf-8"), max_size_bytes=MAX)
    check_upload(upload(content_type="application/octet-stream"), max_size_bytes=MAX)
    check_upload(
        upload(content=None, source_uri="file:///blobs/tenants/acme/ab/abab"),
        max_size_bytes=MAX,
    )
    check_upload(upload(tenant_id="Acme.EU_2-x", document_id="crm:invoice.42"), max_size_bytes=MAX)


def test_the_record_key_must_be_the_document_id() -> None:
    check_key(b"doc-1", "doc-1")
    with pytest.raises(InvalidEvent, match=r"invalid record key: 'doc-2' is not the document_id"):
        check_key(b"doc-2", "doc-1")
    with pytest.raises(InvalidEvent, match="invalid record key: missing"):
        check_key(None, "doc-1")
    with pytest.raises(InvalidEvent, match="invalid record key"):
        check_key(b"\xff\xfe", "doc-1")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"filename": "notes\x00.md"}, "filename"),
        ({"tenant_id": "ac\x00me"}, "tenant_id"),
        ({"document_id": "doc\x00"}, "document_id"),
        ({"correlation_id": "c\x00"}, "correlation_id"),
        ({"content_type": "text/plain\x00"}, "content_type"),
        ({"metadata": {"k": "v\x00"}}, "metadata['k']"),
        ({"metadata": {"k\x00": "v"}}, "metadata key"),
        ({"source_system": "\x00"}, "source_system"),
        ({"content": None, "source_uri": "file:///blobs/x\x00"}, "source_uri"),
    ],
)
def test_a_nul_byte_is_named_with_its_field(changes: dict[str, Any], field: str) -> None:
    message = refused(upload(**changes))
    assert message.startswith(f"invalid {field}: contains a NUL byte"), message


@pytest.mark.parametrize(
    ("changes", "field", "limit"),
    [
        ({"document_id": "d" * 129}, "document_id", "1 to 128"),
        ({"tenant_id": "t" * 65}, "tenant_id", "1 to 64"),
        ({"correlation_id": "c" * 129}, "correlation_id", "1 to 128"),
        ({"filename": "f" * 252 + ".txt"}, "filename", "1 to 255"),
        ({"filename": ""}, "filename", "1 to 255"),
        ({"metadata": {"k": "v" * 4097}}, "metadata['k']", "0 to 4096"),
        ({"metadata": {"k" * 129: "v"}}, "metadata key", "1 to 128"),
        ({"source_system": "s" * 129}, "source_system", "1 to 128"),
        ({"content": None, "source_uri": "file:///" + "x" * 2048}, "source_uri", "1 to 2048"),
    ],
)
def test_an_oversized_field_is_named_with_its_limit(
    changes: dict[str, Any], field: str, limit: str
) -> None:
    message = refused(upload(**changes))
    assert message.startswith(f"invalid {field}: "), message
    assert f"must be {limit}" in message


@pytest.mark.parametrize(
    "tenant", ["a/b", "..", "../acme", ".hidden", "-x", "", "acme ", "ac\\me", "ümlaut"]
)
def test_a_tenant_id_is_one_safe_path_component(tenant: str) -> None:
    assert refused(upload(tenant_id=tenant)).startswith("invalid tenant_id: ")


@pytest.mark.parametrize("document_id", ["a/b", "..", "doc id", "doc\n", "/etc"])
def test_a_document_id_has_a_safe_charset(document_id: str) -> None:
    assert refused(upload(document_id=document_id)).startswith("invalid document_id: ")


def test_control_characters_are_refused_where_a_name_is_expected() -> None:
    assert "control character" in refused(upload(filename="a\nb.md"))
    # ...but a metadata value is free text.
    check_upload(upload(metadata={"note": "line one\nline two"}), max_size_bytes=MAX)


def test_too_many_metadata_entries() -> None:
    message = refused(upload(metadata={f"k{i}": "v" for i in range(65)}))
    assert message == "invalid metadata: 65 entries, at most 64"


@pytest.mark.parametrize(
    ("changes", "start"),
    [
        ({"content_type": "image/png"}, "invalid content_type: 'image/png' is not one of"),
        ({"size_bytes": 0, "content": b""}, "invalid size_bytes: 0, must be 1 to 1000"),
        ({"size_bytes": MAX + 1, "content": b"x" * (MAX + 1)}, "invalid size_bytes: 1001"),
        ({"size_bytes": len(DATA) + 1}, "invalid content: 21 bytes, but size_bytes says 22"),
        ({"sha256": "AB" * 32}, "invalid sha256"),
        ({"sha256": "ab"}, "invalid sha256"),
        ({"source_uri": "file:///x"}, "invalid content and source_uri: exactly one"),
        ({"content": None}, "invalid content and source_uri: exactly one"),
    ],
)
def test_types_sizes_and_the_bytes_are_consistent(changes: dict[str, Any], start: str) -> None:
    message = refused(upload(**changes))
    assert message.startswith(start), message
