"""Tenants and the door: other systems publish uploads straight to Kafka, so every field of an
upload event is hostile input.

Attackers here publish as another system would: a raw AIOKafkaProducer and the project's codec.
Each test runs the real stage workers against the session's broker and PostgreSQL, with one
partition per topic so the good documents published after the bad records sit behind them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from pipeline_helpers import (
    assert_refused,
    dead_letters,
    end_offsets,
    hostile_claim_checks,
    make_large_text,
    publish_raw,
    read_topic,
    variant,
    wait_for_statuses,
    workers,
)

from producers.upload import Uploader, UploadRejected, upload_paths
from ragstream.admin import ensure_topics
from ragstream.blobs import TENANTS_DIR, BlobStore
from ragstream.codec import Codec
from ragstream.events import (
    DocumentChunked,
    DocumentEmbedded,
    DocumentParsed,
    DocumentUploaded,
)
from ragstream.search import search_chunks
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import (
    H_ATTEMPT,
    H_DUE_AT,
    H_ERR_CLASS,
    H_ERR_KIND,
    H_ERR_MESSAGE,
    Stage,
    Topology,
)

pytestmark = pytest.mark.integration


def one_partition(settings: Settings) -> Settings:
    return variant(settings, kafka={"partitions": 1})


def inline_upload(tenant: str, data: bytes, filename: str = "notes.md", **changes: Any) -> Any:
    event = DocumentUploaded(
        document_id=str(uuid.uuid4()),
        tenant_id=tenant,
        correlation_id=str(uuid.uuid4()),
        filename=filename,
        content_type="text/markdown",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content=data,
        source_system="another-system",
    )
    return dataclasses.replace(event, **changes)


def good_text(n: int) -> bytes:
    return f"# Good document {n}\n\nPublished right after a bad record; it goes through.\n".encode()


# -- claim checks belong to a tenant -------------------------------------------------------------


async def test_a_claim_check_of_another_tenant_is_dead_lettered_and_its_text_never_reaches_b(
    settings: Settings, prefix: str, store: Store, tmp_path: Path
) -> None:
    one = one_partition(settings)
    await ensure_topics(one)
    topology = Topology(prefix)
    a, b = f"{prefix}-a", f"{prefix}-b"
    report = make_large_text(tmp_path / "a" / "board-minutes.txt", 100_000, seed=14)
    sentence = report.read_text().split("\n\n")[3].split(". ")[0]
    b_notes = tmp_path / "b" / "b-notes.md"
    b_notes.parent.mkdir()
    b_notes.write_text("# Tenant B's notes\n\nOur own plans for the garden shed.\n")

    async with workers(one, concurrency=1):
        (mine,), _ = await upload_paths(one, [report], tenant_id=a)
        assert not mine.inline, "over the inline limit: a claim check"
        await wait_for_statuses(store, [mine.document_id], 60)
        a_doc = await store.get_document(mine.document_id)
        a_journey = await store.journey(mine.document_id)
        assert a_doc is not None and a_doc.status == "embedded" and a_doc.source_uri
        assert a_journey is not None
        a_path = Path(unquote(urlsplit(a_doc.source_uri).path))
        blobs = BlobStore.from_settings(one)
        assert a_path.parent.parent == blobs.root / TENANTS_DIR / a

        # Tenant B's attacker knows A's claim check (it is on the uploaded topic for anyone
        # who reads it) and tries every way to it from B's area.
        b_area = blobs.root / TENANTS_DIR / b
        b_area.mkdir(parents=True)
        (b_area / "minutes.txt").symlink_to(a_path)
        rel = f"{a_path.parent.name}/{a_path.name}"
        attacks = {
            "as published": (a_doc.source_uri, "outside tenant"),
            "dot-dot": (f"file://{b_area}/../{a}/{rel}", "without '.' or '..' parts"),
            "percent-encoded": (f"file://{b_area}/%2e%2e/{a}/{rel}", "without '.' or '..' parts"),
            "symbolic link": ((b_area / "minutes.txt").as_uri(), "through a symbolic link"),
            "host": (f"file://fileserver{a_path}", "names no host"),
        }
        stolen = hostile_claim_checks(
            b,
            {name: uri for name, (uri, _) in attacks.items()},
            size_bytes=mine.size_bytes,
            sha256=mine.sha256,
        )
        # ...and B reuses A's document id for a document of its own.
        reuse = inline_upload(
            b, b"# Mine now\n\nB's text.\n", document_id=mine.document_id, correlation_id="reuse"
        )
        await publish_raw(
            one,
            [
                *((e.document_id.encode(), e) for e in stolen.values()),
                (reuse.document_id.encode(), reuse),
            ],
        )
        # ...and, were it let write to the later stages' topics, forges their events for A's
        # document: refused before any work (no paid embedding call on A's chunks).
        key = mine.document_id.encode()
        ref = {"document_id": mine.document_id, "tenant_id": b, "uploaded_at": a_doc.created_at}
        parsed = DocumentParsed(
            **ref, correlation_id="forged-parsed", parser="local", parser_version="local-1",
            source_sha256=mine.sha256, content_sha256=a_doc.current_parse_sha256 or "",
            page_count=1, char_count=1,
        )  # fmt: skip
        chunked = DocumentChunked(
            **ref, correlation_id="forged-chunked", content_sha256=parsed.content_sha256,
            chunker_version=a_doc.current_chunker_version or "", chunk_count=a_doc.chunk_count or 0,
            token_count=1,
        )  # fmt: skip
        await publish_raw(one, [(key, parsed)], topology.parsed)
        await publish_raw(one, [(key, chunked)], topology.chunked)
        (good,), _ = await upload_paths(one, [b_notes], tenant_id=b)  # behind them all
        docs = await wait_for_statuses(store, [good.document_id], 60)
        assert docs[good.document_id].status == "embedded"
        dlq = await read_topic(one, topology.dlq, at_least=len(attacks) + 3)

    letters = dead_letters(dlq)
    assert_refused(letters, {name: rule for name, (_, rule) in attacks.items()})
    for name, event in stolen.items():
        assert await store.get_document(event.document_id) is None, (
            "refused before any write",
            name,
        )
    conflict = letters["reuse"]
    assert conflict[H_ERR_CLASS] == "TenantConflict"
    assert f"document_id {mine.document_id!r} belongs to another tenant" in conflict[H_ERR_MESSAGE]
    assert a not in conflict[H_ERR_MESSAGE].replace(b, ""), "the owner is not named"
    for forged in ("forged-parsed", "forged-chunked"):
        assert letters[forged][H_ERR_CLASS] == "TenantConflict", letters[forged]

    # A's document and journey are as they were; B's search finds nothing of A's.
    assert await store.get_document(mine.document_id) == a_doc
    after = await store.journey(mine.document_id)
    assert after is not None and after.steps == a_journey.steps
    assert (await search_chunks(one, sentence, a))[0].document_id == mine.document_id
    b_hits = await search_chunks(one, sentence, b, k=50)
    assert {h.document_id for h in b_hits} == {good.document_id}
    assert not any(sentence in h.text for h in b_hits)


# -- the door ----------------------------------------------------------------------------------


async def test_uploads_breaking_a_rule_are_dead_lettered_naming_the_field_and_the_pipeline_goes_on(
    settings: Settings, tenant: str, store: Store
) -> None:
    one = one_partition(settings)
    await ensure_topics(one)
    topology = Topology(one.kafka.topic_prefix)
    data = b"# Hostile\n\nA record another system got wrong.\n"
    cases: dict[str, tuple[bytes | None, DocumentUploaded, str]] = {}

    def case(name: str, expected: str, key: bytes | None = b"", **changes: Any) -> None:
        event = inline_upload(tenant, data, correlation_id=f"case-{name}", **changes)
        cases[name] = (event.document_id.encode() if key == b"" else key, event, expected)

    case("key", "invalid record key: 'someone-else' is not the document_id", key=b"someone-else")
    case("no key", "invalid record key: missing", key=None)
    case("filename", "invalid filename: contains a NUL byte", filename="minutes\x00.md")
    case("tenant", "invalid tenant_id: contains a NUL byte", tenant_id=f"{tenant}\x00")
    case("tenant path", "invalid tenant_id: '../other'", tenant_id="../other")
    case(
        "oversized",
        "invalid metadata['note']: 5000 characters, must be 0 to 4096",
        metadata={"note": "x" * 5000},
    )
    case("document id", "invalid document_id: 129 characters", document_id="d" * 129)
    case("content type", "invalid content_type: 'image/png'", content_type="image/png")
    case(
        "size",
        f"invalid content: {len(data)} bytes, but size_bytes says {len(data) + 1}",
        size_bytes=len(data) + 1,
    )

    records: list[tuple[bytes | None, DocumentUploaded]] = []
    goods = []
    for n, (key, event, _) in enumerate(cases.values()):
        good = inline_upload(tenant, good_text(n), correlation_id=f"good-{n}")
        records += [(key, event), (good.document_id.encode(), good)]
        goods.append(good.document_id)
    async with workers(one, concurrency=1):
        await publish_raw(one, records)
        docs = await wait_for_statuses(store, goods, 60)
    assert {d.status for d in docs.values()} == {"embedded"}, "each good record behind a bad one"

    letters = dead_letters(await read_topic(one, topology.dlq, at_least=len(cases)))
    assert set(letters) == {f"case-{name}" for name in cases}
    for name, (_, event, expected) in cases.items():
        headers = letters[f"case-{name}"]
        assert headers[H_ERR_CLASS] == "InvalidEvent", (name, headers)
        assert headers[H_ERR_KIND] == "permanent"
        assert headers[H_ERR_MESSAGE].startswith(expected), (name, headers[H_ERR_MESSAGE])
        if len(event.document_id) <= 128:
            assert await store.get_document(event.document_id) is None, name


async def test_the_uploader_refuses_what_the_door_refuses_before_storing_or_publishing(
    settings: Settings, tenant: str
) -> None:
    await ensure_topics(settings)
    large = b"a line of a large document\n" * 4000  # over the inline limit: it would be a blob
    refusals = [
        ({"tenant_id": "../other"}, "invalid tenant_id: '../other'"),
        ({"tenant_id": "a/b"}, "invalid tenant_id: 'a/b'"),
        ({"filename": "minutes\x00.txt"}, "invalid filename: contains a NUL byte"),
        ({"metadata": {"note": "x" * 5000}}, "invalid metadata['note']: 5000 characters"),
        ({"document_id": "../../etc"}, "invalid document_id"),
    ]
    async with Uploader(settings) as uploader:
        for changes, expected in refusals:
            kwargs: dict[str, Any] = {"tenant_id": tenant, "filename": "report.txt", **changes}
            filename = kwargs.pop("filename")
            with pytest.raises(UploadRejected) as caught:
                await uploader.upload_bytes(large, filename, **kwargs)
            assert expected in str(caught.value), (changes, str(caught.value))
    offsets = await end_offsets(settings, Topology(settings.kafka.topic_prefix).uploaded)
    assert sum(offsets.values()) == 0, "nothing was published"
    assert not [p for p in settings.blob_root().rglob("*") if p.is_file()], "nothing was stored"


# -- the embedding cache -----------------------------------------------------------------------


async def cache_rows(settings: Settings, scopes: Sequence[str], shas: Sequence[str]) -> list[Any]:
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        return list(
            await conn.fetch(
                "SELECT tenant_id FROM embedding_cache"
                " WHERE tenant_id = ANY($1::text[]) AND text_sha256 = ANY($2::text[])",
                list(scopes),
                list(shas),
            )
        )
    finally:
        await conn.close()


async def embed_in_turn(
    settings: Settings, store: Store, tenants: Sequence[str], data: bytes
) -> dict[str, DocumentEmbedded]:
    """The same bytes uploaded by each tenant in turn, each embedded before the next."""
    out: dict[str, DocumentEmbedded] = {}
    ids = {}
    async with workers(settings), Uploader(settings) as uploader:
        for t in tenants:
            receipt = await uploader.upload_bytes(data, "handbook.md", tenant_id=t)
            ids[receipt.document_id] = t
            await wait_for_statuses(store, [receipt.document_id], 60)
    topic = Topology(settings.kafka.topic_prefix).embedded
    for d in await read_topic(settings, topic, at_least=len(tenants)):
        assert isinstance(d.event, DocumentEmbedded)
        out[ids[d.document_id]] = d.event
    return out


async def test_the_same_text_is_embedded_for_each_tenant_unless_the_cache_is_shared(
    settings: Settings, prefix: str, store: Store
) -> None:
    await ensure_topics(settings)
    data = (
        f"# Handbook {prefix}\n\nThe same words, uploaded by two tenants. Each gets its own "
        "vectors; neither learns that the other holds this text.\n"
    ).encode()
    a, b = f"{prefix}-a", f"{prefix}-b"
    embedded = await embed_in_turn(settings, store, [a, b], data)
    for t in (a, b):
        e = embedded[t]
        assert (e.new_embeddings, e.cached_embeddings) == (e.chunk_count, 0), t
    docs = {t: await store.journey(e.document_id) for t, e in embedded.items()}
    shas = [
        c.text_sha256
        for c in await store.load_chunks(embedded[b].document_id, embedded[b].chunker_version)
    ]
    rows = await cache_rows(settings, [a, b, ""], shas)
    assert sorted(r["tenant_id"] for r in rows) == sorted([a] * len(shas) + [b] * len(shas)), (
        "each tenant cached its own rows (and nothing went to the shared cache)"
    )
    assert all(j is not None and j.steps[-1].detail["cached"] == 0 for j in docs.values())

    # Shared by the operator: the second tenant's text comes from the first one's embedding.
    shared = variant(
        settings,
        kafka={"topic_prefix": f"{prefix}s"},
        embed={"share_cache_across_tenants": True},
    )
    await ensure_topics(shared)
    c, d = f"{prefix}-c", f"{prefix}-d"
    embedded = await embed_in_turn(shared, store, [c, d], data)
    assert (embedded[c].new_embeddings, embedded[c].cached_embeddings) == (len(shas), 0)
    assert (embedded[d].new_embeddings, embedded[d].cached_embeddings) == (0, len(shas))
    rows = await cache_rows(settings, [c, d, ""], shas)
    assert sorted(r["tenant_id"] for r in rows) == [""] * len(shas)  # the shared rows alone


async def test_crafted_retry_headers_neither_stop_the_worker_nor_hold_a_partition(
    settings: Settings, prefix: str, store: Store
) -> None:
    """The runtime's own retry headers (attempt, due time) arrive from anyone who can publish:
    garbage, a negative or huge attempt, a due time that never comes. Each record is handled
    as if the header were absent (or due now) and the worker goes on."""
    one = one_partition(settings)
    await ensure_topics(one)
    topology = Topology(prefix)
    codec = Codec()
    crafted = [
        (topology.uploaded, [(H_ATTEMPT, b"abc")]),
        (topology.uploaded, [(H_ATTEMPT, b"\xff\xfe")]),
        (topology.uploaded, [(H_ATTEMPT, b"-5")]),
        (topology.uploaded, [(H_ATTEMPT, b"9" * 40)]),
        (topology.retry(Stage.PARSE), [(H_ATTEMPT, b"2"), (H_DUE_AT, b"soon")]),
        (topology.retry(Stage.PARSE), [(H_DUE_AT, str(4_102_444_800_000).encode())]),  # 2100
        (topology.retry(Stage.PARSE), [(H_DUE_AT, b"\x00\x01")]),
    ]
    events = [inline_upload(prefix, good_text(n), f"crafted-{n}.md") for n in range(len(crafted))]
    producer = AIOKafkaProducer(**one.kafka.client_options(), acks="all")
    await producer.start()
    try:
        for (topic, extra), event in zip(crafted, events, strict=True):
            await producer.send_and_wait(
                topic,
                codec.encode(event),
                key=event.document_id.encode(),
                headers=[*codec.headers_for(event), *extra],
            )
    finally:
        await producer.stop()
    async with workers(one, concurrency=1):
        done = await wait_for_statuses(store, [e.document_id for e in events], 90)
    assert {d.status for d in done.values()} == {"embedded"}, {
        d.filename: (d.status, d.status_reason) for d in done.values()
    }
