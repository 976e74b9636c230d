"""The PostgreSQL store against a real PostgreSQL + pgvector (the session's `database_url`).

The schema is shared and migrated once per session; each test uses its own tenant and document
ids. Migration tests run in a schema of their own so they see a fresh database.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pgvector.asyncpg import register_vector

from ragstream.errors import (
    ConfigError,
    InfrastructureUnavailable,
    InvalidEvent,
    PermanentError,
    RetryableError,
    TenantConflict,
)
from ragstream.store import (
    SHARED_CACHE,
    CacheLookup,
    ChunkRow,
    ChunkSet,
    EmbeddingSet,
    MigrationError,
    ParsedContent,
    StatusChange,
    Store,
    Upload,
    available_migrations,
    ensure_vector_index,
    migrate,
)
from ragstream.store import _sql as sql
from ragstream.store._errors import UniqueViolation, translate, translate_errors
from ragstream.store.migrate import _BOOTSTRAP

pytestmark = pytest.mark.integration

DIMS = 8  # small vectors for behaviour tests
BENCH_DIMS = 512  # the default embedding size, for the index and latency tests
MODEL = "test-model"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ids(prefix: str) -> tuple[str, str]:
    """A fresh tenant id and a document-id prefix, so tests never share rows."""
    u = uuid.uuid4().hex[:10]
    return f"t-{prefix}-{u}", f"d-{prefix}-{u}"


def unit(values: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def axis(i: int, dims: int = DIMS) -> list[float]:
    v = [0.01] * dims
    v[i % dims] = 1.0
    return unit(v)


NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    await migrate(database_url, dimensions=[DIMS, BENCH_DIMS])
    return database_url


@pytest.fixture(scope="session")
async def store(migrated: str) -> AsyncIterator[Store]:
    async with await Store.connect(migrated, min_size=1, max_size=10) as s:
        yield s


@pytest.fixture
async def fresh_schema(migrated: str) -> AsyncIterator[str]:
    """A DSN whose search_path starts with an empty schema of its own: a fresh database."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in migrated else "?"
        yield f"{migrated}{sep}search_path={schema},public"
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def register(store: Store, doc: str, tenant: str, content: str, **kw: Any) -> Any:
    return await store.register_upload(
        Upload(
            document_id=doc,
            tenant_id=tenant,
            filename=f"{doc}.md",
            content_type="text/markdown",
            size_bytes=len(content),
            sha256=sha(content),
            source_uri=f"blob://{sha(content)}",
            metadata={"source": "test"},
            correlation_id=f"corr-{doc}",
            uploaded_at=NOW,
            force=kw.pop("force", False),
        )
    )


def make_chunks(texts: Sequence[str], heading: str = "Intro") -> list[ChunkRow]:
    out, pos = [], 0
    for i, text in enumerate(texts):
        out.append(
            ChunkRow(
                index=i,
                text=text,
                text_sha256=sha(text),
                heading_path=["Doc", heading, f"§{i}"],
                token_count=len(text.split()),
                char_start=pos,
                char_end=pos + len(text),
                page=1 + i // 10,
            )
        )
        pos += len(text)
    return out


async def ingest(
    store: Store,
    doc: str,
    tenant: str,
    texts: Sequence[str],
    vectors: Sequence[Sequence[float]],
    *,
    chunker: str = "md-v1",
    model: str = MODEL,
    dims: int = DIMS,
    markdown: str | None = None,
) -> None:
    """One document through every stage, as the stage workers would write it."""
    markdown = markdown if markdown is not None else "\n\n".join(texts)
    await register(store, doc, tenant, markdown)
    psha = sha(markdown)
    await store.save_parse(ParsedContent(doc, tenant, psha, "local", "1", markdown, 1, "Title"))
    await store.advance_status(StatusChange(doc, "parsed", current_parse_sha256=psha, page_count=1))
    chunks = make_chunks(texts)
    await store.save_chunks(
        ChunkSet(doc, tenant, chunker, {"max_tokens": 400}, chunks, parse_sha256=psha)
    )
    await store.advance_status(
        StatusChange(
            doc,
            "chunked",
            current_parse_sha256=psha,
            current_chunker_version=chunker,
            chunk_count=len(chunks),
        )
    )
    rows = [(c.index, c.text_sha256, v) for c, v in zip(chunks, vectors, strict=True)]
    await store.save_embeddings(EmbeddingSet(doc, tenant, chunker, model, dims, "local", rows))
    await store.advance_status(
        StatusChange(
            doc,
            "embedded",
            current_chunker_version=chunker,
            current_embedding_model=model,
            current_embedding_dimensions=dims,
        )
    )


# -- migrations --------------------------------------------------------------------------------


async def test_migrations_apply_once_even_when_three_workers_start_together(
    fresh_schema: str,
) -> None:
    results = await asyncio.gather(*(migrate(fresh_schema, dimensions=DIMS) for _ in range(3)))
    versions = [m.version for m in available_migrations()]
    assert sorted(results, key=len) == [[], [], versions]
    assert await migrate(fresh_schema, dimensions=DIMS) == []

    conn = await asyncpg.connect(fresh_schema)
    try:
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["checksum"]) for r in rows] == [
            (m.version, m.checksum) for m in available_migrations()
        ]
        tables = {
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        assert set(sql.ALL_TABLES) | {"schema_migrations"} <= tables
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            f"embeddings_hnsw_{DIMS}",
        )
        assert valid is True
    finally:
        await conn.close()


