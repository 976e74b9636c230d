"""The same-run ceiling of benchmarks/bench_pipeline.py: what the pipeline's Kafka and PostgreSQL
traffic costs with no pipeline logic, written with aiokafka and asyncpg only (no ragstream code).

The documents go through the same four topics (uploaded, parsed, chunked, embedded; the
pipeline's partition count) by three consumer groups, each in a process of its own, that commit
their offsets after their writes and their output records are acknowledged. They write the rows
the pipeline leaves behind, in a database of their own with the shape of ragstream's tables
(`SCHEMA`, taken from ragstream/store/migrations/0001_initial.sql: keys, foreign keys, indexes,
the untyped `vector` column and its partial HNSW expression index for 512 dimensions):

    parse   a documents row (status parsed) and the parse text, which is the document as it is
    chunk   the text cut at its `## ` headings into chunk rows; status chunked
    embed   an embedding row per chunk; status embedded. The vectors are the ones the local
            embedder made for the same documents in the logic pass, handed over in a file
            (`write_vectors`), so the HNSW index does the work it does for the pipeline
            (random vectors cost it a third more)

Each stage handles what one poll brings (up to `BATCH` records) in one transaction of multi-row
statements, sends one output record per document, waits for the broker's acknowledgements and
commits. No parsing, tokenizing, embedding, validation, journey, cache or retry handling.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import json
import logging
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

DIMENSIONS = 512
REPOSITORY = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.ceiling` runs
BATCH = 500
Vectors = list[list[bytes]]  # per document, its chunks' vectors in pgvector's binary form
STAGES = ("parse", "chunk", "embed")

SCHEMA = f"""
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE documents (
    document_id     text PRIMARY KEY,
    tenant_id       text NOT NULL,
    filename        text,
    content_type    text,
    size_bytes      bigint,
    sha256          text NOT NULL,
    status          text NOT NULL,
    chunk_count     integer,
    current_parse_sha256 text,
    uploaded_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX documents_tenant_sha256 ON documents (tenant_id, sha256);
CREATE INDEX documents_tenant_status ON documents (tenant_id, status);
CREATE TABLE parse_results (
    document_id    text NOT NULL REFERENCES documents (document_id) ON DELETE CASCADE,
    content_sha256 text NOT NULL,
    tenant_id      text NOT NULL,
    markdown       text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (document_id, content_sha256)
);
CREATE INDEX parse_results_tenant ON parse_results (tenant_id);
CREATE TABLE chunks (
    document_id     text NOT NULL REFERENCES documents (document_id) ON DELETE CASCADE,
    chunker_version text NOT NULL,
    chunk_index     integer NOT NULL,
    tenant_id       text NOT NULL,
    text            text NOT NULL,
    text_sha256     text NOT NULL,
    char_start      integer NOT NULL,
    char_end        integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- full-text search over the chunk text, as migration 0006 keeps it
    text_search     tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    PRIMARY KEY (document_id, chunker_version, chunk_index)
);
CREATE INDEX chunks_tenant ON chunks (tenant_id);
CREATE INDEX chunks_text_search ON chunks USING gin (text_search);
CREATE TABLE embeddings (
    document_id     text NOT NULL,
    chunker_version text NOT NULL,
    chunk_index     integer NOT NULL,
    model           text NOT NULL,
    dimensions      integer NOT NULL,
    tenant_id       text NOT NULL,
    text_sha256     text NOT NULL,
    embedding       vector NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (document_id, chunker_version, chunk_index, model, dimensions),
    FOREIGN KEY (document_id, chunker_version, chunk_index)
        REFERENCES chunks (document_id, chunker_version, chunk_index) ON DELETE CASCADE
);
CREATE INDEX embeddings_tenant ON embeddings (tenant_id, model, dimensions);
CREATE INDEX embeddings_hnsw ON embeddings
    USING hnsw ((embedding::vector({DIMENSIONS})) vector_cosine_ops) WHERE dimensions = {DIMENSIONS};
"""

INSERT_DOCUMENTS = """
INSERT INTO documents (document_id, tenant_id, filename, size_bytes, sha256, status,
                       current_parse_sha256, uploaded_at)
SELECT d, t, f, s, h, 'parsed', h, u
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::timestamptz[])
     AS x(d, t, f, s, h, u)
