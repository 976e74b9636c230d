"""The chunk stage (`consumers.chunk.chunk`) with no broker and no database: what it cuts and
writes, redelivery, stale input after a re-parse, tenants and missing input."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ragstream.blobs import sha256_hex
from ragstream.errors import PermanentError, TenantConflict
from ragstream.events import DocumentChunked, DocumentParsed
from ragstream.store import ParsedContent, StatusChange
from tests.stages import TENANT, Stages, uploaded


async def reparse(stages: Stages, parsed: DocumentParsed, markdown: str) -> DocumentParsed:
    """The document parsed again to other content (a replay through another parser): the
    store points at the new parse; the event of it."""
    sha = sha256_hex(markdown.encode())
    store = stages.store
    await store.save_parse(
        ParsedContent(parsed.document_id, TENANT, sha, "llamaparse", "9", markdown, 1, None)
    )
    change = StatusChange(
        parsed.document_id, "parsed", tenant_id=TENANT, current_parse_sha256=sha, page_count=1
    )
    assert await store.advance_status(change)
    return replace(parsed, content_sha256=sha, char_count=len(markdown), parser="llamaparse")


async def test_a_parsed_document_is_cut_stored_and_moved_to_chunked(stages: Stages) -> None:
    parsed = await stages.parsed(uploaded("doc-1"))
    outcome = await stages.chunk(parsed)

    event = outcome.output
    assert isinstance(event, DocumentChunked)
    version = stages.chunker.version
    chunks = await stages.store.load_chunks("doc-1", version)
    assert len(chunks) > 1, "the guide is cut into several chunks"
    assert (event.chunk_count, event.chunker_version, event.content_sha256) == (
        len(chunks),
        version,
        parsed.content_sha256,
    )
    assert event.token_count == sum(c.token_count for c in chunks)
    assert (event.correlation_id, event.uploaded_at) == (parsed.correlation_id, parsed.uploaded_at)
    assert all(c.text_sha256 == sha256_hex(c.text.encode()) for c in chunks)
    assert any(c.heading_path[-1:] == ["Dead letters"] for c in chunks)
    assert outcome.detail == {
        "chunks": len(chunks),
        "tokens": event.token_count,
        "chunker_version": version,
    }
    doc = stages.store.documents["doc-1"]
    assert (doc.status, doc.chunk_count, doc.current_chunker_version) == (
        "chunked",
        len(chunks),
        version,
    )


async def test_a_redelivered_event_writes_nothing_new(stages: Stages) -> None:
    parsed = await stages.parsed(uploaded("doc-1"))
    first = await stages.chunk(parsed)
    chunks = {k: dict(v) for k, v in stages.store.chunks.items()}
    again = await stages.chunk(parsed)
    assert isinstance(first.output, DocumentChunked) and isinstance(again.output, DocumentChunked)
    # The same event but for its own id and time.
    assert again.output == replace(
        first.output, event_id=again.output.event_id, occurred_at=again.output.occurred_at
    )
    assert stages.store.chunks == chunks
    assert stages.store.documents["doc-1"].status == "chunked"


async def test_an_event_of_a_parse_the_document_has_left_is_skipped(stages: Stages) -> None:
    old = await stages.parsed(uploaded("doc-1"))
    await reparse(stages, old, "# Re-parsed\n\nOther words entirely.")

    outcome = await stages.chunk(old)  # a replay of the old event, late
    assert (outcome.output, outcome.status) == (None, "skipped")
    assert outcome.detail == {
        "stale": "parse",
        "input": old.content_sha256,
        "current": stages.store.documents["doc-1"].current_parse_sha256,
    }
    assert stages.store.chunks == {}
    assert stages.store.documents["doc-1"].status == "parsed"


async def test_a_new_parse_replaces_the_chunk_set_of_the_same_chunker_version(
    stages: Stages,
) -> None:
    old = await stages.parsed(uploaded("doc-1"))
    await stages.chunk(old)
    new = await reparse(stages, old, "# Re-parsed\n\nOther words entirely.")

    outcome = await stages.chunk(new)
    assert isinstance(outcome.output, DocumentChunked)
    chunks = await stages.store.load_chunks("doc-1", stages.chunker.version)
    assert [c.text for c in chunks] == ["# Re-parsed\n\nOther words entirely."]
    doc = stages.store.documents["doc-1"]
    assert (doc.status, doc.chunk_count, doc.current_parse_sha256) == (
        "chunked",
        1,
        new.content_sha256,
    )


async def test_an_event_naming_another_tenants_document_is_refused_before_any_work(
    stages: Stages,
) -> None:
    parsed = await stages.parsed(uploaded("doc-1"))
    with pytest.raises(TenantConflict):
        await stages.chunk(replace(parsed, tenant_id="globex"))
    assert stages.store.chunks == {}


async def test_a_parse_result_missing_from_the_store_is_permanent(stages: Stages) -> None:
    parsed = await stages.parsed(uploaded("doc-1"))
    unknown = replace(parsed, document_id="doc-404")
    with pytest.raises(PermanentError, match="is not in the store"):
        await stages.chunk(unknown)


async def test_a_parse_with_no_text_is_permanent(stages: Stages) -> None:
    parsed = await stages.parsed(uploaded("doc-1"))
    empty = await reparse(stages, parsed, "   \n\n")
    with pytest.raises(PermanentError, match="no text to chunk"):
        await stages.chunk(empty)
    assert stages.store.chunks == {}
