"""The same assertions against the in-memory store of the unit tests (tests/fakes.py) and the
PostgreSQL store, so the fake cannot drift from what the stages really get: duplicates by
content, forward-only status, tenant checks, chunk sets per parse, embeddings and their cache.

Each test uses ids of its own: the PostgreSQL store is the session's shared database."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

import pytest

from consumers.chunk import ChunkStore
from consumers.embed import EmbedStore
from consumers.parse import ParseStore
from ragstream.errors import PermanentError, TenantConflict
from ragstream.store import (
    SHARED_CACHE,
    CacheLookup,
    ChunkRow,
    ChunkSet,
    EmbeddingRow,
    EmbeddingSet,
    ParsedContent,
    StatusChange,
    Store,
    Upload,
    UploadDecision,
    migrate,
)
from tests.fakes import InMemoryStore

pytestmark = pytest.mark.integration

DIMS = 8
MODEL = "contract-model"


class StageStore(ParseStore, ChunkStore, EmbedStore, Protocol):
    """Everything the stages ask of a store."""


@pytest.fixture(scope="module")
async def postgres(database_url: str) -> AsyncIterator[Store]:
    await migrate(database_url, dimensions=DIMS)
    async with await Store.connect(database_url, min_size=1, max_size=2) as store:
        yield store


@pytest.fixture(params=["in-memory", "postgres"])
def store(request: pytest.FixtureRequest, postgres: Store) -> StageStore:
    return InMemoryStore() if request.param == "in-memory" else postgres


@pytest.fixture
def ids() -> tuple[str, str]:
    """A tenant and a document-id prefix of this test's own."""
    u = uuid.uuid4().hex[:10]
    return f"t-{u}", f"d-{u}"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def vector(i: int) -> list[float]:
    v = [0.0] * DIMS
    v[i % DIMS] = 1.0
    return v


def chunk_rows(texts: list[str]) -> list[ChunkRow]:
    return [ChunkRow(i, t, sha(t), ["Doc"], len(t.split()), 0, len(t)) for i, t in enumerate(texts)]


async def register(
    store: StageStore, doc: str, tenant: str, content: str, *, force: bool = False
) -> UploadDecision:
    return await store.register_upload(
        Upload(doc, tenant, f"{doc}.md", "text/markdown", len(content), sha(content), None,
               {"k": "v"}, f"corr-{doc}", datetime(2026, 1, 1, tzinfo=UTC), force)
    )  # fmt: skip


async def status(store: StageStore, doc: str) -> tuple[object, ...]:
    d = await store.get_document(doc)
    assert d is not None
    return (d.status, d.current_parse_sha256, d.current_chunker_version, d.chunk_count)


async def parsed_and_chunked(
    store: StageStore, doc: str, tenant: str, texts: list[str], *, version: str = "v1"
) -> str:
    """A registered document parsed to `texts` and cut into them; its parse sha256."""
    markdown = "\n\n".join(texts)
    await register(store, doc, tenant, markdown)
    psha = sha(markdown)
    assert await store.save_parse(ParsedContent(doc, tenant, psha, "local", "1", markdown, 1, None))
    await store.advance_status(
        StatusChange(doc, "parsed", tenant_id=tenant, current_parse_sha256=psha)
    )
    chunks = chunk_rows(texts)
    assert await store.save_chunks(
        ChunkSet(doc, tenant, version, {}, chunks, parse_sha256=psha)
    ) == len(texts)
    await store.advance_status(StatusChange(
        doc, "chunked", tenant_id=tenant, current_parse_sha256=psha,
        current_chunker_version=version, chunk_count=len(texts),
    ))  # fmt: skip
    return psha


