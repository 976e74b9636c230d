"""The embed stage (`consumers.embed.embed`) with no broker and no database: the embedding
cache (only new text is embedded, per tenant unless shared), the hybrid fallback (no vector of
another model mixed in), stale input, tenants and a chunk count that does not match."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ragstream.errors import PermanentError, TenantConflict
from ragstream.events import DocumentChunked, DocumentEmbedded
from ragstream.providers.embed.local import LOCAL_MODEL, LocalEmbedder
from ragstream.providers.embed.port import EmbedResult
from ragstream.store import SHARED_CACHE, EmbeddingRow, EmbeddingSet, StatusChange
from tests.fakes import RecordingEmbedder
from tests.stages import GUIDE, TENANT, Stages, uploaded

SCALING = b"\n## Scaling\n\nRun more members of a group, up to the partition count of its topic.\n"
REAL_MODEL = "text-embedding-3-small"


def same_vectors(got: list[list[float]], want: list[list[float]]) -> bool:
    """Equal but for the stored vectors' single precision."""
    return len(got) == len(want) and all(
        g == pytest.approx(w, abs=1e-6) for g, w in zip(got, want, strict=True)
    )


def vectors_of(stages: Stages, document_id: str) -> list[list[float]]:
    """The document's stored vectors, in chunk order."""
    rows = sorted(
        (k[2], e.vector) for k, e in stages.store.embeddings.items() if k[0] == document_id
    )
    return [vector for _, vector in rows]


async def texts_of(stages: Stages, chunked: DocumentChunked) -> list[str]:
    chunks = await stages.store.load_chunks(chunked.document_id, chunked.chunker_version)
    return [c.text for c in chunks]


async def test_a_chunked_document_is_embedded_stored_and_moved_to_embedded(
    stages: Stages,
) -> None:
    chunked = await stages.chunked(uploaded("doc-1"))
    outcome = await stages.embed(chunked)

    event = outcome.output
    assert isinstance(event, DocumentEmbedded)
    texts = await texts_of(stages, chunked)
    dims = stages.embedder.dimensions
    assert stages.embedder.embedded == texts  # each text once, in one call
    local = LocalEmbedder(dims).embed_sync(texts)
    assert (event.embedder, event.model, event.dimensions, event.chunker_version) == (
        "local",
        LOCAL_MODEL,
        dims,
        chunked.chunker_version,
    )
    assert (event.chunk_count, event.new_embeddings, event.cached_embeddings) == (
        len(texts),
        len(texts),
        0,
    )
    assert event.token_count == local.token_count
    assert same_vectors(vectors_of(stages, "doc-1"), local.vectors)
    assert {k[3:] for k in stages.store.embeddings} == {(LOCAL_MODEL, dims)}
    doc = stages.store.documents["doc-1"]
    assert (doc.status, doc.current_embedding_model, doc.current_embedding_dimensions) == (
        "embedded",
        LOCAL_MODEL,
        dims,
    )
    assert doc.searchable_chunker_version == chunked.chunker_version


async def test_a_redelivered_event_embeds_nothing_again(stages: Stages) -> None:
    chunked = await stages.chunked(uploaded("doc-1"))
    await stages.embed(chunked)
    calls, stored = len(stages.embedder.calls), dict(stages.store.embeddings)

    again = await stages.embed(chunked)
    assert isinstance(again.output, DocumentEmbedded)
    assert (again.detail["embedded"], again.detail["cached"]) == (0, chunked.chunk_count)
    assert len(stages.embedder.calls) == calls
    assert stages.store.embeddings == stored


async def test_only_text_the_tenant_has_not_had_embedded_is_sent(stages: Stages) -> None:
    first = await stages.chunked(uploaded("doc-1"))
    await stages.embed(first)
    second = await stages.chunked(uploaded("doc-2", GUIDE + SCALING))
    before = len(stages.embedder.calls)

    outcome = await stages.embed(second)
    new = [t for t in await texts_of(stages, second) if t not in await texts_of(stages, first)]
    assert len(new) == 1 and new[0].startswith("## Scaling")
    assert stages.embedder.calls[before:] == [new]
    assert (outcome.detail["embedded"], outcome.detail["cached"]) == (1, first.chunk_count)
    assert stages.store.embeddings_of("doc-2", second.chunker_version) == {
        (LOCAL_MODEL, stages.embedder.dimensions): second.chunk_count
    }


