"""`ragstream dlq ...` against the real broker and PostgreSQL.

The DLQ records are built here the way the consumer runtime writes them: the original key and
value bytes (real encoded events, and one poison pill of random bytes), the original headers and
the `ragstream.errors.*` headers. The read-only commands share one seeded DLQ; redrive and purge
get DLQs of their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from typer.testing import CliRunner, Result

from ragstream.admin import ensure_topics
from ragstream.cli import app
from ragstream.codec import Codec
from ragstream.dlq import DlqFilter, redrive
from ragstream.events import (
    DocumentChunked,
    DocumentEvent,
    DocumentParsed,
    DocumentRef,
    DocumentUploaded,
)
from ragstream.settings import Settings, load_settings
from ragstream.store import Store, Upload
from ragstream.store.migrate import migrate
from ragstream.topology import (
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_DOCUMENT,
    H_ERR_FIRST_FAILURE,
    H_ERR_GROUP,
    H_ERR_KIND,
    H_ERR_LAST_FAILURE,
    H_ERR_MESSAGE,
    H_ERR_OFFSET,
    H_ERR_PARTITION,
    H_ERR_STACKTRACE,
    H_ERR_STAGE,
    H_ERR_TENANT,
    H_ERR_TIMESTAMP,
    H_ERR_TOPIC,
    H_REDRIVE_OF,
    Stage,
    Topology,
)

pytestmark = pytest.mark.integration

Headers = list[tuple[str, bytes]]
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Seeded:
    """One DLQ record as the test wrote it."""

    name: str
    partition: int
    offset: int
    origin_topic: str
    key: bytes
    value: bytes
    original_headers: Headers
    stage: str
    error_class: str
    kind: str
    tenant: str | None

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True)
class Dlq:
    settings: Settings
    records: dict[str, Seeded]

    def env(self) -> dict[str, str]:
        return cli_env(self.settings)


def make_settings(kafka_bootstrap: str, database_url: str, data_dir: Path) -> Settings:
    return load_settings(
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topic_prefix": f"t{uuid4().hex[:10]}",
            "partitions": 3,
        },
        postgres={"url": database_url},
        devstack={"data_dir": data_dir},
    )


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "RAGSTREAM_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "RAGSTREAM_POSTGRES__URL": settings.postgres.dsn(),
        "RAGSTREAM_OBSERVABILITY__LOG_LEVEL": "ERROR",
        "COLUMNS": "200",
    }


def dlq_cli(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    result = CliRunner().invoke(app, ["dlq", *args], env=env, input=input)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def flat(result: Result) -> str:
    """The output on one line, without table borders (rich may wrap long lines)."""
    return " ".join(re.sub(r"[│┃]", " ", result.output).split())


def events(tenant: str, n: int) -> tuple[DocumentUploaded, DocumentParsed, DocumentChunked]:
    now = datetime.now(UTC).replace(microsecond=0)
    ref = DocumentRef(document_id=f"doc-{n}", tenant_id=tenant, correlation_id=f"corr-{n}")
    uploaded = DocumentUploaded(
        **ref,
        filename=f"file-{n}.md",
        content_type="text/markdown",
        size_bytes=5,
        sha256="a" * 64,
        content=b"# hi\n",
    )
    parsed = DocumentParsed(
        **ref,
        uploaded_at=now,
        parser="local",
        parser_version="1",
        source_sha256="a" * 64,
        content_sha256="b" * 64,
        page_count=1,
        char_count=5,
    )
    chunked = DocumentChunked(
        **ref,
        uploaded_at=now,
        chunker_version="1",
        content_sha256="b" * 64,
        chunk_count=1,
        token_count=3,
    )
    return uploaded, parsed, chunked


async def seed(settings: Settings) -> dict[str, Seeded]:
    """Topics, then five dead letters: two old ones (3 h and 2.5 h ago) and three fresh ones.

    partition 0: old-parse (permanent, acme), embed (exhausted, acme)
    partition 1: old-parse-globex (exhausted), poison (random bytes)
    partition 2: chunk (permanent, acme)
    """
    await ensure_topics(settings)
    top = Topology(settings.kafka.topic_prefix)
    codec = Codec()
    up1, _, _ = events("acme", 1)
    up2, _, _ = events("globex", 2)
    _, parsed3, _ = events("acme", 3)
    _, _, chunked4 = events("acme", 4)
    now_ms = int(time.time() * 1000)
    plan: list[tuple[str, int, int, DocumentEvent | bytes, str, str, str]] = [
        ("old-parse", 0, now_ms - 3 * HOUR_MS, up1, "parse", "PermanentError", "permanent"),
        (
            "old-parse-globex",
            1,
            now_ms - 5 * HOUR_MS // 2,
            up2,
            "parse",
            "RetryableError",
            "exhausted",
        ),
        ("chunk", 2, now_ms, parsed3, "chunk", "PermanentError", "permanent"),
        ("embed", 0, now_ms, chunked4, "embed", "RetryableError", "exhausted"),
        ("poison", 1, now_ms, os.urandom(48), "parse", "DecodeError", "poison"),
    ]
    producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
    await producer.start()
    seeded: dict[str, Seeded] = {}
    try:
        for i, (name, partition, ts, payload, stage, error_class, kind) in enumerate(plan):
            origin = top.input_topic(Stage(stage))
            if isinstance(payload, bytes):
                value, key = payload, b"\x00not-a-document-id"
                original: Headers = [("x-source", b"\xffraw")]
                tenant, document = None, None
            else:
                value = codec.encode(payload)
                key = payload.document_id.encode()
                original = [*codec.headers_for(payload), ("x-source", b"\xffraw")]
                tenant = payload.tenant_id
                document = payload.document_id
            headers = [
                *original,
                (H_ERR_TOPIC, origin.encode()),
                (H_ERR_PARTITION, b"2"),
                (H_ERR_OFFSET, str(100 + i).encode()),
                (H_ERR_TIMESTAMP, str(ts - 1000).encode()),
                (H_ERR_STAGE, stage.encode()),
                (H_ERR_GROUP, top.group(Stage(stage)).encode()),
                (H_ERR_CLASS, error_class.encode()),
                (H_ERR_KIND, kind.encode()),
                (H_ERR_MESSAGE, f"{name} failed: something specific".encode()),
                (H_ERR_STACKTRACE, b'  File "consumers/x.py", line 1, in f\nPermanentError: x'),
                (H_ERR_ATTEMPTS, b"1" if kind != "exhausted" else b"3"),
                (H_ERR_FIRST_FAILURE, str(ts - 900).encode()),
                (H_ERR_LAST_FAILURE, str(ts - 10).encode()),
            ]
            if tenant is not None and document is not None:
                headers += [(H_ERR_TENANT, tenant.encode()), (H_ERR_DOCUMENT, document.encode())]
            meta = await producer.send_and_wait(
                top.dlq, value, key=key, partition=partition, timestamp_ms=ts, headers=headers
            )
            seeded[name] = Seeded(
                name,
                meta.partition,
                meta.offset,
                origin,
                key,
                value,
                original,
                stage,
                error_class,
                kind,
                tenant,
            )
    finally:
        await producer.stop()
    return seeded


async def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of `topic` up to its current end, with a plain consumer."""
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            batch = await consumer.getmany(timeout_ms=1000)
            out += [r for records in batch.values() for r in records]
        return out
    finally:
        await consumer.stop()