ON CONFLICT (document_id) DO NOTHING
"""
INSERT_PARSE = """
INSERT INTO parse_results (document_id, content_sha256, tenant_id, markdown)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT DO NOTHING
"""
LOAD_PARSE = (
    "SELECT document_id, tenant_id, markdown FROM parse_results WHERE document_id = ANY($1)"
)
INSERT_CHUNKS = """
INSERT INTO chunks (document_id, chunker_version, chunk_index, tenant_id, text, text_sha256,
                    char_start, char_end)
SELECT d, 'ceiling', i, t, x, h, s, e
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::int[], $7::int[])
     AS c(d, i, t, x, h, s, e)
ON CONFLICT DO NOTHING
"""
LOAD_CHUNKS = """
SELECT document_id, chunk_index, tenant_id, text_sha256, text FROM chunks
WHERE document_id = ANY($1) AND chunker_version = 'ceiling'
"""
INSERT_EMBEDDING = f"""
INSERT INTO embeddings (document_id, chunker_version, chunk_index, model, dimensions, tenant_id,
                        text_sha256, embedding)
VALUES ($1, 'ceiling', $2, 'random', {DIMENSIONS}, $3, $4, $5)
ON CONFLICT DO NOTHING
"""
ADVANCE = """
UPDATE documents d SET status = $2, chunk_count = coalesce(x.n, d.chunk_count),
    updated_at = clock_timestamp()
FROM unnest($1::text[], $3::int[]) AS x(id, n)
WHERE d.document_id = x.id
"""


@dataclass(frozen=True)
class CeilingConfig:
    bootstrap: str
    dsn: str
    prefix: str
    partitions: int
    documents: int
    vectors: str  # the file `write_vectors` wrote: per document, in order, its chunks' vectors

    def topic(self, name: str) -> str:
        return f"{self.prefix}.documents.{name}"

    def hop(self, stage: str) -> tuple[str, str]:
        """The stage's input and output topics."""
        names = ("uploaded", "parsed", "chunked", "embedded")
        at = STAGES.index(stage)
        return self.topic(names[at]), self.topic(names[at + 1])


async def prepare(config: CeilingConfig) -> None:
    """The ceiling's tables in its (empty) database and its four topics."""
    conn = await asyncpg.connect(config.dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap)
    await admin.start()
    try:
        names = ("uploaded", "parsed", "chunked", "embedded")
        await admin.create_topics([NewTopic(config.topic(n), config.partitions, 1) for n in names])
    finally:
        await admin.close()


# -- a stage, in a process of its own ----------------------------------------------------------


@dataclass
class StageTimes:
    """Where a stage process spent its time once the first records arrived."""

    busy_s: float = 0.0  # from its first poll with records to its last commit
    postgres_s: float = 0.0  # in its transactions
    kafka_s: float = 0.0  # sending, waiting for acknowledgements, committing
    cpu_s: float = 0.0  # the process's CPU seconds from `ready` to the end (ns-precise, unlike
    # /proc's ticks, which round a short pass's few milliseconds to nothing)