async def test_a_changed_migration_is_refused(fresh_schema: str) -> None:
    await migrate(fresh_schema)
    conn = await asyncpg.connect(fresh_schema)
    try:
        await conn.execute(
            "UPDATE schema_migrations SET checksum = 'edited' WHERE version = '0001'"
        )
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ('9999', 'future', 'x')"
        )
    finally:
        await conn.close()
    with pytest.raises(MigrationError, match="0001_initial was changed after it was applied"):
        await migrate(fresh_schema)


async def test_vector_index_is_ensured_idempotently(store: Store, fresh_schema: str) -> None:
    assert await store.ensure_vector_index(DIMS) is False  # built by the session's migrate
    await migrate(fresh_schema)
    created = await asyncio.gather(*(ensure_vector_index(fresh_schema, 24) for _ in range(3)))
    assert sorted(created) == [False, False, True]
    assert await ensure_vector_index(fresh_schema, 24) is False

    # An index left invalid (an interrupted concurrent build) is dropped and built again.
    conn = await asyncpg.connect(fresh_schema)
    try:
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            pytest.skip("marking an index invalid needs a superuser")
        valid = """SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   WHERE c.relname = 'embeddings_hnsw_24' AND i.indrelid = 'embeddings'::regclass"""
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid ="
            " (SELECT oid FROM pg_class WHERE relname = 'embeddings_hnsw_24'"
            "  AND relnamespace = current_schema()::regnamespace)"
        )
        assert await conn.fetchval(valid) is False
        assert await ensure_vector_index(fresh_schema, 24) is True
        assert await conn.fetchval(valid) is True
    finally:
        await conn.close()
    with pytest.raises(ValueError, match="HNSW"):
        await store.ensure_vector_index(4000)


# -- uploads and duplicates ---------------------------------------------------------------------


async def test_register_upload_is_idempotent_and_recognises_duplicates(store: Store) -> None:
    tenant, doc = ids("dup")
    other_tenant, _ = ids("dup-other")
    first = await register(store, f"{doc}-a", tenant, "same bytes")
    assert (first.proceed, first.status, first.duplicate_of) == (True, "uploaded", None)
    assert await register(store, f"{doc}-a", tenant, "same bytes") == first  # redelivery

    second = await register(store, f"{doc}-b", tenant, "same bytes")
    assert (second.proceed, second.status, second.duplicate_of) == (False, "duplicate", f"{doc}-a")
    assert await register(store, f"{doc}-b", tenant, "same bytes") == second

    # Another tenant's identical bytes are not a duplicate.
    assert (await register(store, f"{doc}-c", other_tenant, "same bytes")).proceed

    # Forced: proceeds although the content is known; a forced redelivery of a duplicate too.
    forced = await register(store, f"{doc}-d", tenant, "same bytes", force=True)
    assert (forced.proceed, forced.status) == (True, "uploaded")
    promoted = await register(store, f"{doc}-b", tenant, "same bytes", force=True)
    assert (promoted.proceed, promoted.status, promoted.duplicate_of) == (True, "uploaded", None)
    assert (await store.get_document(f"{doc}-b")).forced  # type: ignore[union-attr]

    # A failed original no longer counts: the next upload of that content proceeds.
    t2, d2 = ids("dup-failed")
    await register(store, f"{d2}-a", t2, "content")
    assert await store.advance_status(
        StatusChange(f"{d2}-a", "failed", "parse blew up", stage="parse")
    )
    assert (await register(store, f"{d2}-b", t2, "content")).proceed

    assert (await store.duplicate_rows(tenant))["documents_same_content"] == 0
    summary = await store.summary(tenant)
    assert summary["by_status"] == {"uploaded": 3}
    assert summary["duplicates"] == 0


async def test_concurrent_uploads_of_the_same_content_let_exactly_one_proceed(store: Store) -> None:
    tenant, doc = ids("race")
    decisions = await asyncio.gather(
        *(register(store, f"{doc}-{i}", tenant, "racing bytes") for i in range(8))
    )
    winners = [d for d in decisions if d.proceed]
    assert len(winners) == 1
    winner_id = next(f"{doc}-{i}" for i, d in enumerate(decisions) if d.proceed)
    assert all(d.duplicate_of == winner_id for d in decisions if not d.proceed)
    assert (await store.summary(tenant))["by_status"] == {"uploaded": 1, "duplicate": 7}
    assert (await store.duplicate_rows(tenant))["documents_same_content"] == 0


async def test_a_document_id_reused_for_other_content_is_refused(store: Store) -> None:
    tenant, doc = ids("reuse")
    await register(store, doc, tenant, "one")
    with pytest.raises(PermanentError, match="already registered"):
        await register(store, doc, tenant, "two")