async def test_the_cache_is_the_tenants_own_unless_shared(stages: Stages) -> None:
    await stages.embed(await stages.chunked(uploaded("doc-1")))
    theirs = await stages.chunked(uploaded("doc-2", tenant_id="globex"))
    outcome = await stages.embed(theirs)
    assert (outcome.detail["embedded"], outcome.detail["cached"]) == (theirs.chunk_count, 0)

    stages.share_cache = True  # embed.share_cache_across_tenants
    await stages.embed(await stages.chunked(uploaded("doc-3", tenant_id="initech")))
    shared = await stages.chunked(uploaded("doc-4", tenant_id="umbrella"))
    outcome = await stages.embed(shared)
    assert (outcome.detail["embedded"], outcome.detail["cached"]) == (0, shared.chunk_count)
    assert {k[0] for k in stages.store.cache} == {TENANT, "globex", SHARED_CACHE}


async def test_a_hybrid_fallback_embeds_the_whole_document_with_the_model_that_served(
    stages: Stages,
) -> None:
    """The real model has embedded most of this text before; its service is down now, so the
    local model serves: the document gets no vector of the real model, all of the local one."""
    dims = stages.embedder.dimensions
    first = await stages.chunked(uploaded("doc-1"))
    chunks = await stages.store.load_chunks("doc-1", first.chunker_version)
    real_vector = [1.0] + [0.0] * (dims - 1)
    await stages.store.save_embeddings(
        EmbeddingSet(
            "doc-1",
            TENANT,
            first.chunker_version,
            REAL_MODEL,
            dims,
            "openai",
            [EmbeddingRow(c.index, c.text_sha256, real_vector) for c in chunks],
        )
    )
    stages.embedder = RecordingEmbedder(LocalEmbedder(dims), named=REAL_MODEL)
    second = await stages.chunked(uploaded("doc-2", GUIDE + SCALING))

    outcome = await stages.embed(second)
    event = outcome.output
    assert isinstance(event, DocumentEmbedded)
    assert (event.embedder, event.model) == ("local", LOCAL_MODEL)
    texts = await texts_of(stages, second)
    assert (outcome.detail["embedded"], outcome.detail["cached"]) == (len(texts), 0)
    # The real model's cache was read and held all but the new text; the new text was sent
    # first, then, as the local model had served it, the rest too.
    hits = {k[3] for k, n in stages.store.cache_hits.items() if k[1] == REAL_MODEL and n}
    assert hits == {c.text_sha256 for c in chunks}
    new = [t for t in texts if t.startswith("## Scaling")]
    assert stages.embedder.calls == [new, [t for t in texts if t not in new]]
    assert stages.store.embeddings_of("doc-2", second.chunker_version) == {
        (LOCAL_MODEL, dims): len(texts)
    }
    assert same_vectors(vectors_of(stages, "doc-2"), LocalEmbedder(dims).embed_sync(texts).vectors)
    doc = stages.store.documents["doc-2"]
    assert (doc.status, doc.current_embedding_model) == ("embedded", LOCAL_MODEL)


async def test_an_event_of_a_chunker_version_the_document_has_left_is_skipped(
    stages: Stages,
) -> None:
    chunked = await stages.chunked(uploaded("doc-1"))
    rechunked = StatusChange(
        "doc-1",
        "chunked",
        tenant_id=TENANT,
        current_parse_sha256=chunked.content_sha256,
        current_chunker_version="md-v9",
    )
    assert await stages.store.advance_status(rechunked)

    outcome = await stages.embed(chunked)
    assert (outcome.output, outcome.status) == (None, "skipped")
    assert outcome.detail == {
        "stale": "chunker_version",
        "input": chunked.chunker_version,
        "current": "md-v9",
    }
    assert stages.embedder.calls == []
    assert stages.store.embeddings == {}


async def test_an_event_of_a_parse_the_document_has_left_is_skipped(stages: Stages) -> None:
    chunked = await stages.chunked(uploaded("doc-1"))
    reparsed = StatusChange("doc-1", "parsed", tenant_id=TENANT, current_parse_sha256="f" * 64)
    assert await stages.store.advance_status(reparsed)

    outcome = await stages.embed(chunked)
    assert (outcome.status, outcome.detail["stale"]) == ("skipped", "parse")
    assert stages.embedder.calls == []