async def test_duplicates_are_recognised_by_the_tenants_content(
    store: StageStore, ids: tuple[str, str]
) -> None:
    tenant, doc = ids
    first = await register(store, f"{doc}-a", tenant, "same bytes")
    assert first == UploadDecision(True, "uploaded", None)
    assert await register(store, f"{doc}-a", tenant, "same bytes") == first  # redelivery
    second = await register(store, f"{doc}-b", tenant, "same bytes")
    assert second == UploadDecision(False, "duplicate", f"{doc}-a")
    assert (await register(store, f"{doc}-c", f"{tenant}-x", "same bytes")).proceed
    promoted = await register(store, f"{doc}-b", tenant, "same bytes", force=True)
    assert promoted == UploadDecision(True, "uploaded", None)
    with pytest.raises(PermanentError, match="already registered with other content"):
        await register(store, f"{doc}-a", tenant, "other bytes")
    with pytest.raises(TenantConflict):
        await register(store, f"{doc}-a", f"{tenant}-x", "same bytes")

    # A failed original no longer counts.
    await register(store, f"{doc}-f", f"{tenant}-f", "content")
    assert await store.advance_status(StatusChange(f"{doc}-f", "failed", "x", stage="parse"))
    assert (await register(store, f"{doc}-g", f"{tenant}-f", "content")).proceed


async def test_status_moves_only_forward(store: StageStore, ids: tuple[str, str]) -> None:
    tenant, doc = ids
    psha = await parsed_and_chunked(store, doc, tenant, ["one", "two"])
    assert await status(store, doc) == ("chunked", psha, "v1", 2)
    embedded = StatusChange(
        doc, "embedded", tenant_id=tenant, current_chunker_version="v1",
        current_embedding_model=MODEL, current_embedding_dimensions=DIMS,
    )  # fmt: skip
    assert await store.advance_status(embedded)
    # Late results of the same generation, and failures of passed stages, change nothing.
    assert not await store.advance_status(embedded)
    assert not await store.advance_status(
        StatusChange(doc, "chunked", current_chunker_version="v1")
    )
    assert not await store.advance_status(StatusChange(doc, "failed", "late", stage="chunk"))
    # A new chunker version is a new generation; an embedding of the old one is stale.
    assert await store.advance_status(StatusChange(doc, "chunked", current_chunker_version="v2"))
    assert not await store.advance_status(embedded)
    d = await store.get_document(doc)
    assert d is not None
    assert (d.status, d.current_chunker_version, d.searchable_chunker_version) == (
        "chunked",
        "v2",
        "v1",
    )
    # A failure of the stage it has not passed counts, and a success leaves it (a redrive).
    assert await store.advance_status(StatusChange(doc, "dead-lettered", "boom", stage="embed"))
    assert await store.advance_status(replace(embedded, current_chunker_version="v2"))
    d = await store.get_document(doc)
    assert d is not None
    assert (d.status, d.status_reason, d.searchable_chunker_version) == ("embedded", None, "v2")
    with pytest.raises(ValueError, match="cannot set status"):
        await store.advance_status(StatusChange(doc, "duplicate"))
    assert not await store.advance_status(StatusChange(f"{doc}-none", "parsed"))


async def test_a_late_result_fills_in_a_missing_count_and_a_duplicate_never_moves(
    store: StageStore, ids: tuple[str, str]
) -> None:
    tenant, doc = ids
    await register(store, doc, tenant, "reordered")
    await store.advance_status(StatusChange(doc, "parsed", current_parse_sha256="p"))
    assert await store.advance_status(
        StatusChange(doc, "embedded", current_chunker_version="v1", current_embedding_model=MODEL)
    )
    assert not await store.advance_status(
        StatusChange(doc, "chunked", current_chunker_version="v1", chunk_count=7)
    )
    assert await status(store, doc) == ("embedded", "p", "v1", 7)
    await register(store, f"{doc}-dup", tenant, "reordered")
    assert not await store.advance_status(
        StatusChange(f"{doc}-dup", "parsed", current_parse_sha256="p")
    )
    assert not await store.advance_status(StatusChange(f"{doc}-dup", "failed", "x", stage="parse"))