async def test_every_write_for_a_document_checks_its_tenant(store: Store) -> None:
    owner, doc = ids("owner")
    intruder = f"{owner}-intruder"
    markdown = "alpha\n\nbeta"
    await ingest(store, doc, owner, ["alpha", "beta"], [axis(0), axis(1)], markdown=markdown)
    await store.record_step(
        doc, owner, "parse", "e1", "ok", 1, NOW, NOW + timedelta(seconds=1), {}, f"corr-{doc}"
    )
    document, journey = await store.get_document(doc), await store.journey(doc)
    rows = await store.count_rows(owner)
    chunks = make_chunks(["alpha", "beta"])
    writes: dict[str, Any] = {
        "register_upload": lambda: register(store, doc, intruder, markdown),
        "save_parse": lambda: store.save_parse(
            ParsedContent(doc, intruder, sha("other"), "local", "1", "other", 1, None)
        ),
        "save_chunks": lambda: store.save_chunks(
            ChunkSet(doc, intruder, "md-v2", {}, chunks, parse_sha256=sha(markdown))
        ),
        "save_embeddings": lambda: store.save_embeddings(
            EmbeddingSet(
                doc, intruder, "md-v1", "other-model", DIMS, "local", [(0, sha("alpha"), axis(3))]
            )
        ),
        "advance_status failure": lambda: store.advance_status(
            StatusChange(doc, "dead-lettered", "parse: refused", tenant_id=intruder, stage="parse")
        ),
        "advance_status success": lambda: store.advance_status(
            StatusChange(doc, "parsed", tenant_id=intruder, current_parse_sha256=sha("other"))
        ),
        "record_step": lambda: store.record_step(
            doc, intruder, "parse", "e9", "dead-lettered", 1, NOW, NOW, {"error": "x"}
        ),
    }
    for name, write in writes.items():
        with pytest.raises(TenantConflict) as caught:
            await write()
        message = str(caught.value)
        assert f"document_id {doc!r} belongs to another tenant" in message, name
        assert f"tenant {intruder!r} cannot change it" in message, name
        assert owner not in message.replace(intruder, ""), "the owner is never named"

    assert await store.get_document(doc) == document
    after = await store.journey(doc)
    assert journey is not None and after is not None and after.steps == journey.steps
    assert await store.count_rows(owner) == rows
    assert not any((await store.count_rows(intruder)).values())
    # The owner's own writes go on.
    await store.record_step(doc, owner, "chunk", "e2", "ok", 1, NOW, NOW)
    # Already embedded: a failure of an earlier stage changes nothing (and raises nothing).
    moved = await store.advance_status(
        StatusChange(doc, "dead-lettered", "chunk: failed", tenant_id=owner, stage="chunk")
    )
    assert moved is False


async def test_a_journey_shows_only_its_owners_steps(store: Store) -> None:
    owner, doc = ids("steps")
    # A record of another tenant naming this id before it was registered: kept, never shown.
    await store.record_step(doc, f"{owner}-other", "parse", "x1", "dead-lettered", 1, NOW, NOW)
    await ingest(store, doc, owner, ["a"], [axis(0)])
    await store.record_step(doc, owner, "parse", "e1", "ok", 1, NOW, NOW)
    journey = await store.journey(doc)
    assert journey is not None
    assert [s.input_event_id for s in journey.steps] == ["e1"]


async def test_a_nul_byte_is_refused_naming_its_field(store: Store) -> None:
    tenant, doc = ids("nul")
    with pytest.raises(InvalidEvent, match=r"^invalid filename: contains a NUL byte"):
        await store.register_upload(
            Upload(doc, tenant, "a\x00.md", "text/markdown", 1, sha("x"), None, {}, None, NOW)
        )
    with pytest.raises(InvalidEvent, match=r"^invalid metadata\['k'\]: contains a NUL byte"):
        await store.register_upload(
            Upload(
                doc, tenant, "a.md", "text/markdown", 1, sha("x"), None, {"k": "\x00"}, None, NOW
            )
        )
    with pytest.raises(InvalidEvent, match=r"^invalid tenant_id: contains a NUL byte"):
        await store.record_step(doc, "t\x00", "parse", "e1", "dead-lettered", 1, NOW, NOW)
    assert await store.get_document(doc) is None


# -- idempotent writes --------------------------------------------------------------------------


async def test_every_write_is_idempotent(store: Store) -> None:
    tenant, doc = ids("idem")
    texts = ["alpha beta", "gamma delta", "epsilon"]
    vectors = [axis(i) for i in range(3)]

    async def everything() -> None:
        await ingest(store, doc, tenant, texts, vectors)
        for attempt in (1, 2):
            await store.record_step(
                doc, tenant, "embed", "evt-1", "retry" if attempt == 1 else "ok", attempt,
                NOW, NOW + timedelta(milliseconds=250), {"chunks": 3}, f"corr-{doc}",
            )  # fmt: skip

    await everything()
    first = await store.count_rows(tenant)
    assert first == {
        "documents": 1,
        "document_events": 2,
        "parse_results": 1,
        "chunks": 3,
        "embeddings": 3,
        "embedding_cache": 3,  # the tenant's own cache scope
    }
    await everything()  # redelivery of every step
    assert await store.count_rows(tenant) == first
    assert set((await store.duplicate_rows(tenant)).values()) == {0}
    doc_row = await store.get_document(doc)
    assert doc_row is not None
    assert (doc_row.status, doc_row.chunk_count, doc_row.page_count) == ("embedded", 3, 1)

    # Several writes in one transaction; a failure inside rolls all of them back.
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.save_parse(ParsedContent(doc, tenant, sha("v2"), "local", "2", "v2", 1, None))
            await tx.advance_status(StatusChange(doc, "parsed", current_parse_sha256=sha("v2")))
            raise RuntimeError("crash before commit")
    assert await store.load_parse(doc, sha("v2")) is None
    assert (await store.get_document(doc)).status == "embedded"  # type: ignore[union-attr]
    async with store.transaction() as tx:
        assert await tx.save_parse(
            ParsedContent(doc, tenant, sha("v2"), "local", "2", "v2", 1, None)
        )
    assert await store.load_parse(doc, sha("v2")) == ("v2", 1, None)


async def test_chunks_round_trip_and_a_new_parse_replaces_the_set(store: Store) -> None:
    tenant, doc = ids("reparse")
    texts = ["one", "two", "three"]
    await ingest(store, doc, tenant, texts, [axis(i) for i in range(3)], markdown="A")
    assert await store.load_chunks(doc, "md-v1") == make_chunks(texts)

    # Re-parse (another parser) gives new content B: same chunker version, other chunks.
    await store.save_parse(ParsedContent(doc, tenant, sha("B"), "llamaparse", "9", "B", 1, None))
    assert await store.advance_status(StatusChange(doc, "parsed", current_parse_sha256=sha("B")))
    new = make_chunks(["uno", "dos"])
    written = await store.save_chunks(
        ChunkSet(doc, tenant, "md-v1", {}, new, parse_sha256=sha("B"))
    )
    assert written == 2
    assert await store.load_chunks(doc, "md-v1") == new
    assert (await store.count_rows(tenant))["embeddings"] == 0  # embeddings of old text went too
    # A late redelivery of the chunks cut from A is stale: nothing changes.
    old = make_chunks(texts)
    assert (
        await store.save_chunks(ChunkSet(doc, tenant, "md-v1", {}, old, parse_sha256=sha("A"))) == 0
    )
    assert await store.load_chunks(doc, "md-v1") == new


