"""The rules an upload event must keep, checked at the door.

Other systems publish `DocumentUploaded` records straight to the uploaded topic, so every field
is input from outside. The parse stage checks a record against these rules before it reads or
writes anything, and `producers.upload` checks the same rules before it publishes. A broken
rule is an `InvalidEvent` (dead-lettered at once) whose message names the field:

    field               rule
    record key          the document_id, as UTF-8
    document_id         1-128 characters of A-Z a-z 0-9 . _ : -, starting with a letter or digit
    tenant_id           1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit
                        (it names a directory of the blob store: no '/', no '..')
    correlation_id      1-128 characters, no control characters
    filename            1-255 characters, no control characters
    content_type        a type the parsers read (PDF, Markdown, HTML, plain text; parameters
                        such as charset allowed) or application/octet-stream, at most 255
    size_bytes          1 to blobs.max_upload_bytes
    sha256              64 lower-case hex digits
    content, source_uri exactly one of them; inline content is size_bytes long; a source_uri
                        is at most 2048 characters, no control characters
    metadata            at most 64 entries; keys 1-128 characters, no control characters;
                        values at most 4096 characters, no NUL
    source_system       at most 128 characters, no control characters

Every string is checked for NUL bytes first, so the message says so (PostgreSQL refuses them
in text, with a message that names no field).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from ragstream.content_types import SUPPORTED_CONTENT_TYPES, normalize_content_type
from ragstream.errors import InvalidEvent
from ragstream.events import DocumentUploaded

DOCUMENT_ID_MAX: Final = 128
TENANT_ID_MAX: Final = 64
CORRELATION_ID_MAX: Final = 128
FILENAME_MAX: Final = 255
CONTENT_TYPE_MAX: Final = 255
SOURCE_URI_MAX: Final = 2048
SOURCE_SYSTEM_MAX: Final = 128
METADATA_ENTRIES_MAX: Final = 64
METADATA_KEY_MAX: Final = 128
METADATA_VALUE_MAX: Final = 4096

DOCUMENT_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
TENANT_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The parsers sniff the bytes of a document sent as octet-stream.
CONTENT_TYPES: Final = SUPPORTED_CONTENT_TYPES | {"application/octet-stream"}


def shown(value: str, limit: int = 80) -> str:
    """A hostile value fit for a message: quoted, control characters escaped, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_no_nul(**fields: str | None) -> None:
    """No NUL byte in any of these fields (PostgreSQL's text and jsonb cannot hold one)."""
    for field, value in fields.items():
        nul = -1 if value is None else value.find("\x00")
        if nul >= 0:
            raise InvalidEvent(f"invalid {field}: contains a NUL byte (at character {nul})")


def check_text(
    field: str,
    value: str,
    max_chars: int,
    *,
    pattern: re.Pattern[str] | None = None,
    controls: bool = False,
    min_chars: int = 1,
) -> None:
    """One string field: no NUL byte, `min_chars` to `max_chars` characters, no control
    characters (unless `controls`), and all of it matching `pattern` when given."""
    check_no_nul(**{field: value})
    if not min_chars <= len(value) <= max_chars:
        raise InvalidEvent(
            f"invalid {field}: {len(value)} characters, must be {min_chars} to {max_chars}"
        )
    if not controls and _CONTROL_RE.search(value):
        raise InvalidEvent(f"invalid {field}: contains a control character: {shown(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidEvent(f"invalid {field}: {shown(value)} has characters it may not have")


def check_tenant_id(tenant_id: str) -> None:
    check_text("tenant_id", tenant_id, TENANT_ID_MAX, pattern=TENANT_ID_RE)


def check_document_id(document_id: str) -> None:
    check_text("document_id", document_id, DOCUMENT_ID_MAX, pattern=DOCUMENT_ID_RE)


def check_key(key: bytes | None, document_id: str) -> None:
    """The record key is the document_id (so one document's records share a partition)."""
    if key is None:
        raise InvalidEvent("invalid record key: missing; it must be the document_id")
    if key != document_id.encode():
        got = shown(key.decode("utf-8", errors="replace"))
        raise InvalidEvent(f"invalid record key: {got} is not the document_id {shown(document_id)}")


def _check_metadata(metadata: Mapping[str, str]) -> None:
    if len(metadata) > METADATA_ENTRIES_MAX:
        raise InvalidEvent(
            f"invalid metadata: {len(metadata)} entries, at most {METADATA_ENTRIES_MAX}"
        )
    for key, value in metadata.items():
        check_text("metadata key", key, METADATA_KEY_MAX)
        check_text(
            f"metadata[{shown(key, 40)}]", value, METADATA_VALUE_MAX, controls=True, min_chars=0
        )


def _check_bytes(event: DocumentUploaded, max_size_bytes: int) -> None:
    if not 1 <= event.size_bytes <= max_size_bytes:
        raise InvalidEvent(
            f"invalid size_bytes: {event.size_bytes}, must be 1 to {max_size_bytes} "
            "(blobs.max_upload_bytes)"
        )
    if not SHA256_RE.fullmatch(event.sha256):
        raise InvalidEvent(f"invalid sha256: {shown(event.sha256)} is not 64 lower-case hex digits")
    if (event.content is None) == (event.source_uri is None):
        raise InvalidEvent(
            "invalid content and source_uri: exactly one of them must be given "
            f"(content {'given' if event.content is not None else 'missing'}, "
            f"source_uri {'given' if event.source_uri is not None else 'missing'})"
        )
    if event.content is not None and len(event.content) != event.size_bytes:
        raise InvalidEvent(
            f"invalid content: {len(event.content)} bytes, but size_bytes says {event.size_bytes}"
        )
    if event.source_uri is not None:
        check_text("source_uri", event.source_uri, SOURCE_URI_MAX)


def check_upload(event: DocumentUploaded, *, max_size_bytes: int) -> None:
    """Every field of an upload event against the rules above; InvalidEvent names the first
    field that breaks one. `max_size_bytes` is `blobs.max_upload_bytes`."""
    check_document_id(event.document_id)
    check_tenant_id(event.tenant_id)
    check_text("correlation_id", event.correlation_id, CORRELATION_ID_MAX)
    check_text("filename", event.filename, FILENAME_MAX)
    check_text("content_type", event.content_type, CONTENT_TYPE_MAX)
    if normalize_content_type(event.content_type) not in CONTENT_TYPES:
        raise InvalidEvent(
            f"invalid content_type: {shown(event.content_type)} is not one of "
            f"{', '.join(sorted(CONTENT_TYPES))}"
        )
    _check_bytes(event, max_size_bytes)
    _check_metadata(event.metadata)
    if event.source_system is not None:
        check_text("source_system", event.source_system, SOURCE_SYSTEM_MAX)


__all__ = [
    "CONTENT_TYPES",
    "DOCUMENT_ID_MAX",
    "TENANT_ID_MAX",
    "TENANT_ID_RE",
    "check_document_id",
    "check_key",
    "check_no_nul",
    "check_tenant_id",
    "check_text",
    "check_upload",
    "shown",
]