async def test_every_write_checks_the_documents_tenant(
    store: StageStore, ids: tuple[str, str]
) -> None:
    tenant, doc = ids
    intruder = f"{tenant}-intruder"
    psha = await parsed_and_chunked(store, doc, tenant, ["alpha"])
    before = await store.get_document(doc)
    writes = [
        store.save_parse(ParsedContent(doc, intruder, sha("x"), "local", "1", "x", 1, None)),
        store.save_chunks(ChunkSet(doc, intruder, "v9", {}, chunk_rows(["x"]), parse_sha256=psha)),
        store.save_embeddings(
            EmbeddingSet(doc, intruder, "v1", MODEL, DIMS, "local", [(0, sha("alpha"), vector(0))])
        ),
        store.advance_status(
            StatusChange(doc, "dead-lettered", "x", tenant_id=intruder, stage="parse")
        ),
        store.advance_status(
            StatusChange(doc, "parsed", tenant_id=intruder, current_parse_sha256="y")
        ),
    ]
    for write in writes:
        with pytest.raises(TenantConflict):
            await write
    assert await store.get_document(doc) == before
    assert await store.load_chunks(doc, "v9") == []
    assert await store.load_parse(doc, sha("x")) is None


async def test_chunk_sets_follow_the_documents_parse(
    store: StageStore, ids: tuple[str, str]
) -> None:
    tenant, doc = ids
    psha = await parsed_and_chunked(store, doc, tenant, ["one", "two", "three"])
    old = chunk_rows(["one", "two", "three"])
    assert await store.load_chunks(doc, "v1") == old
    assert await store.save_chunks(ChunkSet(doc, tenant, "v1", {}, old, parse_sha256=psha)) == 0
    assert not await store.save_parse(ParsedContent(doc, tenant, psha, "local", "1", "x", 1, None))

    # A new parse: its chunks replace the set (and its embeddings); the old set is stale.
    await store.save_embeddings(EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local",
                                             [(0, sha("one"), vector(0))]))  # fmt: skip
    assert await store.advance_status(StatusChange(doc, "parsed", current_parse_sha256="B"))
    new = chunk_rows(["uno", "dos"])
    assert await store.save_chunks(ChunkSet(doc, tenant, "v1", {}, new, parse_sha256="B")) == 2
    assert await store.load_chunks(doc, "v1") == new
    assert await store.save_chunks(ChunkSet(doc, tenant, "v1", {}, old, parse_sha256=psha)) == 0
    assert await store.load_chunks(doc, "v1") == new
    # The embedding of "one" went with its chunk: writing "uno" at index 0 is new again.
    rows = [EmbeddingRow(0, sha("uno"), vector(1))]
    assert (
        await store.save_embeddings(EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local", rows))
        == 1
    )


async def test_embeddings_are_written_once_and_cached_per_scope(
    store: StageStore, ids: tuple[str, str]
) -> None:
    tenant, doc = ids
    other = f"{tenant}-other"
    texts = ["cached one", "cached two"]
    await parsed_and_chunked(store, doc, tenant, texts)
    rows = [EmbeddingRow(i, sha(t), vector(i)) for i, t in enumerate(texts)]
    embeddings = EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local", rows)
    assert await store.save_embeddings(embeddings) == 2
    assert await store.save_embeddings(embeddings) == 0  # redelivery
    # An embedding of text the chunk no longer holds is not written, but it is cached.
    late = EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local", [(0, sha("gone"), vector(5))])
    assert await store.save_embeddings(late) == 0

    wanted = [sha("cached one"), sha("cached two"), sha("gone"), sha("never")]
    got = await store.cached_embeddings(CacheLookup(MODEL, DIMS, wanted, cache_scope=tenant))
    assert set(got) == {sha("cached one"), sha("cached two"), sha("gone")}
    assert got[sha("cached two")] == pytest.approx(vector(1))
    assert (
        await store.cached_embeddings(CacheLookup(MODEL, DIMS + 1, wanted, cache_scope=tenant))
        == {}
    )
    assert await store.cached_embeddings(CacheLookup(MODEL, DIMS, wanted, cache_scope=other)) == {}
    assert await store.cached_embeddings(CacheLookup(MODEL, DIMS, [], cache_scope=tenant)) == {}

    shared = EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local", rows, cache_scope=SHARED_CACHE)
    assert await store.save_embeddings(shared) == 0
    from_shared = await store.cached_embeddings(
        CacheLookup(MODEL, DIMS, wanted, cache_scope=SHARED_CACHE)
    )
    assert sha("cached one") in from_shared  # other tests may share this scope and model

    with pytest.raises(PermanentError, match="expected 8 dimensions, got 3"):
        await store.save_embeddings(
            EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local", [(0, sha("x"), [1.0, 2.0, 3.0])])
        )