# -- status --------------------------------------------------------------------------------------


async def test_status_only_moves_forward(store: Store) -> None:
    tenant, doc = ids("fwd")
    await ingest(store, doc, tenant, ["x"], [axis(0)])

    async def status() -> str:
        d = await store.get_document(doc)
        assert d is not None
        return d.status

    assert await status() == "embedded"
    # Late results of the same generation change nothing.
    assert not await store.advance_status(
        StatusChange(doc, "chunked", current_chunker_version="md-v1")
    )
    assert not await store.advance_status(
        StatusChange(doc, "parsed", current_parse_sha256=sha("x"))
    )
    assert not await store.advance_status(
        StatusChange(doc, "failed", "late chunk failure", stage="chunk")
    )
    assert not await store.advance_status(StatusChange(doc, "failed", "stage unknown"))
    assert await status() == "embedded"

    # A new chunker version starts a new generation; search keeps reading md-v1 meanwhile.
    assert await store.advance_status(StatusChange(doc, "chunked", current_chunker_version="md-v2"))
    d = await store.get_document(doc)
    assert d is not None
    assert (d.status, d.current_chunker_version, d.searchable_chunker_version) == (
        "chunked",
        "md-v2",
        "md-v1",
    )
    # An embedding of the chunker version the document has left is stale.
    assert not await store.advance_status(
        StatusChange(
            doc, "embedded", current_chunker_version="md-v1", current_embedding_model=MODEL
        )
    )
    assert await store.advance_status(
        StatusChange(
            doc, "embedded", current_chunker_version="md-v2", current_embedding_model=MODEL
        )
    )
    d = await store.get_document(doc)
    assert d is not None
    assert (d.status, d.searchable_chunker_version) == ("embedded", "md-v2")


async def test_failed_is_left_by_a_later_success_but_not_by_a_stale_one(store: Store) -> None:
    tenant, doc = ids("redrive")
    await register(store, doc, tenant, "redrive me")
    assert await store.advance_status(
        StatusChange(doc, "parsed", current_parse_sha256="p1", page_count=2)
    )
    assert await store.advance_status(StatusChange(doc, "failed", "Timeout", stage="chunk"))
    assert await store.advance_status(
        StatusChange(doc, "dead-lettered", "attempts used up", stage="chunk")
    )
    assert not await store.advance_status(
        StatusChange(doc, "parsed", current_parse_sha256="p1")
    )  # stale
    d = await store.get_document(doc)
    assert d is not None
    assert (d.status, d.status_reason) == ("dead-lettered", "attempts used up")
    # The redrive: chunking now succeeds.
    assert await store.advance_status(
        StatusChange(doc, "chunked", current_chunker_version="v1", chunk_count=4)
    )
    d = await store.get_document(doc)
    assert d is not None
    assert (d.status, d.status_reason, d.chunk_count) == ("chunked", None, 4)

    # 'embedded' recorded before the chunk stage's own 'chunked' landed: the late 'chunked'
    # does not move the document back, but fills in the count it carries.
    t2, d2 = ids("reorder")
    await register(store, d2, t2, "reordered")
    await store.advance_status(StatusChange(d2, "parsed", current_parse_sha256="p"))
    assert await store.advance_status(StatusChange(
        d2, "embedded", current_chunker_version="v1", current_embedding_model=MODEL,
        current_embedding_dimensions=DIMS,
    ))  # fmt: skip
    assert not await store.advance_status(
        StatusChange(d2, "chunked", current_chunker_version="v1", chunk_count=7)
    )
    doc2 = await store.get_document(d2)
    assert doc2 is not None
    assert (doc2.status, doc2.chunk_count) == ("embedded", 7)

    # A duplicate never advances.
    await register(store, f"{d2}-dup", t2, "reordered")
    assert not await store.advance_status(
        StatusChange(f"{d2}-dup", "parsed", current_parse_sha256="p")
    )
    with pytest.raises(ValueError, match="cannot set status"):
        await store.advance_status(StatusChange(d2, "duplicate"))


# -- embeddings, cache, search -------------------------------------------------------------------


async def test_embedding_cache_returns_the_vectors_of_its_hits(store: Store) -> None:
    """Hits are read, not counted (see the crosswise test below for why)."""
    tenant, doc = ids("cache")
    model = f"cache-model-{uuid.uuid4().hex[:6]}"
    texts = ["cached one", "cached two"]
    await ingest(store, doc, tenant, texts, [axis(1), axis(2)], model=model)
    wanted = [sha("cached one"), sha("cached two"), sha("never embedded")]

    got = await store.cached_embeddings(CacheLookup(model, DIMS, wanted, cache_scope=tenant))
    assert set(got) == {sha("cached one"), sha("cached two")}
    assert got[sha("cached one")] == pytest.approx(axis(1), abs=1e-6)
    # other dimensions
    assert (
        await store.cached_embeddings(CacheLookup(model, DIMS + 1, wanted, cache_scope=tenant))
        == {}
    )


