"""s3:// claim checks through the real pipeline: with `blobs.store` naming a bucket of moto's S3
server, an upload over the inline limit lands as an object in the tenant's area and is
embedded; hostile claim checks published as another system would are dead-lettered with their
reason, and the documents behind them go through."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiobotocore.session import get_session
from pipeline_helpers import (
    assert_refused,
    dead_letters,
    hostile_claim_checks,
    make_large_text,
    publish_raw,
    read_topic,
    variant,
    wait_for_statuses,
    workers,
)

from producers.upload import upload_paths
from ragstream.admin import ensure_topics
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Topology

pytestmark = pytest.mark.integration


async def objects(bucket: str, prefix: str = "") -> dict[str, bytes]:
    async with get_session().create_client("s3") as s3:
        listed = await s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
        out = {}
        for entry in listed.get("Contents", []):
            answer = await s3.get_object(Bucket=bucket, Key=entry["Key"])
            async with answer["Body"] as body:
                out[entry["Key"]] = await body.read()
        return out


async def test_uploads_go_to_the_bucket_and_hostile_claim_checks_are_dead_lettered(
    s3_endpoint: str, settings: Settings, prefix: str, store: Store, tmp_path: Path
) -> None:
    bucket, other = f"{prefix}-docs", f"{prefix}-other"
    async with get_session().create_client("s3") as s3:
        for name in (bucket, other):
            await s3.create_bucket(Bucket=name)
    one = variant(settings, kafka={"partitions": 1}, blobs={"store": f"s3://{bucket}/ragstream"})
    await ensure_topics(one)
    a, b = f"{prefix}-a", f"{prefix}-b"
    report = make_large_text(tmp_path / "a" / "board-minutes.txt", 100_000, seed=21)
    notes = make_large_text(tmp_path / "b" / "b-notes.txt", 90_000, seed=22)

    async with workers(one, concurrency=1):
        (mine,), _ = await upload_paths(one, [report], tenant_id=a)
        assert not mine.inline, "over the inline limit: a claim check"
        docs = await wait_for_statuses(store, [mine.document_id], 60)
        key = f"ragstream/tenants/{a}/{mine.sha256[:2]}/{mine.sha256}"
        assert docs[mine.document_id].status == "embedded"
        assert docs[mine.document_id].source_uri == f"s3://{bucket}/{key}"
        assert await objects(bucket, "ragstream/tenants/") == {key: report.read_bytes()}
        assert not (one.blob_root() / "tenants").exists(), "nothing in the local store"

        # Tenant B publishes claim checks as another system would.
        fake = b"not the bytes the event names\n" * 4000
        fake_key = f"ragstream/tenants/{b}/{mine.sha256[:2]}/{mine.sha256}"
        async with get_session().create_client("s3") as s3:
            await s3.put_object(Bucket=bucket, Key=fake_key, Body=fake[: mine.size_bytes])
            await s3.put_object(Bucket=other, Key=key, Body=report.read_bytes())
        attacks = {
            "tenant a's key": (f"s3://{bucket}/{key}", "outside tenant"),
            "another bucket": (f"s3://{other}/{key}", "is not a blob store of this deployment"),
            "dot-dot": (f"s3://{bucket}/ragstream/tenants/{b}/../{a}/x", "'.' or '..' parts"),
            "sha mismatch": (f"s3://{bucket}/{fake_key}", "sha256 mismatch"),
        }
        hostile = hostile_claim_checks(
            b,
            {name: uri for name, (uri, _) in attacks.items()},
            size_bytes=mine.size_bytes,
            sha256=mine.sha256,
        )
        await publish_raw(one, [(e.document_id.encode(), e) for e in hostile.values()])
        (good,), _ = await upload_paths(one, [notes], tenant_id=b)  # behind them all
        docs = await wait_for_statuses(store, [good.document_id], 60)
        assert docs[good.document_id].status == "embedded", "the worker went on"
        dlq = await read_topic(one, Topology(prefix).dlq, at_least=len(attacks))

    letters = dead_letters(dlq)
    assert set(letters) == {f"attack-{name}" for name in attacks}
    assert_refused(letters, {name: rule for name, (_, rule) in attacks.items()})
    for name, event in hostile.items():
        if name != "sha mismatch":  # where it points is refused before any write
            assert await store.get_document(event.document_id) is None, name
