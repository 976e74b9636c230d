"""The library publisher streams: a window of sends in flight, one flush at the end, and the
ones the broker did not take reported by name; `--wait` follows documents in one query."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner

from producers.upload import Uploader, upload_paths
from producers.wait import poll_documents
from ragstream.admin import ensure_topics
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Topology
from tests.integration.pipeline_helpers import make_corpus, read_topic
from tests.integration.test_failures import read_all

pytestmark = [pytest.mark.integration]


async def test_a_directory_is_published_as_a_stream_and_every_record_lands(
    settings: Settings, tenant: str, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    paths = make_corpus(tmp_path / "in", 300)
    receipts, rejected = await upload_paths(settings, [tmp_path / "in"], tenant_id=tenant)
    assert rejected == [] and len(receipts) == len(paths)
    landed = await read_topic(
        settings, Topology(settings.kafka.topic_prefix).uploaded, at_least=300
    )
    assert sorted(d.document_id for d in landed) == sorted(r.document_id for r in receipts)


class _RefusingProducer:
    """Stands in for the producer: every third send is never acknowledged."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        self.sent += 1
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.sent % 3 == 0:
            done.set_exception(KafkaTimeoutError())
        else:
            done.set_result(None)
        return done


async def test_uploads_the_broker_did_not_take_are_named_by_flush(
    settings: Settings, tenant: str
) -> None:
    uploader = Uploader(settings, window=4)
    await uploader._producer.stop()  # never started: the stand-in does the sending
    uploader._producer = _RefusingProducer()  # type: ignore[assignment]
    receipts = [
        await uploader.upload_bytes(
            f"# doc {n}\n\ntext {n}\n".encode(), f"d{n}.md", tenant_id=tenant, wait=False
        )
        for n in range(10)
    ]
    failed = await uploader.flush()
    assert [r.filename for r, _ in failed] == ["d2.md", "d5.md", "d8.md"]
    assert all(isinstance(exc, KafkaTimeoutError) for _, exc in failed)
    assert len(receipts) == 10
    assert await uploader.flush() == []  # reported once


async def test_waiting_reads_every_document_in_one_query(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    receipts, _ = await upload_paths(settings, make_corpus(tmp_path / "in", 5), tenant_id=tenant)
    ids = [r.document_id for r in receipts]
    calls = 0
    original = store.get_documents

    async def counted(document_ids: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(document_ids)

    store.get_documents = counted  # type: ignore[method-assign]
    results = await poll_documents(store, [*ids, "never-uploaded"])
    assert calls == 1
    assert results["never-uploaded"].status == "published"
    assert set(results) == {*ids, "never-uploaded"}


def _mixed_folder(folder: Path) -> Path:
    """Three files; the middle one's name is Latin-1 bytes, not UTF-8."""
    folder.mkdir()
    (folder / "a-first.md").write_text("# First\n\nBefore the odd name.\n")
    Path(os.fsdecode(bytes(folder) + b"/b-caf\xe9-latin1.md")).write_text("# Odd\n\nLatin-1.\n")
    (folder / "c-last.md").write_text("# Last\n\nAfter the odd name.\n")
    return folder


async def test_a_directory_upload_reports_a_name_it_cannot_send_and_sends_the_rest(
    settings: Settings, tenant: str, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    folder = _mixed_folder(tmp_path / "mixed")
    receipts, rejected = await upload_paths(settings, [folder], tenant_id=tenant)
    assert sorted(r.filename for r in receipts) == ["a-first.md", "c-last.md"]
    (refused,) = rejected
    assert refused.path.endswith("b-caf\ufffd-latin1.md")  # printable
    assert "the file name is not valid UTF-8" in refused.reason
    refused.reason.encode("utf-8")  # fit for any terminal
    landed = await read_topic(settings, Topology(settings.kafka.topic_prefix).uploaded, at_least=2)
    assert sorted(d.document_id for d in landed) == sorted(r.document_id for r in receipts)


async def test_kcat_with_the_murmur2_partitioner_puts_a_key_where_ragstream_does(
    settings: Settings, tmp_path: Path
) -> None:
    """schemas/README's note for librdkafka publishers: with `-X partitioner=murmur2_random`
    kcat lands every key on the partition ragstream's own producer picks."""
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed (make test installs Debian's kcat)"
    topic = Topology(settings.kafka.topic_prefix).uploaded
    await ensure_topics(settings)
    partitions = list(range(settings.kafka.partitions))
    keys = [f"doc-{n:04d}" for n in range(40)]
    lines = tmp_path / "records.txt"
    lines.write_text("".join(f"{k}\t{k}\n" for k in keys))
    produced = await asyncio.to_thread(
        subprocess.run,
        [kcat, "-P", "-b", settings.kafka.bootstrap_servers, "-t", topic, "-K", "\t",
         "-X", "partitioner=murmur2_random", "-l", str(lines)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert produced.returncode == 0, produced.stderr
    landed = await read_all(settings, topic, len(keys))
    where = {r.key.decode(): r.partition for r in landed if r.key}
    ours = DefaultPartitioner()
    assert where == {k: ours(k.encode(), partitions, partitions) for k in keys}