async def test_the_embedding_cache_is_scoped_by_tenant(store: Store) -> None:
    a, doc_a = ids("scope-a")
    b, doc_b = ids("scope-b")
    model = f"scope-model-{uuid.uuid4().hex[:6]}"
    key = [sha("the same text")]
    await ingest(store, doc_a, a, ["the same text"], [axis(1)], model=model)
    # Another tenant's scope and the shared one hold nothing of a's.
    assert await store.cached_embeddings(CacheLookup(model, DIMS, key, cache_scope=b)) == {}
    assert (
        await store.cached_embeddings(CacheLookup(model, DIMS, key, cache_scope=SHARED_CACHE)) == {}
    )
    assert set(await store.cached_embeddings(CacheLookup(model, DIMS, key, cache_scope=a))) == set(
        key
    )

    # b embeds the same text into the shared cache (embed.share_cache_across_tenants).
    await ingest(store, doc_b, b, ["the same text"], [axis(2)], model=model)
    chunk = make_chunks(["the same text"])[0]
    await store.save_embeddings(EmbeddingSet(
        doc_b, b, "md-v1", model, DIMS, "local", [(0, chunk.text_sha256, axis(2))],
        cache_scope=SHARED_CACHE,
    ))  # fmt: skip
    shared = await store.cached_embeddings(CacheLookup(model, DIMS, key, cache_scope=SHARED_CACHE))
    assert shared[key[0]] == pytest.approx(axis(2), abs=1e-6)

    conn = await asyncpg.connect(store._dsn)
    try:
        rows = await conn.fetch(
            "SELECT tenant_id FROM embedding_cache WHERE model = $1 ORDER BY tenant_id",
            model,
        )
    finally:
        await conn.close()
    assert [r["tenant_id"] for r in rows] == [SHARED_CACHE, a, b]
    assert (await store.count_rows(a))["embedding_cache"] == 1


async def test_the_cache_migration_fills_each_tenants_scope_from_its_own_embeddings(
    fresh_schema: str,
) -> None:
    """A store at version 4 with a shared cache row and two tenants' embeddings of one text."""
    conn = await asyncpg.connect(fresh_schema)
    try:
        await conn.execute(_BOOTSTRAP)
        for m in available_migrations():
            if m.version >= "0005":
                break
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                m.version,
                m.name,
                m.checksum,
            )
        text = sha("cached before the upgrade")
        vector = str(axis(1))
        for tenant in ("t-one", "t-two"):
            doc = f"d-{tenant}"
            await conn.execute(
                "INSERT INTO documents (document_id, tenant_id, sha256, status)"
                " VALUES ($1, $2, 'x', 'embedded')",
                doc,
                tenant,
            )
            await conn.execute(
                "INSERT INTO chunks (document_id, chunker_version, chunk_index, tenant_id, text,"
                " text_sha256, token_count, char_start, char_end) VALUES ($1, 'v', 0, $2, 't',"
                " $3, 1, 0, 1)",
                doc,
                tenant,
                text,
            )
            await conn.execute(
                "INSERT INTO embeddings (document_id, chunker_version, chunk_index, model,"
                " dimensions, tenant_id, text_sha256, provider, embedding)"
                " VALUES ($1, 'v', 0, 'm', $2, $3, $4, 'local', $5::vector)",
                doc,
                DIMS,
                tenant,
                text,
                vector,
            )
        await conn.execute(
            "INSERT INTO embedding_cache (model, dimensions, text_sha256, embedding, provider)"
            " VALUES ('m', $1, $2, $3::vector, 'local')",
            DIMS,
            text,
            vector,
        )
    finally:
        await conn.close()

    applied = await migrate(fresh_schema, dimensions=DIMS)  # 0005, and any later one
    assert applied[0] == "0005" and applied == sorted(applied), applied

    conn = await asyncpg.connect(fresh_schema)
    try:
        rows = await conn.fetch("SELECT tenant_id FROM embedding_cache ORDER BY tenant_id")
        assert [r["tenant_id"] for r in rows] == ["", "t-one", "t-two"]
        with pytest.raises(asyncpg.NotNullViolationError):  # every write names its scope
            await conn.execute(
                "INSERT INTO embedding_cache (model, dimensions, text_sha256, embedding, provider)"
                " VALUES ('m', $1, 'other', $2::vector, 'local')",
                DIMS,
                vector,
            )
    finally:
        await conn.close()


async def test_search_returns_the_nearest_current_chunks_of_one_tenant(store: Store) -> None:
    tenant, doc = ids("search")
    other, other_doc = ids("search-other")
    texts = [f"chunk number {i}" for i in range(6)]
    await ingest(store, doc, tenant, texts, [axis(i) for i in range(6)])
    # The other tenant holds a vector identical to the query: it must never show.
    await ingest(store, other_doc, other, ["secret"], [axis(3)])

    hits = await store.search(tenant, axis(3), MODEL, DIMS, k=3)
    assert hits[0].chunk_index == 3
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].text == "chunk number 3"
    assert hits[0].heading_path == ["Doc", "Intro", "§3"]
    assert hits[0].filename == f"{doc}.md"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == 3
    assert {h.document_id for h in hits} == {doc}
    assert [h.document_id for h in await store.search(other, axis(3), MODEL, DIMS)] == [other_doc]
    assert await store.search(tenant, axis(3), "another-model", DIMS) == []

    # Re-chunked as md-v2: search stays on md-v1 until md-v2 is embedded, then shows only md-v2.
    new = make_chunks(["fresh text"], heading="New")
    await store.save_chunks(ChunkSet(doc, tenant, "md-v2", {}, new))
    await store.advance_status(
        StatusChange(doc, "chunked", current_chunker_version="md-v2", chunk_count=1)
    )
    assert {h.chunker_version for h in await store.search(tenant, axis(0), MODEL, DIMS)} == {
        "md-v1"
    }
    await store.save_embeddings(
        EmbeddingSet(doc, tenant, "md-v2", MODEL, DIMS, "local", [(0, new[0].text_sha256, axis(5))])
    )
    await store.advance_status(StatusChange(
        doc, "embedded", current_chunker_version="md-v2", current_embedding_model=MODEL,
        current_embedding_dimensions=DIMS,
    ))  # fmt: skip
    after = await store.search(tenant, axis(0), MODEL, DIMS, k=10)
    assert [(h.chunker_version, h.text) for h in after] == [("md-v2", "fresh text")]
    assert (await store.count_rows(tenant))["chunks"] == 7  # old versions are kept

    with pytest.raises(PermanentError, match="expected 8 dimensions"):
        await store.search(tenant, [1.0, 2.0], MODEL, DIMS)


