"""The parse stage: DocumentUploaded → DocumentParsed. Knows nothing of Kafka.

It is the door: uploads come from other systems, so before anything is read or written the
record is checked against `ragstream.validation` (its key is its document id, every field
within its rules) and its claim check against the tenant's own blob areas (`ragstream.blobs`:
`file://`, and `s3://` or `https://` where configured).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from consumers.stage import Outcome, RecordContext, StatusStore
from ragstream.blobs import ClaimCheckReader, ClaimChecks, sha256_hex
from ragstream.errors import PermanentError
from ragstream.events import DocumentParsed, DocumentUploaded
from ragstream.providers.parse.port import Parser
from ragstream.settings import Settings
from ragstream.store.models import ParsedContent, StatusChange, Upload, UploadDecision
from ragstream.validation import check_key, check_upload


class ParseStore(StatusStore, Protocol):
    """What the parse stage needs of the store."""

    def register_upload(self, upload: Upload) -> Awaitable[UploadDecision]: ...

    def save_parse(self, parsed: ParsedContent) -> Awaitable[bool]: ...


@dataclass(frozen=True)
class ParseDeps:
    store: ParseStore
    parser: Parser
    claims: ClaimCheckReader
    max_upload_bytes: int  # blobs.max_upload_bytes: the largest size_bytes let in

    @classmethod
    def from_settings(cls, settings: Settings, store: ParseStore, parser: Parser) -> ParseDeps:
        return cls(
            store, parser, ClaimChecks.from_settings(settings), settings.blobs.max_upload_bytes
        )


async def read_source(uploaded: DocumentUploaded, claims: ClaimCheckReader) -> bytes:
    """The document's bytes, inline or from the claim check (read only inside the tenant's own
    blob areas), verified against its sha256."""
    if uploaded.content is not None:
        data = uploaded.content
        if sha256_hex(data) != uploaded.sha256:
            raise PermanentError("inline content does not match its sha256")
        return data
    if not uploaded.source_uri:
        raise PermanentError("upload carries neither inline content nor a source_uri")
    return await claims.read(
        uploaded.source_uri,
        uploaded.sha256,
        tenant_id=uploaded.tenant_id,
        size_bytes=uploaded.size_bytes,
    )


async def parse(uploaded: DocumentUploaded, deps: ParseDeps, ctx: RecordContext) -> Outcome:
    """Check the record at the door; register the upload; parse it unless it duplicates one
    already in the tenant's store."""
    check_key(ctx.key, uploaded.document_id)
    check_upload(uploaded, max_size_bytes=deps.max_upload_bytes)
    if uploaded.source_uri is not None:
        # Where it points is checked before any write; the bytes are read after registration.
        await deps.claims.check(uploaded.source_uri, uploaded.tenant_id)
    decision = await deps.store.register_upload(
        Upload(
            document_id=uploaded.document_id,
            tenant_id=uploaded.tenant_id,
            filename=uploaded.filename,
            content_type=uploaded.content_type,
            size_bytes=uploaded.size_bytes,
            sha256=uploaded.sha256,
            source_uri=uploaded.source_uri,
            metadata=dict(uploaded.metadata),
            correlation_id=uploaded.correlation_id,
            uploaded_at=uploaded.occurred_at,
            force=uploaded.force,
        )
    )
    if not decision.proceed:
        return Outcome(None, "duplicate", {"duplicate_of": decision.duplicate_of})
    data = await read_source(uploaded, deps.claims)
    result = await deps.parser.parse(
        data, filename=uploaded.filename, content_type=uploaded.content_type
    )
    content_sha = sha256_hex(result.markdown.encode())
    await deps.store.save_parse(
        ParsedContent(
            document_id=uploaded.document_id,
            tenant_id=uploaded.tenant_id,
            content_sha256=content_sha,
            parser=result.parser,
            parser_version=result.parser_version,
            markdown=result.markdown,
            page_count=result.page_count,
            title=result.title,
        )
    )
    await deps.store.advance_status(
        StatusChange(
            uploaded.document_id,
            "parsed",
            tenant_id=uploaded.tenant_id,
            page_count=result.page_count,
            current_parse_sha256=content_sha,
        )
    )
    parsed = DocumentParsed(
        document_id=uploaded.document_id,
        tenant_id=uploaded.tenant_id,
        correlation_id=uploaded.correlation_id,
        uploaded_at=uploaded.occurred_at,
        parser=result.parser,
        parser_version=result.parser_version,
        source_sha256=uploaded.sha256,
        content_sha256=content_sha,
        page_count=result.page_count,
        char_count=len(result.markdown),
        title=result.title,
    )
    return Outcome(
        parsed,
        detail={"pages": result.page_count, "chars": len(result.markdown), "parser": result.parser},
    )