async def test_an_event_naming_another_tenants_document_is_refused(stages: Stages) -> None:
    chunked = await stages.chunked(uploaded("doc-1"))
    with pytest.raises(TenantConflict):
        await stages.embed(replace(chunked, tenant_id="globex"))
    assert stages.embedder.calls == []


async def test_a_chunk_count_the_store_does_not_hold_is_permanent(stages: Stages) -> None:
    chunked = await stages.chunked(uploaded("doc-1"))
    with pytest.raises(PermanentError, match=r"store holds \d+ chunks of version"):
        await stages.embed(replace(chunked, chunk_count=chunked.chunk_count + 1))
    assert stages.embedder.calls == []
    assert stages.store.documents["doc-1"].status == "chunked"


# -- a micro-batch's local vectors made ahead ------------------------------------------------


class CountingLocal(LocalEmbedder):
    """The local embedder itself (so vectors made ahead are its own), its calls recorded."""

    def __init__(self, dimensions: int) -> None:
        super().__init__(dimensions)
        self.calls: list[list[str]] = []

    async def embed(self, texts: list[str]) -> EmbedResult:
        self.calls.append(list(texts))
        return await super().embed(texts)


def _doc(n: int) -> bytes:
    return (
        GUIDE + f"\n## Part {n}\n\nSection {n} of the guide, on its own: item {n * 7}.\n".encode()
    )


async def test_a_batch_s_later_documents_are_embedded_with_vectors_made_ahead(
    stages: Stages,
) -> None:
    """While the stage works on a batch's first document, the local vectors of the others are
    made in the background; the stage then sends none of their texts to its embedder, and
    stores the very vectors it would have made."""
    from consumers.embed import EmbedDeps, embed
    from consumers.embed_ahead import EmbeddingsAhead

    chunked = [await stages.chunked(uploaded(f"doc-{n}", _doc(n))) for n in range(3)]
    dims = stages.embedder.dimensions
    local = CountingLocal(dims)
    ahead = EmbeddingsAhead(stages.store, local, LocalEmbedder(dims))
    deps = EmbedDeps(stages.store, local, ahead=ahead)
    ahead.start(chunked)
    outcomes = [await embed(event, deps) for event in chunked]

    first_texts = await texts_of(stages, chunked[0])
    assert local.calls == [first_texts]  # only the first document's, by the stage
    for event, outcome in zip(chunked, outcomes, strict=True):
        texts = await texts_of(stages, event)
        out = outcome.output
        assert isinstance(out, DocumentEmbedded)
        assert (out.embedder, out.model) == ("local", LOCAL_MODEL)
        # the guide's sections are cached from the first document; each part is new
        assert out.new_embeddings == len(texts) - out.cached_embeddings >= 1
        assert out.token_count > 0
        assert same_vectors(
            vectors_of(stages, event.document_id), LocalEmbedder(dims).embed_sync(texts).vectors
        )


async def test_vectors_made_ahead_are_not_used_by_another_model(stages: Stages) -> None:
    """A hybrid embedder serving the real model: nothing is made ahead, and what the stage
    stores comes from the embedder that served the call."""
    from consumers.embed import EmbedDeps, embed
    from consumers.embed_ahead import EmbeddingsAhead

    dims = stages.embedder.dimensions
    real = RecordingEmbedder(LocalEmbedder(dims), named=REAL_MODEL)
    chunked = [await stages.chunked(uploaded(f"doc-{n}", _doc(n))) for n in range(2)]
    ahead = EmbeddingsAhead(stages.store, real, LocalEmbedder(dims))
    ahead.start(chunked)
    assert not ahead.serves(real)
    assert not ahead.serves(stages.embedder)  # a wrapper naming the local model is not it
    for event in chunked:
        await embed(event, EmbedDeps(stages.store, real, ahead=ahead))
    assert len(real.calls) == 2  # each document embedded by the stage's embedder