def _centroids() -> list[list[float]]:
    rng = random.Random(7)
    return [[rng.gauss(0, 1) for _ in range(BENCH_DIMS)] for _ in range(50)]


def _clustered(rng: random.Random, centroids: list[list[float]]) -> list[float]:
    """Like real embeddings, not uniform noise: a topic's direction plus a little spread."""
    c = rng.choice(centroids)
    return [x + rng.gauss(0, 0.35) for x in c]


async def _bulk_embeddings(store: Store, tenant: str, docs: int, per_doc: int) -> None:
    rng = random.Random(docs * per_doc)
    centroids = _centroids()
    for d in range(docs):
        doc = f"{tenant}-doc{d}"
        texts = [f"{doc} chunk {i}" for i in range(per_doc)]
        await register(store, doc, tenant, doc)
        chunks = make_chunks(texts)
        await store.save_chunks(ChunkSet(doc, tenant, "md-v1", {}, chunks))
        await store.advance_status(StatusChange(doc, "chunked", current_chunker_version="md-v1"))
        rows = [(c.index, c.text_sha256, _clustered(rng, centroids)) for c in chunks]
        await store.save_embeddings(
            EmbeddingSet(doc, tenant, "md-v1", MODEL, BENCH_DIMS, "local", rows)
        )
        await store.advance_status(
            StatusChange(
                doc,
                "embedded",
                current_embedding_model=MODEL,
                current_embedding_dimensions=BENCH_DIMS,
            )
        )


@pytest.mark.slow
async def test_search_uses_the_hnsw_index_and_is_fast(store: Store) -> None:
    tenant, _ = ids("bench")
    started = time.perf_counter()
    await _bulk_embeddings(store, tenant, docs=10, per_doc=1000)
    load_s = time.perf_counter() - started

    # No ANALYZE: the plan must not depend on fresh statistics.
    plan = await store.explain_search(tenant, [0.1] * BENCH_DIMS, MODEL, BENCH_DIMS, k=5)
    assert f"Index Scan using embeddings_hnsw_{BENCH_DIMS}" in plan, plan

    rng = random.Random(11)
    centroids = _centroids()
    latencies = []
    for _ in range(50):
        q = _clustered(rng, centroids)
        t0 = time.perf_counter()
        hits = await store.search(tenant, q, MODEL, BENCH_DIMS, k=5)
        latencies.append((time.perf_counter() - t0) * 1000)
        assert len(hits) == 5
    p50 = statistics.median(latencies)

    # Recall of the approximate search against exact distances, over the same rows.
    found = total = 0
    conn = await asyncpg.connect(store._dsn)
    try:
        await register_vector(conn)
        for _ in range(20):
            q = _clustered(rng, centroids)
            approx = {(h.document_id, h.chunk_index) for h in await store.search(
                tenant, q, MODEL, BENCH_DIMS, k=10
            )}  # fmt: skip
            exact = await conn.fetch(sql.search_sql(BENCH_DIMS, exact=True), tenant, q, MODEL, 10)
            found += len(approx & {(r["document_id"], r["chunk_index"]) for r in exact})
            total += 10
    finally:
        await conn.close()
    recall = found / total
    p95 = sorted(latencies)[int(len(latencies) * 0.95) - 1]
    print(
        f"\n10k x {BENCH_DIMS}d: load {load_s:.1f}s; search k=5 p50 {p50:.2f} ms,"
        f" p95 {p95:.2f} ms; recall@10 {recall:.2f}"
    )
    assert p50 < 100
    assert recall >= 0.8

    # A smaller tenant in that table goes through the index too; the iterative scan skips the
    # big tenant's rows until it has k of its own.
    mid, _ = ids("mid")
    await _bulk_embeddings(store, mid, docs=1, per_doc=2500)
    mid_plan = await store.explain_search(mid, centroids[0], MODEL, BENCH_DIMS, k=10)
    assert f"Index Scan using embeddings_hnsw_{BENCH_DIMS}" in mid_plan, mid_plan
    mid_hits = await store.search(mid, centroids[0], MODEL, BENCH_DIMS, k=10)
    assert len(mid_hits) == 10
    assert {h.document_id for h in mid_hits} == {f"{mid}-doc0"}

    # A tenant with a handful of rows is searched exactly: no index needed.
    small, _ = ids("small")
    await _bulk_embeddings(store, small, docs=1, per_doc=3)
    assert len(await store.search(small, centroids[0], MODEL, BENCH_DIMS, k=3)) == 3
    small_plan = await store.explain_search(small, centroids[0], MODEL, BENCH_DIMS)
    assert "embeddings_hnsw" not in small_plan, small_plan