async def run_stage(stage: str, config: CeilingConfig) -> StageTimes:
    """Handle every document once, then return. Prints `ready` once the consumer holds all
    its partitions."""
    times = StageTimes()
    first: float | None = None
    source, target = config.hop(stage)
    vectors = read_vectors(Path(config.vectors)) if stage == "embed" else []
    pool = await asyncpg.create_pool(config.dsn, min_size=1, max_size=2, init=_vector_codec)
    assigned = _Assigned(config.partitions)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.bootstrap,
        group_id=f"{config.prefix}-{stage}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=BATCH,
    )
    consumer.subscribe([source], listener=assigned)
    producer = AIOKafkaProducer(
        bootstrap_servers=config.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    await consumer.start()
    try:
        await assigned.all.wait()  # the group joins in the background
        print("ready", flush=True)
        cpu_at_ready = time.process_time()
        handled = 0
        write = {"parse": _parse, "chunk": _chunk, "embed": _embed}[stage]
        while handled < config.documents:
            polled = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            records = [r for batch in polled.values() for r in batch]
            if not records:
                continue
            started = time.monotonic()
            first = first or started
            async with pool.acquire() as db, db.transaction():
                outputs = await write(db, records, vectors)
            written = time.monotonic()
            sent = [await producer.send(target, value, key=key) for key, value in outputs]
            await asyncio.gather(*sent)  # acknowledged by the broker
            await consumer.commit()
            handled += len(records)
            done = time.monotonic()
            times.postgres_s += written - started
            times.kafka_s += done - written
            times.busy_s = done - first
        times.cpu_s = time.process_time() - cpu_at_ready
    finally:
        await consumer.stop()
        await producer.stop()
        await pool.close()
    return times


async def _parse(db: Any, records: Sequence[Any], _: Vectors) -> list[tuple[bytes, bytes]]:
    meta = [json.loads(dict(r.headers)["meta"]) for r in records]
    texts = [r.value.decode() for r in records]
    ids = [r.key.decode() for r in records]
    tenants = [m["tenant"] for m in meta]
    shas = [m["sha256"] for m in meta]
    uploaded = [_timestamp(r.timestamp) for r in records]
    await db.execute(
        INSERT_DOCUMENTS,
        ids,
        tenants,
        [m["filename"] for m in meta],
        [len(r.value) for r in records],
        shas,
        uploaded,
    )
    await db.execute(INSERT_PARSE, ids, shas, tenants, texts)
    return [
        (r.key, json.dumps({"tenant": t, "sha256": s}).encode())
        for r, t, s in zip(records, tenants, shas, strict=True)
    ]


async def _chunk(db: Any, records: Sequence[Any], _: Vectors) -> list[tuple[bytes, bytes]]:
    ids = [r.key.decode() for r in records]
    rows = await db.fetch(LOAD_PARSE, ids)
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    counts: dict[str, int] = {}
    for row in rows:
        pieces = _sections(row["markdown"])
        counts[row["document_id"]] = len(pieces)
        for index, (start, end) in enumerate(pieces):
            text = row["markdown"][start:end]
            values = (row["document_id"], index, row["tenant_id"], text, _sha(text), start, end)
            for column, value in zip(columns, values, strict=True):
                column.append(value)
    await db.execute(INSERT_CHUNKS, *columns)
    await db.execute(ADVANCE, ids, "chunked", [counts.get(d, 0) for d in ids])
    return [
        (r.key, json.dumps({"chunks": counts.get(r.key.decode(), 0)}).encode()) for r in records
    ]


async def _embed(db: Any, records: Sequence[Any], vectors: Vectors) -> list[tuple[bytes, bytes]]:
    ids = [r.key.decode() for r in records]
    rows = await db.fetch(LOAD_CHUNKS, ids)
    args = [
        (
            row["document_id"],
            row["chunk_index"],
            row["tenant_id"],
            row["text_sha256"],
            _vector_for(vectors, row["document_id"], row["chunk_index"]),
        )
        for row in rows
    ]
    await db.executemany(INSERT_EMBEDDING, args)
    await db.execute(ADVANCE, ids, "embedded", [None] * len(ids))
    return [(r.key, b"{}") for r in records]


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.all = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.all.clear()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if len(assigned) >= self.partitions:
            self.all.set()


def _sections(markdown: str) -> list[tuple[int, int]]:
    """(start, end) of each piece of `markdown` cut before every `## ` heading line."""
    cuts = [0]
    at = markdown.find("\n## ")
    while at != -1:
        cuts.append(at + 1)
        at = markdown.find("\n## ", at + 1)
    cuts.append(len(markdown))
    return [(a, b) for a, b in itertools.pairwise(cuts) if markdown[a:b].strip()]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _timestamp(epoch_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC)


def pack_vector(values: Sequence[float]) -> bytes:
    """A vector in pgvector's binary form: dimensions, an unused int16, big-endian float4s."""
    return struct.pack(f">HH{len(values)}f", len(values), 0, *values)


def write_vectors(path: Path, documents: Sequence[Sequence[bytes]]) -> None:
    """Per document (in publishing order): its number of vectors, then the packed vectors."""
    with path.open("wb") as out:
        for vectors in documents:
            out.write(struct.pack(">H", len(vectors)))
            out.writelines(vectors)


def read_vectors(path: Path) -> Vectors:
    data = path.read_bytes()
    size = struct.calcsize(f">HH{DIMENSIONS}f")
    out, at = [], 0
    while at < len(data):
        (count,) = struct.unpack_from(">H", data, at)
        at += 2
        out.append([data[at + i * size : at + (i + 1) * size] for i in range(count)])
        at += count * size
    return out


def _vector_for(vectors: Vectors, document_id: str, chunk_index: int) -> bytes:
    """The vector of a document's chunk: its document's number ends the key (`publish`)."""
    own = vectors[int(document_id.rsplit("-", 1)[1])]
    return own[chunk_index % len(own)]


async def _vector_codec(conn: Any) -> None:
    await conn.set_type_codec(
        "vector", schema="public", encoder=bytes, decoder=bytes, format="binary"
    )


def _own_peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# -- the run -----------------------------------------------------------------------------------


@dataclass
class StageProcess:
    stage: str
    process: asyncio.subprocess.Process

    async def expect(self, word: str, timeout_s: float) -> str:
        """The next line it prints, which must start with `word`."""
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), timeout_s)).decode()
        if not line.startswith(word):
            await self.process.wait()
            raise RuntimeError(
                f"the ceiling's {self.stage} process ended (code {self.process.returncode})"
            )
        return line


