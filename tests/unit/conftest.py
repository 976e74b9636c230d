"""Fixtures of the stages' unit tests: the real local providers (their child-process pools
started once per session) over an in-memory store of each test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ragstream.blobs import BlobStore, ClaimChecks
from ragstream.chunking import Chunker
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.parse.local import LocalParser
from ragstream.settings import ChunkSettings, ParseSettings
from ragstream.tokens import get_tokenizer
from tests.fakes import InMemoryStore, RecordingEmbedder
from tests.stages import Stages

DIMENSIONS = 64  # small local vectors: the stages do not care how many


@pytest.fixture(scope="session")
async def local_parser() -> AsyncIterator[LocalParser]:
    parser = LocalParser(ParseSettings(workers=1))
    yield parser
    await parser.aclose()


@pytest.fixture(scope="session")
async def chunker() -> AsyncIterator[Chunker]:
    """Small chunks, so a short document makes several."""
    chunker = Chunker(ChunkSettings(max_tokens=48, overlap_tokens=0, workers=1), get_tokenizer())
    yield chunker
    await chunker.aclose()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    """The local blob store claim checks point into."""
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def stages(local_parser: LocalParser, chunker: Chunker, blobs: BlobStore) -> Stages:
    embedder = RecordingEmbedder(LocalEmbedder(DIMENSIONS))
    return Stages(InMemoryStore(), local_parser, chunker, embedder, ClaimChecks({"file": blobs}))