@pytest.mark.slow
async def test_save_chunks_of_a_thousand_rows(store: Store) -> None:
    tenant, doc = ids("chunks1k")
    await register(store, doc, tenant, doc)
    chunks = make_chunks([f"chunk {i} " + "lorem ipsum " * 60 for i in range(1000)])
    t0 = time.perf_counter()
    assert (
        await store.save_chunks(ChunkSet(doc, tenant, "md-v1", {"max_tokens": 400}, chunks)) == 1000
    )
    first_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    assert await store.save_chunks(ChunkSet(doc, tenant, "md-v1", {"max_tokens": 400}, chunks)) == 0
    again_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    loaded = await store.load_chunks(doc, "md-v1")
    load_ms = (time.perf_counter() - t0) * 1000
    assert loaded == chunks
    print(
        f"\nsave_chunks 1000 rows: {first_ms:.0f} ms; redelivered: {again_ms:.0f} ms;"
        f" load_chunks: {load_ms:.0f} ms"
    )
    assert first_ms < 2000


# -- journey and summary -------------------------------------------------------------------------


async def test_journey_by_document_or_correlation_id(store: Store) -> None:
    tenant, doc = ids("journey")
    await ingest(store, doc, tenant, ["a", "b"], [axis(0), axis(1)])
    base = NOW
    steps = [
        ("parse", "e1", "ok", 1, 0),
        ("chunk", "e2", "retry", 1, 10),
        ("chunk", "e2", "ok", 2, 20),
        ("embed", "e3", "ok", 1, 30),
    ]
    for _ in range(2):  # redelivered: no new rows
        for stage, event, outcome, attempt, at in steps:
            started = base + timedelta(seconds=at)
            await store.record_step(
                doc, tenant, stage, event, outcome, attempt, started,
                started + timedelta(milliseconds=125), {"error_class": None}, f"corr-{doc}",
            )  # fmt: skip

    journey = await store.journey(doc)
    assert journey is not None
    assert journey.document.document_id == doc
    assert [(s.stage, s.outcome, s.attempt) for s in journey.steps] == [
        (stage, outcome, attempt) for stage, _, outcome, attempt, _ in steps
    ]
    assert journey.steps[0].duration_ms == pytest.approx(125.0)
    by_corr = await store.journey(f"corr-{doc}")
    assert by_corr is not None
    assert by_corr.document.document_id == doc
    assert await store.journey("no-such-document") is None

    summary = await store.summary(tenant)
    assert summary["by_status"] == {"embedded": 1}
    assert (summary["documents"], summary["pages"], summary["chunks"], summary["embeddings"]) == (
        1,
        1,
        2,
        2,
    )
    assert (await store.summary())["documents"] >= 1


# -- errors ------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_database_is_unavailable_infrastructure() -> None:
    with pytest.raises(InfrastructureUnavailable, match="database unavailable") as caught:
        await Store.connect(
            f"postgresql://postgres@127.0.0.1:{_closed_port()}/x", connect_timeout=2
        )
    assert caught.value.dependency == "postgres"
    with pytest.raises(InfrastructureUnavailable):
        await migrate(f"postgresql://postgres@127.0.0.1:{_closed_port()}/x")


async def test_unknown_database_is_a_config_error(migrated: str) -> None:
    base = migrated.rsplit("/", 1)[0]
    with pytest.raises(ConfigError, match=r"postgres\.url"):
        await Store.connect(f"{base}/no_such_db_{uuid.uuid4().hex[:6]}")


async def test_a_lost_connection_is_unavailable_infrastructure(migrated: str) -> None:
    async with await Store.connect(migrated, min_size=1, max_size=2) as s:
        with pytest.raises(InfrastructureUnavailable, match="connection"):
            async with s.transaction() as tx:
                pid = await tx._connection.fetchval("SELECT pg_backend_pid()")
                killer = await asyncpg.connect(migrated)
                try:
                    await killer.execute("SELECT pg_terminate_backend($1)", pid)
                finally:
                    await killer.close()
                await tx.get_document("whatever")
        assert await s.get_document("whatever") is None  # the pool replaced the connection


async def test_bad_data_is_permanent(store: Store) -> None:
    tenant, doc = ids("bad")
    await register(store, doc, tenant, "bad")
    with pytest.raises(PermanentError, match="0x00"):
        await store.save_parse(
            ParsedContent(doc, tenant, "s", "local", "1", "nul \x00 byte", 1, None)
        )
    await store.save_chunks(ChunkSet(doc, tenant, "v1", {}, make_chunks(["t"])))
    with pytest.raises(PermanentError, match="expected 8 dimensions, got 3"):
        await store.save_embeddings(
            EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local", [(0, sha("t"), [1, 2, 3])])
        )
    with pytest.raises(PermanentError, match="NaN"):
        await store.save_embeddings(
            EmbeddingSet(
                doc, tenant, "v1", MODEL, DIMS, "local", [(0, sha("t"), [math.nan] * DIMS)]
            )
        )
    with pytest.raises(PermanentError, match="ForeignKeyViolation"):  # chunks of no document
        await store.save_chunks(ChunkSet("never-registered", tenant, "v1", {}, make_chunks(["t"])))


def test_error_classes_map_to_what_the_caller_must_do() -> None:
    exc = asyncpg.exceptions
    for retryable in (
        exc.SerializationError("could not serialize access"),
        exc.DeadlockDetectedError("deadlock detected"),
        exc.LockNotAvailableError("could not obtain lock"),
        exc.QueryCanceledError("canceling statement due to statement timeout"),
    ):
        translated = translate(retryable)
        assert type(translated) is RetryableError, retryable
    for unavailable in (
        exc.TooManyConnectionsError("too many clients"),
        exc.CannotConnectNowError("the database system is starting up"),
        exc.AdminShutdownError("terminating connection"),
        exc.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        exc.InterfaceError("cannot call Connection.fetch(): connection is closed"),
        exc.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "refused"),
        ConnectionResetError(104, "reset"),
        TimeoutError(),
    ):
        translated = translate(unavailable)
        assert isinstance(translated, InfrastructureUnavailable), unavailable
        assert translated.dependency == "postgres"
    for permanent in (
        exc.CharacterNotInRepertoireError("invalid byte sequence"),
        exc.CheckViolationError("violates check constraint"),
        exc.DataError("invalid input for query argument $1"),
    ):
        assert type(translate(permanent)) is PermanentError, permanent
    bug = TypeError("a bug")
    assert translate(bug) is bug