async def start_stages(config: CeilingConfig, timeout_s: float = 120.0) -> list[StageProcess]:
    """A process per stage (`python -m benchmarks.ceiling STAGE CONFIG`), each holding all its
    partitions when this returns."""
    raw = json.dumps(asdict(config))
    stages = [
        StageProcess(
            stage,
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.ceiling",
                stage,
                raw,
                stdout=asyncio.subprocess.PIPE,
                cwd=REPOSITORY,
            ),
        )
        for stage in STAGES
    ]
    try:
        for stage in stages:
            await stage.expect("ready", timeout_s)
    except BaseException:
        await stop_stages(stages)
        raise
    return stages


@dataclass(frozen=True)
class StageReport:
    pid: int
    peak_rss_kib: int
    times: StageTimes


async def finish_stages(stages: Sequence[StageProcess], timeout_s: float) -> dict[str, StageReport]:
    """Wait for each stage process to end; what it reports, per stage."""
    reports = {}
    try:
        for stage in stages:
            line = await stage.expect("done", timeout_s)
            done = json.loads(line.split(" ", 1)[1])
            reports[stage.stage] = StageReport(
                stage.process.pid, done["peak_rss_kib"], StageTimes(**done["times"])
            )
            await stage.process.wait()
    finally:
        await stop_stages(stages)
    return reports


async def stop_stages(stages: Sequence[StageProcess]) -> None:
    for stage in stages:
        if stage.process.returncode is None:
            stage.process.kill()
            await stage.process.wait()


async def publish(config: CeilingConfig, paths: Sequence[Path], tenant: str) -> None:
    """Every document to the uploaded topic: sends in flight together, one flush at the end."""
    producer = AIOKafkaProducer(
        bootstrap_servers=config.bootstrap, acks="all", enable_idempotence=True, linger_ms=10
    )
    await producer.start()
    try:
        sent = []
        for n, path in enumerate(paths):
            data = await asyncio.to_thread(path.read_bytes)
            sha = hashlib.sha256(data).hexdigest()
            meta = {"tenant": tenant, "filename": path.name, "sha256": sha}
            sent.append(
                await producer.send(
                    config.topic("uploaded"),
                    data,
                    key=f"{config.prefix}-{n:06d}".encode(),
                    headers=[("meta", json.dumps(meta).encode())],
                )
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def main() -> None:
    # a new group's "coordinator not available" while the broker sets up its offsets topic
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    stage, raw = sys.argv[1], sys.argv[2]
    times = asyncio.run(run_stage(stage, CeilingConfig(**json.loads(raw))))
    report = {"peak_rss_kib": _own_peak_rss_kib(), "times": asdict(times)}
    print(f"done {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main()
