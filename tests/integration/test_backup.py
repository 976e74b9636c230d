"""`ragstream backup`, `restore` and `prune` as an operator runs them (real `python -m
ragstream` processes) against the session's broker and PostgreSQL.

The round trip: documents through the pipeline, a mode, a throttle state and a budget set, a
backup; then a restore into a fresh database with the groups' offsets lost (they come back as
they were), and one into a fresh database under a fresh prefix (the topics' records are gone:
offsets clamped, with a warning). Rows, search and control state must be what they were.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka import TopicPartition
from pipeline_helpers import (
    committed_offsets,
    make_corpus,
    make_large_text,
    ragstream,
    reset_group_to_earliest,
    variant,
    wait_for_statuses,
    wait_until,
    workers,
)

from producers.upload import upload_paths
from ragstream.admin import ensure_topics
from ragstream.control import publish_control, publish_mode, snapshot, throttle_key
from ragstream.events import ServiceMode, ThrottleEvent, ThrottleState
from ragstream.search import search
from ragstream.settings import Settings
from ragstream.status import flow_groups
from ragstream.store import Store
from ragstream.store.migrate import migrate
from ragstream.topology import Stage, Topology

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "glacier hiking granite fjord"


@asynccontextmanager
async def fresh_database(settings: Settings, name: str) -> AsyncIterator[Settings]:
    """`settings` pointing at a new, empty database `name` on the same server (dropped after)."""
    parts = urlsplit(settings.postgres.dsn())
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield variant(settings, postgres={"url": urlunsplit(parts._replace(path=f"/{name}"))})
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def rows_per_table(settings: Settings) -> dict[str, int]:
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        names = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        return {
            r["tablename"]: int(await conn.fetchval(f'SELECT count(*) FROM "{r["tablename"]}"'))
            for r in names
        }
    finally:
        await conn.close()


def _nonzero(offsets: dict[str, dict[TopicPartition, int]]) -> dict[str, dict[TopicPartition, int]]:
    return {g: {tp: o for tp, o in by_tp.items() if o} for g, by_tp in offsets.items()}


async def group_offsets(settings: Settings) -> dict[str, dict[TopicPartition, int]]:
    groups = flow_groups(Topology(settings.kafka.topic_prefix))
    return {g.name: await committed_offsets(settings, g.group_id) for g in groups}


def one_line_error(code: int, err: str, expected_code: int = 1) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


async def test_a_backup_restores_documents_search_control_state_and_offsets(
    own_database: Settings, tenant: str, tmp_path: Path
) -> None:
    settings = own_database
    paths = make_corpus(tmp_path / "docs", 5)
    paths.append(make_large_text(tmp_path / "docs" / "large-report.txt", 80_000))  # a blob
    await ensure_topics(settings)
    async with workers(settings), await Store.connect(settings.postgres.dsn()) as store:
        receipts, rejected = await upload_paths(settings, paths, tenant_id=tenant)
        assert rejected == []
        await wait_for_statuses(store, [r.document_id for r in receipts], 90)
        await store.set_budget("openai", None, daily_usd=Decimal("7.50"))
    await publish_mode(settings, "openai", "hybrid", reason="backup drill")
    throttle = ThrottleEvent(
        service="llamaparse", state=ThrottleState.THROTTLED, reason="drill", window="day",
        spent_usd=Decimal("5"), budget_usd=Decimal("5"), requests=3, request_budget=100,
    )  # fmt: skip
    await publish_control(settings, throttle_key("llamaparse"), throttle)
    before_rows = await rows_per_table(settings)
    before_offsets = await group_offsets(settings)
    before_hit = (await search(settings, QUESTION, tenant, 3)).hits[0]
    assert before_rows["documents"] == len(paths) and before_rows["embeddings"] > 0
    assert sum(before_offsets["embed"].values()) >= len(paths)

    backup_dir = tmp_path / "backup"
    code, out, err = await ragstream(settings, "backup", str(backup_dir))
    assert code == 0, err
    assert "backup written to" in out
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    for name in ("postgres.dump", "offsets.json", "control.json", "blobs-elsewhere.json"):
        assert name in listed
    blobs = [p for p in listed if p.startswith(f"blobs/tenants/{tenant}/")]
    assert len(blobs) == 1
    for path, entry in listed.items():
        data = (backup_dir / path).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry["sha256"], entry["size"])
    assert manifest["postgres"]["tables"] == before_rows
    uploaded = Topology(settings.kafka.topic_prefix).uploaded
    ends = manifest["kafka"]["topics"][uploaded]
    assert sum(end for _, end in ends.values()) == len(paths)
    assert manifest["ragstream_version"] and manifest["finished_at"]

    # The groups lose their offsets (as if reset); the database is restored into a fresh one.
    for group in flow_groups(Topology(settings.kafka.topic_prefix)):
        for topic in {tp.topic for tp in before_offsets[group.name]}:
            await reset_group_to_earliest(settings, group.group_id, topic)
    assert sum(sum(o.values()) for o in (await group_offsets(settings)).values()) == 0
    async with fresh_database(settings, f"{settings.kafka.topic_prefix}_a") as target:
        code, out, err = await ragstream(target, "restore", str(backup_dir))
        assert code == 0, err
        assert await rows_per_table(target) == before_rows
        hit = (await search(target, QUESTION, tenant, 3)).hits[0]
        assert (hit.document_id, hit.chunk_index, hit.text) == (
            before_hit.document_id, before_hit.chunk_index, before_hit.text,
        )  # fmt: skip
        assert hit.score == pytest.approx(before_hit.score)
        # (The reset above committed 0 on partitions the groups had never committed: the
        # same position, the log's start, so 0 and none compare equal.)
        assert _nonzero(await group_offsets(target)) == _nonzero(before_offsets)
        async with await Store.connect(target.postgres.dsn()) as restored:
            (budget,) = await restored.budget_overrides()
            assert (budget.service, budget.daily_usd) == ("openai", Decimal("7.50"))

        # A second restore into the same database is refused: it holds data now.
        code, out, err = await ragstream(target, "restore", str(backup_dir))
        line = one_line_error(code, err)
        assert "is not empty (" in line and "--force" in line

    # A fresh prefix (its topics do not exist: the records are gone) and a fresh data directory.
    other = variant(
        settings,
        kafka={"topic_prefix": f"{settings.kafka.topic_prefix}b"},
        devstack={"data_dir": str(tmp_path / "elsewhere")},
    )
    async with fresh_database(other, f"{settings.kafka.topic_prefix}_b") as target:
        code, out, err = await ragstream(target, "restore", str(backup_dir))
        assert code == 0, err
        flat = " ".join(err.split())
        assert "beyond the log end" in flat and "are gone" in flat, err
        assert "blobs.root" in flat, err
        assert await rows_per_table(target) == before_rows
        offsets = await group_offsets(target)
        assert offsets["embed"] and set(offsets["embed"].values()) == {0}
        assert {tp.topic for tp in offsets["parse"]} <= {
            Topology(other.kafka.topic_prefix).uploaded,
            Topology(other.kafka.topic_prefix).retry(Stage.PARSE),
        }
        state = await snapshot(target)
        assert state.mode("openai") is ServiceMode.HYBRID
        assert state.throttled("llamaparse") and not state.throttled("openai")
        restored_blob = tmp_path / "elsewhere" / blobs[0]  # <data_dir>/blobs/tenants/...
        assert restored_blob.read_bytes() == (backup_dir / blobs[0]).read_bytes()


async def test_bad_input_and_a_damaged_or_foreign_backup_get_one_line(
    own_database: Settings, tmp_path: Path
) -> None:
    settings = own_database
    await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    await ensure_topics(settings)
    backup_dir = tmp_path / "backup"
    code, _, err = await ragstream(settings, "backup", str(backup_dir))
    assert code == 0, err

    # Into a directory that holds something: refused, nothing written there.
    code, _, err = await ragstream(settings, "backup", str(backup_dir))
    assert "is not empty" in one_line_error(code, err, 2)
    # The database unreachable: one line, and the half-written backup directory is gone.
    unreachable = variant(settings, postgres={"url": "postgresql://postgres:pw@127.0.0.1:1/x"})
    code, _, err = await ragstream(unreachable, "backup", str(tmp_path / "half"))
    assert "cannot reach PostgreSQL at" in one_line_error(code, err)
    assert not (tmp_path / "half").exists()

    async with fresh_database(settings, f"{settings.kafka.topic_prefix}_c") as target:
        # One byte of the dump changed, the size the same: refused before anything is touched.
        dump = backup_dir / "postgres.dump"
        data = bytearray(dump.read_bytes())
        data[len(data) // 2] ^= 0xFF
        dump.write_bytes(bytes(data))
        code, _, err = await ragstream(target, "restore", str(backup_dir))
        line = one_line_error(code, err)
        assert "is damaged" in line and "postgres.dump: sha256 differs" in line
        assert "nothing was restored" in line
        assert await rows_per_table(target) == {}

        # Not a backup: a directory without a manifest, and one that does not exist.
        code, _, err = await ragstream(target, "restore", str(tmp_path / "docs-not-a-backup"))
        assert "does not exist" in one_line_error(code, err, 2)
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "notes.txt").write_text("hello")
        code, _, err = await ragstream(target, "restore", str(tmp_path / "plain"))
        assert "is not a ragstream backup" in one_line_error(code, err, 2)
        (backup_dir / "manifest.json").write_text('{"format": "something-else"}')
        code, _, err = await ragstream(target, "restore", str(backup_dir))
        assert "is not a ragstream backup" in one_line_error(code, err, 2)


# -- pruning -----------------------------------------------------------------------------------


async def version_rows(settings: Settings) -> dict[tuple[str, str], int]:
    """(kind, chunker version) -> rows, chunks and embeddings."""
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        out = {}
        for kind in ("chunks", "embeddings"):
            for r in await conn.fetch(
                f"SELECT chunker_version, count(*) AS n FROM {kind} GROUP BY 1"
            ):
                out[(kind, r["chunker_version"])] = int(r["n"])
        return out
    finally:
        await conn.close()


async def test_prune_removes_versions_nothing_points_at_and_dry_run_only_counts(
    own_database: Settings, tenant: str, tmp_path: Path
) -> None:
    settings = own_database
    paths = make_corpus(tmp_path / "docs", 3, kinds=(".md",))
    topology = Topology(settings.kafka.topic_prefix)
    await ensure_topics(settings)
    async with await Store.connect(settings.postgres.dsn()) as store:
        ids: list[str] = []

        async def on(version: str, pointer: str) -> bool:
            docs = [await store.get_document(d) for d in ids]
            return all(d is not None and getattr(d, pointer) == version for d in docs)

        # Three chunker versions: t400 (oldest), t200 (searchable), t100 (current, not embedded).
        versions = []
        runs = ((400, tuple(Stage)), (200, tuple(Stage)), (100, (Stage.PARSE, Stage.CHUNK)))
        for max_tokens, stages in runs:
            run_with = variant(settings, chunk={"max_tokens": max_tokens, "overlap_tokens": 0})
            if ids:  # the chunk stage replayed with new settings, its group stopped
                chunk_group = topology.group(Stage.CHUNK)
                await reset_group_to_earliest(run_with, chunk_group, topology.parsed)
            version = f"md-1:cl100k_base:t{max_tokens}:o0"
            pointer = (
                "searchable_chunker_version" if Stage.EMBED in stages else "current_chunker_version"
            )
            async with workers(run_with, stages):
                if not ids:
                    receipts, _ = await upload_paths(run_with, paths, tenant_id=tenant)
                    ids = [r.document_id for r in receipts]
                await wait_until(
                    lambda v=version, p=pointer: on(v, p),
                    90,
                    f"every document's {pointer} {version}",
                )
            versions.append(version)
        oldest, searchable, current = versions
        before = await version_rows(settings)
        assert {k for k in before} == {
            ("chunks", oldest), ("chunks", searchable), ("chunks", current),
            ("embeddings", oldest), ("embeddings", searchable),
        }  # fmt: skip

        # Keeping three per document keeps everything.
        code, out, err = await ragstream(settings, "prune", "--keep-versions", "3", "--dry-run")
        assert code == 0, err
        assert "would remove 0 version(s), 0 row(s)" in out

        # Keeping one: the oldest goes (chunks and embeddings); the searchable version stays
        # although it is not the newest, because the documents point at it.
        code, out, err = await ragstream(settings, "prune", "--keep-versions", "1", "--dry-run")
        assert code == 0, err
        gone_rows = before[("chunks", oldest)] + before[("embeddings", oldest)]
        flat = " ".join(out.replace("│", " ").replace("┃", " ").split())
        assert f"{tenant} chunks 3 {before[('chunks', oldest)]}" in flat, out
        assert f"{tenant} embeddings 3 {before[('embeddings', oldest)]}" in flat, out
        assert f"would remove 6 version(s), {gone_rows} row(s); nothing removed" in flat
        assert await version_rows(settings) == before

        code, out, err = await ragstream(settings, "prune", "--keep-versions", "1")
        assert code == 0, err
        assert f"removed 6 version(s), {gone_rows} row(s)" in " ".join(out.split())
        after = await version_rows(settings)
        assert after == {k: n for k, n in before.items() if k[1] != oldest}
        for doc_id in ids:
            doc = await store.get_document(doc_id)
            assert doc is not None
            assert (doc.current_chunker_version, doc.searchable_chunker_version) == (
                current,
                searchable,
            )
        hits = (await search(settings, QUESTION, tenant, 3)).hits
        assert hits and {h.chunker_version for h in hits} == {searchable}