async def low_watermarks(settings: Settings) -> dict[int, int]:
    topic = Topology(settings.kafka.topic_prefix).dlq
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), group_id=None)
    await consumer.start()
    try:
        lows = await consumer.beginning_offsets([TopicPartition(topic, p) for p in range(3)])
        return {tp.partition: offset for tp, offset in lows.items()}
    finally:
        await consumer.stop()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI configures logging for its process; put this process's back afterwards."""
    root, kafka = logging.getLogger(), logging.getLogger("aiokafka")
    handlers, level, kafka_level = root.handlers[:], root.level, kafka.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    kafka.setLevel(kafka_level)
    structlog.configure(**config)


@pytest.fixture(scope="module")
async def shared(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Dlq:
    """A seeded DLQ that the read-only tests share."""
    settings = make_settings(kafka_bootstrap, database_url, tmp_path_factory.mktemp("data"))
    return Dlq(settings, await seed(settings))


@pytest.fixture
async def own(settings: Settings) -> Dlq:
    """A seeded DLQ of this test's own (for redrive and purge)."""
    return Dlq(settings, await seed(settings))


# -- list, show, stats ---------------------------------------------------------------------------


def test_list_json_with_filters(shared: Dlq) -> None:
    rec = shared.records

    def listed(*args: str) -> list[str]:
        result = dlq_cli(shared.env(), "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [item["position"] for item in json.loads(result.stdout)]

    everything = json.loads(dlq_cli(shared.env(), "list", "--json").stdout)
    # Oldest first; every field of the summary comes from the record's headers.
    assert [e["position"] for e in everything[:2]] == [
        rec["old-parse"].position,
        rec["old-parse-globex"].position,
    ]
    assert len(everything) == 5
    first = everything[0]
    assert first["stage"] == "parse" and first["error_class"] == "PermanentError"
    assert first["kind"] == "permanent" and first["attempts"] == 1
    assert first["tenant"] == "acme" and first["document"] == "doc-1"
    assert first["correlation_id"] == "corr-1" and first["event_type"] == "DocumentUploaded"
    assert first["message"] == "old-parse failed: something specific"
    assert first["origin"] == f"{rec['old-parse'].origin_topic}:2:100"

    def names(*args: str) -> set[str]:
        by_position = {s.position: name for name, s in rec.items()}
        return {by_position[p] for p in listed(*args)}

    assert names("--stage", "parse") == {"old-parse", "old-parse-globex", "poison"}
    assert names("--stage", "chunk", "--stage", "embed") == {"chunk", "embed"}
    assert names("--error-class", "PermanentError") == {"old-parse", "chunk"}
    assert names("--tenant", "globex") == {"old-parse-globex"}
    assert names("--since", "1h") == {"chunk", "embed", "poison"}
    assert names("--until", "2h") == {"old-parse", "old-parse-globex"}
    assert names("--since", "170m", "--until", "1h") == {"old-parse-globex"}
    iso = datetime.fromtimestamp(time.time() - 7200, UTC).isoformat()
    assert names("--since", iso) == {"chunk", "embed", "poison"}
    assert listed("--limit", "2") == [rec["old-parse"].position, rec["old-parse-globex"].position]
    assert listed("--stage", "parse", "--tenant", "nobody") == []


def test_list_table(shared: Dlq) -> None:
    result = dlq_cli(shared.env(), "list", "--stage", "parse", "--limit", "2")
    assert result.exit_code == 0, result.output
    out = flat(result)
    assert "dead letters (3 matching of 5)" in out
    assert shared.records["old-parse"].position in out
    assert "PermanentError" in out and "exhausted" in out and "doc-2" in out
    assert "old-parse failed: something specific" in out
    assert "showing 2 of 3; raise --limit for more" in out


def test_show_decoded_and_undecodable(shared: Dlq) -> None:
    chunk = shared.records["chunk"]
    result = dlq_cli(shared.env(), "show", chunk.position)
    assert result.exit_code == 0, result.output
    out = flat(result)
    assert "ragstream.errors.class PermanentError" in out
    assert "ragstream.errors.group" in out and "ragstream.correlation-id corr-3" in out
    assert "payload: DocumentParsed" in out and "content_sha256" in out and "doc-3" in out
    assert "stack trace" in out and "PermanentError: x" in out  # the record's own stack

    as_json = json.loads(dlq_cli(shared.env(), "show", chunk.position, "--json").stdout)
    assert as_json["payload"]["document_id"] == "doc-3"
    assert as_json["payload"]["event_type"] == "DocumentParsed"
    assert as_json["headers"][H_ERR_KIND] == "permanent"
    assert as_json["key"] == "doc-3" and as_json["undecodable"] is None

    poison = shared.records["poison"]
    result = dlq_cli(shared.env(), "show", poison.position)
    assert result.exit_code == 0, result.output
    out = flat(result)
    assert "undecodable: not a ragstream event" in out
    assert poison.value[:16].hex(" ") in result.output  # the hex preview, first line
    shown = json.loads(dlq_cli(shared.env(), "show", poison.position, "--json").stdout)
    assert shown["payload"] is None and shown["undecodable"].startswith("not a ragstream event")
    assert shown["value_hex_preview"] == poison.value.hex()


def test_stats(shared: Dlq) -> None:
    result = dlq_cli(shared.env(), "stats")
    assert result.exit_code == 0, result.output
    out = flat(result)
    assert "total 5 (exhausted 2, permanent 2, poison 1)" in out
    assert "parse DecodeError 1" in out and "parse PermanentError 1" in out
    assert "chunk PermanentError 1" in out and "embed RetryableError 1" in out
    data = json.loads(dlq_cli(shared.env(), "stats", "--json").stdout)
    assert data["total"] == 5
    assert {"stage": "embed", "error_class": "RetryableError", "count": 1} in data[
        "by_stage_and_class"
    ]
    oldest = datetime.fromisoformat(data["oldest"])
    assert 2.9 * 3600 < time.time() - oldest.timestamp() < 3.1 * 3600
    assert data["oldest"] in out


# -- redrive -------------------------------------------------------------------------------------


def test_redrive_dry_run_then_for_real_then_never_twice(own: Dlq) -> None:
    settings, rec = own.settings, own.records
    top = Topology(settings.kafka.topic_prefix)

    def originals(topic: str) -> list[Any]:
        return asyncio.run(read_topic(settings, topic))

    dry = dlq_cli(own.env(), "redrive", "--stage", "parse", "--dry-run")
    assert dry.exit_code == 0, dry.output
    out = flat(dry)
    assert "dry run: would redrive 2 record(s); nothing sent" in out
    assert rec["old-parse"].position in out and rec["old-parse-globex"].position in out
    assert "skipped 1: poison" in out
    assert originals(top.uploaded) == []

    sent = dlq_cli(own.env(), "redrive", "--stage", "parse")
    assert sent.exit_code == 0, sent.output
    assert f"redrove 2 record(s) to {top.uploaded}" in flat(sent)
    copies = originals(top.uploaded)
    expected = {rec[n].position: rec[n] for n in ("old-parse", "old-parse-globex")}
    assert len(copies) == 2
    for copy in copies:
        headers = list(copy.headers)
        assert headers[-1][0] == H_REDRIVE_OF
        source = expected.pop(headers[-1][1].decode())
        assert (copy.key, copy.value) == (source.key, source.value)  # bytes untouched
        assert headers[:-1] == source.original_headers  # no ragstream.errors.* left
    assert expected == {}
    assert originals(top.parsed) == [] and originals(top.chunked) == []

    again = dlq_cli(own.env(), "redrive", "--stage", "parse")
    assert again.exit_code == 0, again.output
    assert "nothing to redrive" in flat(again) and "skipped 2: already redriven" in flat(again)
    assert len(originals(top.uploaded)) == 2

    # The rest, the poison pill only when asked; each lands on its own original topic.
    rest = dlq_cli(own.env(), "redrive", "--include-poison")
    assert rest.exit_code == 0, rest.output
    assert "redrove 3 record(s)" in flat(rest)
    uploaded = originals(top.uploaded)
    assert len(uploaded) == 3 and rec["poison"].value in [r.value for r in uploaded]
    (parsed,) = originals(top.parsed)
    assert parsed.value == rec["chunk"].value
    (chunked,) = originals(top.chunked)
    assert chunked.value == rec["embed"].value
    assert "nothing to redrive" in flat(dlq_cli(own.env(), "redrive", "--include-poison"))

    async def marks() -> set[tuple[int, int]]:
        async with await Store.connect(settings.postgres.dsn(), max_size=2) as store:
            return await store.redriven_positions(top.dlq)

    assert asyncio.run(marks()) == {(s.partition, s.offset) for s in rec.values()}


async def test_redrive_library_filters_and_a_second_concurrent_run_sends_nothing_twice(
    own: Dlq,
) -> None:
    settings, rec = own.settings, own.records
    top = Topology(settings.kafka.topic_prefix)
    flt = DlqFilter.build(error_classes=["PermanentError"], tenants=["acme"])
    progress: list[tuple[int, int]] = []
    first, second = await asyncio.gather(
        redrive(settings, flt, on_progress=lambda s, t: progress.append((s, t))),
        redrive(settings, flt),
        return_exceptions=True,
    )
    # Two runs at once: the lock lets one send; the other refuses (or, if it came second,
    # finds everything redriven). Either way each record went exactly once.
    reports = [r for r in (first, second) if not isinstance(r, BaseException)]
    errors = [r for r in (first, second) if isinstance(r, BaseException)]
    assert all("another redrive" in str(e) for e in errors), errors
    assert sum(r.sent for r in reports) == 2
    assert progress in ([(2, 2)], [])
    values = sorted(r.value for r in await read_topic(settings, top.uploaded))
    values += sorted(r.value for r in await read_topic(settings, top.parsed))
    assert values == [rec["old-parse"].value, rec["chunk"].value]


# -- purge ---------------------------------------------------------------------------------------


def test_purge_before_a_time_and_up_to_offsets(own: Dlq) -> None:
    settings, rec = own.settings, own.records
    assert asyncio.run(low_watermarks(settings)) == {0: 0, 1: 0, 2: 0}

    dry = dlq_cli(own.env(), "purge", "--before", "1h", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "dry run: would delete 2 record(s); nothing deleted" in flat(dry)
    assert asyncio.run(low_watermarks(settings)) == {0: 0, 1: 0, 2: 0}

    cancelled = dlq_cli(own.env(), "purge", "--before", "1h", input="n\n")
    assert cancelled.exit_code == 1
    assert "purge cancelled; nothing deleted" in flat(cancelled)
    assert asyncio.run(low_watermarks(settings)) == {0: 0, 1: 0, 2: 0}

    purged = dlq_cli(own.env(), "purge", "--before", "1h", input="y\n")
    assert purged.exit_code == 0, purged.output
    assert "deleted 2 record(s); first offsets now 0:1, 1:1" in flat(purged)
    assert asyncio.run(low_watermarks(settings)) == {0: 1, 1: 1, 2: 0}
    listed = json.loads(dlq_cli(own.env(), "list", "--json").stdout)
    assert sorted(e["position"] for e in listed) == sorted(
        rec[n].position for n in ("chunk", "embed", "poison")
    )
    assert "nothing to purge" in flat(dlq_cli(own.env(), "purge", "--before", "1h"))

    up_to = dlq_cli(own.env(), "purge", "--up-to", "2:1,1:2", "--yes")
    assert up_to.exit_code == 0, up_to.output
    assert asyncio.run(low_watermarks(settings)) == {0: 1, 1: 2, 2: 1}
    assert [e["position"] for e in json.loads(dlq_cli(own.env(), "list", "--json").stdout)] == [
        rec["embed"].position
    ]


# -- bad input and empty or unreachable DLQs -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--stage", "upload"], "--stage 'upload': unknown stage; choose one of parse"),
        (["list", "--since", "yesterday"], "--since 'yesterday': expected an ISO 8601 time"),
        (["redrive", "--until", "2x"], "--until '2x': expected an ISO 8601 time"),
        (["list", "--since", "1h", "--until", "2h"], "is not before --until"),
        (["show", "0-4"], "no dead letter of a document '0-4': give a PARTITION:OFFSET"),
        (["show", "7:0"], "has partitions 0..2, not 7"),
        (["show", "2:99"], "no record at 2:99: partition 2 holds offsets 0..0"),
        (["purge"], "give one of --before TIME or --up-to"),
        (["purge", "--before", "1h", "--up-to", "0:1"], "give one of --before TIME or --up-to"),
        (["purge", "--before", "soon"], "--before 'soon': expected an ISO 8601 time"),
        (["purge", "--up-to", "0:1;1:1"], "--up-to '0:1;1:1': expected PARTITION:OFFSET"),
        (["purge", "--up-to", "0:99"], "partition 0 ends at offset 2"),
        (["purge", "--up-to", "5:1"], "has partitions 0..2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(shared: Dlq, args: list[str], message: str) -> None:
    result = dlq_cli(shared.env(), *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in flat(result)


def test_a_usage_error_is_exit_2_without_a_traceback(shared: Dlq) -> None:
    assert dlq_cli(shared.env(), "list", "--limit", "0").exit_code == 2
    assert dlq_cli(shared.env(), "show").exit_code == 2


def test_an_empty_dlq_is_not_an_error(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings))
    env = cli_env(settings)
    for args, said in [
        (["list"], "the DLQ is empty"),
        (["stats"], "the DLQ is empty"),
        (["redrive"], "nothing to redrive"),
        (["redrive", "--dry-run"], "nothing to redrive"),
        (["purge", "--before", "0m"], "nothing to purge"),
    ]:
        result = dlq_cli(env, *args)
        assert result.exit_code == 0, result.output
        assert said in result.output
    as_json = dlq_cli(env, "list", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == []
    shown = dlq_cli(env, "show", "0:0")
    assert shown.exit_code == 2
    assert "no record at 0:0: partition 0 holds no records" in flat(shown)


def test_missing_topics_and_unreachable_services_are_one_line(
    settings: Settings, shared: Dlq
) -> None:
    env = cli_env(settings)  # no topics were created for this prefix
    result = dlq_cli(env, "stats")
    assert result.exit_code == 2
    assert f"there is no DLQ topic '{settings.kafka.topic_prefix}.dlq'" in flat(result)

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    for args in (["list"], ["redrive"], ["purge", "--before", "1h", "--yes"]):
        result = dlq_cli({**env, "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": dead}, *args)
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"error: cannot reach Kafka at {dead}"), result.output

    no_db = {**shared.env(), "RAGSTREAM_POSTGRES__URL": f"postgresql://postgres@{dead}/x"}
    result = dlq_cli(no_db, "redrive", "--dry-run")
    assert result.exit_code == 1, result.output
    assert result.output.startswith(
        f"error: cannot reach PostgreSQL at postgresql://postgres@{dead}/x"
    ), result.output


async def _register_doc_3(settings: Settings) -> None:
    await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=1) as store:
        await store.register_upload(Upload(
            "doc-3", "acme", "quarterly-report.md", "text/markdown", 5, "c" * 64,
            None, None, "corr-3", None,
        ))  # fmt: skip


def test_list_names_tenant_and_file_and_show_takes_a_document_id(own_database: Settings) -> None:
    dlq = Dlq(own_database, asyncio.run(seed(own_database)))
    asyncio.run(_register_doc_3(own_database))
    listed = dlq_cli(dlq.env(), "list")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "doc-3" in line)
    assert "acme" in row and "quarterly-report.md" in row  # the file name from PostgreSQL

    chunk = dlq.records["chunk"]  # doc-3's dead letter
    by_id = dlq_cli(dlq.env(), "show", "doc-3", "--json")
    assert by_id.exit_code == 0, by_id.output
    assert json.loads(by_id.stdout)["position"] == chunk.position
    ambiguous = dlq_cli(dlq.env(), "show", "doc-")
    assert ambiguous.exit_code == 2
    assert "'doc-' is the start of several dead-lettered documents' ids (doc-1, doc-2" in flat(
        ambiguous
    )
    missing = dlq_cli(dlq.env(), "show", "no-such-document")
    assert missing.exit_code == 2 and "no dead letter of a document 'no-such-document'" in flat(
        missing
    )
