"""The stage functions (consumers/parse.py, chunk.py, embed.py) wired to the in-memory store and
the real local providers, with no broker and no database: what the unit tests of the stages
drive. `tests/unit/conftest.py` builds a `Stages` per test.

    stages = Stages(store, parser, chunker, embedder, claims)
    parsed = await stages.parse(uploaded("doc-1", b"# Title\\n\\ntext"))
    chunked = await stages.chunk(parsed.output)
    embedded = await stages.embed(chunked.output)
"""

from __future__ import annotations

from dataclasses import dataclass

from consumers.chunk import ChunkDeps, chunk
from consumers.embed import EmbedDeps, embed
from consumers.parse import ParseDeps, parse
from consumers.stage import Outcome, RecordContext
from ragstream.blobs import ClaimChecks, sha256_hex
from ragstream.chunking import Chunker
from ragstream.events import DocumentChunked, DocumentEmbedded, DocumentParsed, DocumentUploaded
from ragstream.providers.parse.port import Parser
from tests.fakes import InMemoryStore, RecordingEmbedder

TENANT = "acme"
MAX_UPLOAD_BYTES = 1024 * 1024
GUIDE = b"""# Operating guide

## Consumer groups

Each stage is its own consumer group, so it scales and replays on its own. A group shares the
partitions of its input topic among its members, and a rebalance moves them when one joins.

## Dead letters

A record that cannot pass goes to the dead-letter topic with headers that say why. Operators
list, show, count, redrive and purge dead letters from the command line.

## Costs

Every paid call publishes a usage event; the accountant keeps spend against the budgets.
"""


def uploaded(
    document_id: str,
    content: bytes = GUIDE,
    *,
    tenant_id: str = TENANT,
    source_uri: str | None = None,
    filename: str = "guide.md",
    content_type: str = "text/markdown",
    force: bool = False,
) -> DocumentUploaded:
    """An upload of `content`: inline, or behind the claim check `source_uri`."""
    return DocumentUploaded(
        document_id=document_id,
        tenant_id=tenant_id,
        correlation_id=f"corr-{document_id}",
        filename=filename,
        content_type=content_type,
        size_bytes=len(content),
        sha256=sha256_hex(content),
        source_uri=source_uri,
        content=None if source_uri else content,
        force=force,
    )


def record(document_id: str) -> RecordContext:
    """Where an upload of `document_id` came from: first attempt, keyed by its id."""
    return RecordContext("uploaded", 0, 0, attempt=1, replay=False, key=document_id.encode())


@dataclass
class Stages:
    """The three stage functions over one store and the given providers."""

    store: InMemoryStore
    parser: Parser
    chunker: Chunker
    embedder: RecordingEmbedder  # the real local one, recorded (or a fallback: see fakes)
    claims: ClaimChecks
    share_cache: bool = False

    async def parse(self, event: DocumentUploaded, ctx: RecordContext | None = None) -> Outcome:
        deps = ParseDeps(self.store, self.parser, self.claims, MAX_UPLOAD_BYTES)
        return await parse(event, deps, ctx or record(event.document_id))

    async def chunk(self, event: DocumentParsed) -> Outcome:
        return await chunk(event, ChunkDeps(self.store, self.chunker))

    async def embed(self, event: DocumentChunked) -> Outcome:
        return await embed(event, EmbedDeps(self.store, self.embedder, self.share_cache))

    async def parsed(self, event: DocumentUploaded) -> DocumentParsed:
        """`event` through the parse stage; its output."""
        out = (await self.parse(event)).output
        assert isinstance(out, DocumentParsed), out
        return out

    async def chunked(self, event: DocumentUploaded) -> DocumentChunked:
        """`event` through the parse and chunk stages; the chunk stage's output."""
        out = (await self.chunk(await self.parsed(event))).output
        assert isinstance(out, DocumentChunked), out
        return out

    async def embedded(self, event: DocumentUploaded) -> DocumentEmbedded:
        """`event` through every stage; the embed stage's output."""
        out = (await self.embed(await self.chunked(event))).output
        assert isinstance(out, DocumentEmbedded), out
        return out
