"""The chunk stage: DocumentParsed → DocumentChunked. Knows nothing of Kafka."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from consumers.stage import Outcome, StatusStore, stale_input
from ragstream.blobs import sha256_hex
from ragstream.chunking import Chunker
from ragstream.errors import PermanentError
from ragstream.events import DocumentChunked, DocumentParsed
from ragstream.store.models import ChunkRow, ChunkSet, ParseResult, StatusChange


class ChunkStore(StatusStore, Protocol):
    """What the chunk stage needs of the store."""

    def load_parse(
        self, document_id: str, content_sha256: str
    ) -> Awaitable[ParseResult | None]: ...

    def save_chunks(self, chunk_set: ChunkSet) -> Awaitable[int]: ...


@dataclass(frozen=True)
class ChunkDeps:
    store: ChunkStore
    chunker: Chunker


async def chunk(parsed: DocumentParsed, deps: ChunkDeps) -> Outcome:
    skipped = await stale_input(
        deps.store,
        parsed.document_id,
        parse_sha256=parsed.content_sha256,
        tenant_id=parsed.tenant_id,
    )
    if skipped is not None:
        return skipped
    loaded = await deps.store.load_parse(parsed.document_id, parsed.content_sha256)
    if loaded is None:
        raise PermanentError(
            f"parse result {parsed.content_sha256[:12]} of document {parsed.document_id} is not in the store"
        )
    markdown = loaded.markdown
    chunks = await deps.chunker.achunk(markdown)  # in a child process, under chunk.* limits
    if not chunks:
        raise PermanentError("the parsed document has no text to chunk")
    version = deps.chunker.version
    rows = [
        ChunkRow(
            index=c.index,
            text=c.text,
            text_sha256=sha256_hex(c.text.encode()),
            heading_path=list(c.heading_path),
            token_count=c.token_count,
            char_start=c.char_start,
            char_end=c.char_end,
            page=c.page,
        )
        for c in chunks
    ]
    await deps.store.save_chunks(
        ChunkSet(
            document_id=parsed.document_id,
            tenant_id=parsed.tenant_id,
            chunker_version=version,
            chunker_settings={
                "max_tokens": deps.chunker.max_tokens,
                "overlap_tokens": deps.chunker.overlap_tokens,
                "tokenizer": deps.chunker.tokenizer.name,
            },
            chunks=rows,
            parse_sha256=parsed.content_sha256,
        )
    )
    tokens = sum(c.token_count for c in chunks)
    await deps.store.advance_status(
        StatusChange(
            parsed.document_id,
            "chunked",
            tenant_id=parsed.tenant_id,
            chunk_count=len(chunks),
            current_chunker_version=version,
            current_parse_sha256=parsed.content_sha256,
        )
    )
    event = DocumentChunked(
        document_id=parsed.document_id,
        tenant_id=parsed.tenant_id,
        correlation_id=parsed.correlation_id,
        uploaded_at=parsed.uploaded_at,
        chunker_version=version,
        content_sha256=parsed.content_sha256,
        chunk_count=len(chunks),
        token_count=tokens,
    )
    return Outcome(
        event, detail={"chunks": len(chunks), "tokens": tokens, "chunker_version": version}
    )