async def test_a_document_the_ahead_work_could_not_read_is_embedded_by_the_stage(
    stages: Stages,
) -> None:
    from consumers.embed import EmbedDeps, embed
    from consumers.embed_ahead import EmbeddingsAhead

    class Unreadable:
        async def load_chunks(self, document_id: str, chunker_version: str) -> list[object]:
            raise ConnectionError("the pool is gone")

    chunked = [await stages.chunked(uploaded(f"doc-{n}", _doc(n))) for n in range(2)]
    dims = stages.embedder.dimensions
    local = CountingLocal(dims)
    ahead = EmbeddingsAhead(Unreadable(), local, LocalEmbedder(dims))  # type: ignore[arg-type]
    assert ahead.serves(local)
    ahead.start(chunked)
    deps = EmbedDeps(stages.store, local, ahead=ahead)
    for event in chunked:
        out = (await embed(event, deps)).output
        assert isinstance(out, DocumentEmbedded) and out.new_embeddings > 0
    assert len(local.calls) == 2  # the stage embedded both itself


async def test_a_document_the_ahead_work_is_slow_on_does_not_hold_the_stage(
    stages: Stages, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that never ends (a pool with no connection to spare) costs the stage at most
    TAKE_WAIT_S: it then embeds the document itself."""
    import asyncio

    import consumers.embed_ahead
    from consumers.embed import EmbedDeps, embed
    from consumers.embed_ahead import EmbeddingsAhead

    monkeypatch.setattr(consumers.embed_ahead, "TAKE_WAIT_S", 0.2)

    class Stuck:
        async def load_chunks(self, document_id: str, chunker_version: str) -> list[object]:
            await asyncio.Event().wait()
            return []

    chunked = [await stages.chunked(uploaded(f"doc-{n}", _doc(n))) for n in range(2)]
    dims = stages.embedder.dimensions
    local = CountingLocal(dims)
    ahead = EmbeddingsAhead(Stuck(), local, LocalEmbedder(dims))  # type: ignore[arg-type]
    stop = ahead.start(chunked)
    deps = EmbedDeps(stages.store, local, ahead=ahead)
    started = asyncio.get_running_loop().time()
    for event in chunked:
        out = (await asyncio.wait_for(embed(event, deps), 5)).output
        assert isinstance(out, DocumentEmbedded) and out.new_embeddings > 0
    assert len(local.calls) == 2
    assert asyncio.get_running_loop().time() - started >= 0.2  # it did wait for the stuck read
    stop()  # the batch ends: the stuck read is cancelled
    await asyncio.sleep(0)
    assert all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())


async def test_two_batches_at_once_each_take_their_own_vectors_made_ahead(
    stages: Stages,
) -> None:
    """Batches of two partitions run at once: each one's later documents get the vectors
    made ahead for them, and a batch that ends drops only what it left."""
    from consumers.embed import EmbedDeps, embed
    from consumers.embed_ahead import EmbeddingsAhead

    chunked = [await stages.chunked(uploaded(f"doc-{n}", _doc(n))) for n in range(6)]
    dims = stages.embedder.dimensions
    local = CountingLocal(dims)
    ahead = EmbeddingsAhead(stages.store, local, LocalEmbedder(dims))
    deps = EmbedDeps(stages.store, local, ahead=ahead)
    first, second = chunked[:3], chunked[3:]
    stop_first = ahead.start(first)
    stop_second = ahead.start(second)
    await embed(first[0], deps)
    await embed(second[0], deps)
    stop_first()  # the first batch ends early: its last document was not taken
    for event in (second[1], second[2]):
        out = (await embed(event, deps)).output
        assert isinstance(out, DocumentEmbedded) and out.new_embeddings > 0
    stop_second()
    assert len(local.calls) == 2  # the stage embedded each batch's first document itself
    assert await ahead.take(first[2].document_id, first[2].chunker_version, ["x"]) == {}


def test_no_work_ahead_when_the_pool_has_no_connection_to_spare(stages: Stages) -> None:
    from consumers.compose import build_stage
    from ragstream.settings import load_settings
    from ragstream.topology import Stage

    # one connection per batch at once, and one for the work ahead
    for size, batches, expected in ((1, 1, False), (2, 1, True), (2, 2, False), (3, 2, True)):
        settings = load_settings(
            postgres={"pool_max_size": size}, kafka={"concurrent_batches": batches}
        )
        parts = build_stage(Stage.EMBED, settings, stages.store)  # type: ignore[arg-type]
        assert (parts.ahead is not None) is expected, (size, batches)