async def test_a_unique_violation_in_an_idempotent_write_is_run_again() -> None:
    class Racer:
        _can_rerun = True
        calls = 0

        @translate_errors
        async def write(self) -> str:
            self.calls += 1
            if self.calls == 1:
                raise asyncpg.exceptions.UniqueViolationError("duplicate key value")
            return "done"

    racer = Racer()
    assert await racer.write() == "done"
    assert racer.calls == 2

    in_tx = Racer()
    in_tx._can_rerun = False
    in_tx.calls = 0

    @translate_errors
    async def once(owner: Racer) -> str:
        raise asyncpg.exceptions.UniqueViolationError("duplicate key value")

    with pytest.raises(UniqueViolation) as info:
        await once(in_tx)
    assert isinstance(info.value, RetryableError)


async def test_a_journey_is_found_by_the_start_of_its_id(store: Store) -> None:
    """The tables show ids cut short (8 characters): `doc` takes any start that only one
    document id has, and names the candidates when several have it."""
    tenant, doc = ids("prefix")
    first, second = f"{doc}-1a", f"{doc}-2b"
    for d in (first, second):
        await register(store, d, tenant, d)
    found = await store.journey(f"{doc}-1")
    assert found is not None and found.document.document_id == first
    with pytest.raises(ConfigError, match="several document ids") as info:
        await store.journey(doc)
    assert first in str(info.value) and second in str(info.value)
    assert await store.journey(f"{doc}-3") is None
    assert await store.journey("d-p") is None  # under 4 characters: no prefix search
    assert (
        await store.journey(doc.replace("-", "_", 1)[:6] + "%") is None
    )  # LIKE characters are literal


async def test_batches_at_once_that_cache_the_same_texts_crosswise_both_commit(
    store: Store, migrated: str
) -> None:
    """Two batches embed the same two texts in opposite orders. Written as each document is
    saved, the second batch would wait on the first's row while the first waited on its own:
    a deadlock, one batch failed after a second. A batch's cache rows are written when it
    ends, in key order, so both commit; its own lookups see them meanwhile, others only after."""
    tenant, doc = ids("crosswise")
    x, y = sha("text x"), sha("text y")
    a_first, b_first = asyncio.Event(), asyncio.Event()

    def saving(document_id: str, text_sha: str, n: int) -> EmbeddingSet:
        return EmbeddingSet(
            document_id, tenant, "v1", MODEL, DIMS, "local", [(0, text_sha, axis(n))]
        )

    async with await Store.connect(migrated, min_size=1, max_size=2) as other:
        lookup = CacheLookup(MODEL, DIMS, [x, y], cache_scope=tenant)

        async def batch_a() -> None:
            async with store.batch():
                await store.save_embeddings(saving(f"{doc}-a1", x, 1))
                assert set(await store.cached_embeddings(lookup)) == {x}  # its own, pending
                assert await other.cached_embeddings(lookup) == {}  # not before it commits
                a_first.set()
                await asyncio.wait_for(b_first.wait(), 10)
                await store.save_embeddings(saving(f"{doc}-a2", y, 2))

        async def batch_b() -> None:
            async with store.batch():
                await asyncio.wait_for(a_first.wait(), 10)
                await store.save_embeddings(saving(f"{doc}-b1", y, 2))
                b_first.set()
                await store.save_embeddings(saving(f"{doc}-b2", x, 1))

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(batch_a(), batch_b()), 30)
        assert time.monotonic() - started < 1.0  # no wait for PostgreSQL's deadlock check
        cached = await other.cached_embeddings(lookup)
    assert set(cached) == {x, y}
    assert cached[y] == pytest.approx(axis(2))


async def test_batches_at_once_that_hit_the_same_cached_texts_crosswise_both_commit(
    store: Store,
) -> None:
    """Two batches look up the same two cached texts in opposite orders. A lookup that locked
    the rows it hit (to count hits) made this a deadlock; lookups are plain reads."""
    tenant, doc = ids("hits")
    x, y = sha("hit x"), sha("hit y")
    await store.save_embeddings(
        EmbeddingSet(doc, tenant, "v1", MODEL, DIMS, "local", [(0, x, axis(1)), (1, y, axis(2))])
    )
    a_first, b_first = asyncio.Event(), asyncio.Event()

    def lookup(text_sha: str) -> CacheLookup:
        return CacheLookup(MODEL, DIMS, [text_sha], cache_scope=tenant)

    async def batch(first: str, second: str, mine: asyncio.Event, theirs: asyncio.Event) -> int:
        async with store.batch():
            found = await store.cached_embeddings(lookup(first))
            mine.set()
            await asyncio.wait_for(theirs.wait(), 10)
            found |= await store.cached_embeddings(lookup(second))
        return len(found)

    started = time.monotonic()
    hits = await asyncio.wait_for(
        asyncio.gather(batch(x, y, a_first, b_first), batch(y, x, b_first, a_first)), 30
    )
    assert hits == [2, 2]
    assert time.monotonic() - started < 1.0  # no wait for PostgreSQL's deadlock check
