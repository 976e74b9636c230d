"""Helpers for the end-to-end pipeline tests (tests/integration/test_pipeline.py).

Documents to upload, stage workers in this process or as real `ragstream worker` processes,
and ways to read back what the pipeline did: records on a topic, rows in PostgreSQL,
consumer-group offsets and members.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from consumers.compose import Providers
from consumers.runtime import StageRunner
from consumers.worker import run_workers
from producers.wait import TERMINAL
from ragstream.admin import admin_client, describe_group, describe_topics
from ragstream.codec import Codec
from ragstream.events import DocumentEvent, DocumentUploaded, Event
from ragstream.providers.circuit import CircuitBreaker
from ragstream.samples import sample_dir, sample_manifest
from ragstream.settings import Settings, load_settings
from ragstream.store import Document, Store
from ragstream.topology import H_ERR_CLASS, H_ERR_KIND, H_ERR_MESSAGE, Stage, Topology

# -- documents ---------------------------------------------------------------------------------

_TOPICS = (
    "orchard pruning",
    "tide pools",
    "bicycle maintenance",
    "glacier hiking",
    "violin practice",
    "compost heaps",
    "radio astronomy",
    "bread ovens",
    "chess openings",
    "lighthouse keeping",
    "pottery glazes",
    "rainwater tanks",
    "sailing knots",
    "beetle collecting",
    "mountain huts",
    "watch repair",
)
_WORDS = (
    "amber basin cedar delta ember fjord granite harbor iris juniper kestrel lagoon meadow "
    "nickel ochre pebble quartz raven saffron thistle umber velvet willow yarrow zephyr "
    "anchor bramble copper dune estuary falcon grove heron inlet jasper kelp lantern marsh "
    "nectar otter prairie quill reef sorrel timber upland vapor wharf birch clover drift"
).split()


def _sentence(rng: random.Random, tag: str) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
    words.insert(rng.randrange(len(words)), tag)
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, tag: str) -> str:
    return " ".join(_sentence(rng, tag) for _ in range(rng.randint(2, 6)))


def _markdown(rng: random.Random, n: int, topic: str, tag: str) -> str:
    parts = [f"# Notes on {topic}, number {n}", _paragraph(rng, tag)]
    for s in range(rng.randint(1, 4)):
        parts.append(f"## Section {s + 1}: {rng.choice(_WORDS)} {tag}")
        parts.append(_paragraph(rng, tag))
        if rng.random() < 0.4:
            parts.append("\n".join(f"- {_sentence(rng, tag)}" for _ in range(3)))
        if rng.random() < 0.2:
            parts.append(f"```\nrun --{rng.choice(_WORDS)} {tag}\n```")
    return "\n\n".join(parts) + "\n"


def _html(rng: random.Random, n: int, topic: str, tag: str) -> str:
    body = [f"<h1>{topic.title()} handbook {n}</h1>", f"<p>{_paragraph(rng, tag)}</p>"]
    for s in range(rng.randint(1, 3)):
        body.append(f"<h2>Part {s + 1} about {rng.choice(_WORDS)}</h2>")
        body.append(f"<p>{_paragraph(rng, tag)}</p>")
        if rng.random() < 0.5:
            items = "".join(f"<li>{_sentence(rng, tag)}</li>" for _ in range(3))
            body.append(f"<ul>{items}</ul>")
    return (
        f"<!DOCTYPE html><html><head><title>{topic.title()} {n}</title>"
        "<style>p { margin: 0 }</style><script>var tracking = 1;</script></head>"
        f"<body><nav><a href='/'>home</a></nav>{''.join(body)}</body></html>\n"
    )


def _text(rng: random.Random, n: int, topic: str, tag: str) -> str:
    paragraphs = [f"{topic.upper()} - memo {n}"]
    paragraphs += [_paragraph(rng, tag) for _ in range(rng.randint(2, 6))]
    return "\n\n".join(paragraphs) + "\n"


def make_corpus(
    directory: Path,
    count: int,
    *,
    seed: int = 20261124,
    start: int = 0,
    kinds: Sequence[str] = (".md", ".html", ".txt"),
) -> list[Path]:
    """`count` small Markdown, HTML and plain-text files (or only the `kinds` named) of distinct
    content (each carries a word of its own, `docNNNN`), from a few hundred bytes to several
    kilobytes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + start)
    writers = [
        (k, w) for k, w in ((".md", _markdown), (".html", _html), (".txt", _text)) if k in kinds
    ]
    paths = []
    for n in range(start, start + count):
        suffix, write = writers[n % len(writers)]
        topic = _TOPICS[n % len(_TOPICS)]
        path = directory / f"{topic.replace(' ', '-')}-{n:04d}{suffix}"
        path.write_text(write(rng, n, topic, f"doc{n:04d}"), encoding="utf-8")
        paths.append(path)
    return paths


def make_large_text(path: Path, min_bytes: int, *, seed: int = 99) -> Path:
    """A plain-text file of at least `min_bytes` (bigger than the inline limit: claim check)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paragraphs = [f"LARGE REPORT {path.stem}"]
    size = 0
    while size < min_bytes:
        paragraph = _paragraph(rng, f"large{seed}")
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def bundled_originals() -> list[Path]:
    """The bundled sample documents that are not exact copies of another one."""
    return [
        sample_dir() / info["filename"]
        for info in sample_manifest()
        if info["duplicate_of"] is None
    ]


def sample_pages() -> dict[str, int]:
    return {info["filename"]: info["pages"] for info in sample_manifest()}


# -- settings ----------------------------------------------------------------------------------


def variant(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """The same settings with some keys of some sections changed (nested sections too:
    `services={"openai": {"mode": "real"}}`), validated as a configuration file would be."""

    def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            nested = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merged(out[key], value) if nested else value
        return out

    return load_settings(**merged(settings.model_dump(), sections))


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `ragstream worker` process needs to join this test's pipeline: the
    same broker, topic prefix, partitions, database and data directory (so the same blobs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    env.update(
        {
            "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
            "RAGSTREAM_KAFKA__PARTITIONS": str(settings.kafka.partitions),
            # A killed member is dropped from its group after this long (the broker's minimum).
            "RAGSTREAM_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "RAGSTREAM_POSTGRES__URL": settings.postgres.dsn(),
            "RAGSTREAM_DEVSTACK__DATA_DIR": str(settings.devstack.data_dir),
            "RAGSTREAM_OBSERVABILITY__LOG_FORMAT": "json",
            "RAGSTREAM_OBSERVABILITY__LOG_LEVEL": "INFO",
            "RAGSTREAM_OBSERVABILITY__METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


async def ragstream(settings: Settings, *args: str) -> tuple[int, str, str]:
    """`python -m ragstream ARGS` for this test's broker and prefix: exit code, stdout, stderr."""
    env = worker_env(settings, RAGSTREAM_OBSERVABILITY__LOG_FORMAT="console", COLUMNS="200")
    return await ragstream_in(env, *args)


async def ragstream_in(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`python -m ragstream ARGS` in a process of its own with exactly `env`: exit code,
    stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ragstream",
        *args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- workers -----------------------------------------------------------------------------------


@asynccontextmanager
async def workers(
    settings: Settings,
    stages: Iterable[Stage] = tuple(Stage),
    *,
    concurrency: int = 3,
    ready_timeout_s: float = 30.0,
    breakers: Mapping[str, CircuitBreaker] | None = None,
    providers: Providers | None = None,
    accountant: bool = False,
) -> AsyncIterator[list[StageRunner]]:
    """Stage workers in this process (`run_workers`), members of their groups until the block
    ends; entered once every stage holds partitions. `breakers` stand in for the circuit
    breakers the workers would build from the settings, `providers` for the providers;
    `accountant` runs a member of the cost group too."""
    stop = asyncio.Event()
    runners: list[StageRunner] = []
    started = asyncio.Event()

    def on_start(members: list[StageRunner]) -> None:
        runners.extend(members)
        started.set()

    task = asyncio.create_task(
        run_workers(
            settings,
            list(stages),
            concurrency=concurrency,
            stop=stop,
            started=on_start,
            breakers=breakers,
            providers=providers,
            accountant=accountant,
        )
    )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not (started.is_set() and all(r.assigned.is_set() for r in runners)):
            if task.done():
                task.result()  # raises what stopped it
                raise AssertionError("the workers stopped before they were assigned partitions")
            assert time.monotonic() < deadline, "the workers got no partitions in time"
            await asyncio.sleep(0.05)
        yield runners
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@dataclass
class WorkerProcess:
    """A real `python -m ragstream worker <stage>` process, its JSON log in a file."""

    settings: Settings
    stage: str
    log_path: Path
    client_id: str = "ragstream"
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # more RAGSTREAM_* variables, or overrides
    args: tuple[str, ...] = ()  # more options of `ragstream worker`, e.g. ("--concurrency", "8")

    def start(self) -> WorkerProcess:
        env = worker_env(self.settings, RAGSTREAM_KAFKA__CLIENT_ID=self.client_id, **self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ragstream", "worker", self.stage, *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a line cut short by SIGKILL is left out)."""
        out = []
        if not self.log_path.exists():
            return out
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    out.append(line)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def assigned(self, topic: str) -> list[int] | None:
        """The partitions of `topic` in this process's latest assignment (None before the
        first). The log names them `topic:partition`."""
        found = self.events("partitions assigned")
        if not found:
            return None
        return sorted(
            int(p.rsplit(":", 1)[1]) for p in found[-1]["partitions"] if p.startswith(f"{topic}:")
        )

    def handled(self) -> list[dict[str, Any]]:
        return self.events("record handled")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def freeze(self) -> None:
        """SIGSTOP: it does nothing (no publish, no commit, no heartbeat) until thawed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no clean-up, no commit, no LeaveGroup."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL if it does not end in time); the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        return int(self.proc.returncode)

    def tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


async def wait_until(
    condition: Any, timeout_s: float, what: str, *, poll_s: float = 0.1, explain: Any = None
) -> Any:
    """Await `condition()` (sync or async) until truthy; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            detail = explain() if explain else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{detail}")
        await asyncio.sleep(poll_s)


# -- reading the store -------------------------------------------------------------------------


async def documents(store: Store, document_ids: Sequence[str]) -> dict[str, Document | None]:
    gate = asyncio.Semaphore(8)

    async def one(doc_id: str) -> Document | None:
        async with gate:
            return await store.get_document(doc_id)

    found = await asyncio.gather(*(one(d) for d in document_ids))
    return dict(zip(document_ids, found, strict=True))


async def wait_for_statuses(
    store: Store,
    document_ids: Sequence[str],
    timeout_s: float,
    *,
    statuses: frozenset[str] = TERMINAL,
    explain: Any = None,
    running: Sequence[WorkerProcess] = (),
) -> dict[str, Document]:
    """Poll until every document has one of `statuses` (terminal ones by default); fail at
    once if one of the `running` worker processes has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in running:
            assert proc.alive(), f"worker {proc.stage} ({proc.log_path.name}) ended:\n{proc.tail()}"
        docs = await documents(store, document_ids)
        pending = [d for d, doc in docs.items() if doc is None or doc.status not in statuses]
        if not pending:
            return {d: doc for d, doc in docs.items() if doc is not None}
        if time.monotonic() > deadline:
            counts: dict[str, int] = {}
            for doc in docs.values():
                key = "not registered" if doc is None else doc.status
                counts[key] = counts.get(key, 0) + 1
            detail = explain() if explain else ""
            raise AssertionError(
                f"{len(pending)} of {len(document_ids)} documents not in {sorted(statuses)} "
                f"after {timeout_s:.0f}s: {counts}\n{detail}"
            )
        await asyncio.sleep(0.25)


async def rows_per_document(settings: Settings, tenant_id: str) -> dict[str, dict[str, int]]:
    """Per document of the tenant: parse results, chunks and embeddings held in PostgreSQL."""
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        out: dict[str, dict[str, int]] = {}
        for table in ("parse_results", "chunks", "embeddings"):
            rows = await conn.fetch(
                f"SELECT document_id, count(*) AS n FROM {table} WHERE tenant_id = $1 "
                "GROUP BY document_id",
                tenant_id,
            )
            for r in rows:
                out.setdefault(r["document_id"], {})[table] = int(r["n"])
        return out
    finally:
        await conn.close()


async def status_counts(settings: Settings, tenant_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM documents WHERE tenant_id = $1 GROUP BY status",
            tenant_id,
        )
        return {r["status"]: int(r["n"]) for r in rows}
    finally:
        await conn.close()


# -- reading Kafka -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    record: ConsumerRecord[bytes, bytes]
    event: Event

    @property
    def document_id(self) -> str:
        return str(getattr(self.event, "document_id", ""))

    @property
    def partition(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)

    @property
    def offset(self) -> int:
        return self.record.offset

    @property
    def headers(self) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in self.record.headers or ()}


async def read_topic(
    settings: Settings, topic: str, *, at_least: int = 0, timeout_s: float = 30.0
) -> list[Delivered]:
    """Every record on `topic` (no consumer group), decoded; waits until there are `at_least`."""
    codec = Codec()
    deadline = time.monotonic() + timeout_s
    consumer = AIOKafkaConsumer(
        topic,
        **settings.kafka.client_options(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        while not consumer.assignment():  # without a group: every partition, once known
            assert time.monotonic() < deadline, f"topic {topic} does not exist"
            await asyncio.sleep(0.05)
        tps = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        got: list[ConsumerRecord[bytes, bytes]] = []
        while True:
            end = await consumer.end_offsets(tps)
            total = sum(end.values()) - sum((await consumer.beginning_offsets(tps)).values())
            if total >= at_least:
                while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                    batch = await consumer.getmany(timeout_ms=1000)
                    for records in batch.values():
                        got.extend(records)
                    assert time.monotonic() < deadline, f"could not read {topic} to its end"
                break
            assert time.monotonic() < deadline, (
                f"{topic} holds {total} records, expected at least {at_least}"
            )
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
    return [Delivered(r, codec.decode(r.value or b"")) for r in got]


async def publish_raw(
    settings: Settings,
    records: Sequence[tuple[bytes | None, DocumentEvent]],
    topic: str | None = None,
) -> None:
    """What another system does: encode with the codec, key and headers of its choosing (to the
    uploaded topic unless another is named)."""
    codec = Codec()
    topic = topic or Topology(settings.kafka.topic_prefix).uploaded
    producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
    await producer.start()
    try:
        for key, event in records:
            await producer.send_and_wait(
                topic, codec.encode(event), key=key, headers=codec.headers_for(event)
            )
    finally:
        await producer.stop()


def dead_letters(delivered: list[Delivered]) -> dict[str, dict[str, str]]:
    """DLQ headers by the correlation id of the event dead-lettered."""
    out = {}
    for d in delivered:
        assert isinstance(d.event, DocumentEvent)
        out[d.event.correlation_id] = {k: v.decode(errors="replace") for k, v in d.headers.items()}
    return out


def hostile_claim_checks(
    tenant_id: str, uris: Mapping[str, str], *, size_bytes: int, sha256: str
) -> dict[str, DocumentUploaded]:
    """Uploads another system publishes for `tenant_id`, by name: each a claim check of its
    choosing, with correlation id `attack-<name>`."""
    return {
        name: DocumentUploaded(
            document_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            correlation_id=f"attack-{name}",
            filename="minutes.txt",
            content_type="text/plain",
            size_bytes=size_bytes,
            sha256=sha256,
            source_uri=uri,
            source_system="attacker",
        )
        for name, uri in uris.items()
    }


def assert_refused(letters: Mapping[str, Mapping[str, str]], rules: Mapping[str, str]) -> None:
    """Each `attack-<name>` was dead-lettered at once as ClaimCheckRefused, naming its rule."""
    for name, rule in rules.items():
        headers = letters[f"attack-{name}"]
        assert headers[H_ERR_CLASS] == "ClaimCheckRefused", (name, headers)
        assert headers[H_ERR_KIND] == "permanent"
        assert headers[H_ERR_MESSAGE].startswith("claim check refused: "), name
        assert rule in headers[H_ERR_MESSAGE], (name, headers[H_ERR_MESSAGE])


async def end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings, group_id: str) -> dict[TopicPartition, int]:
    async with admin_client(settings) as admin:
        offsets = await admin.list_consumer_group_offsets(group_id)
    return {tp: meta.offset for tp, meta in offsets.items()}


async def uncommitted(settings: Settings, group_id: str, topic: str) -> int:
    """Records on `topic` that `group_id` has not committed (the group has not finished them)."""
    ends = await end_offsets(settings, topic)
    committed = await committed_offsets(settings, group_id)
    return sum(max(0, end - committed.get(tp, 0)) for tp, end in ends.items())


async def caught_up(settings: Settings, stages: Iterable[Stage | str] = tuple(Stage)) -> bool:
    """Every group named has committed everything on its input topic. Checked in flow order,
    so with the stages before it done, a stage's input holds all that is coming."""
    topology = Topology(settings.kafka.topic_prefix)
    for stage in stages:
        if await uncommitted(settings, topology.group(stage), topology.input_topic(stage)):
            return False
    return True


def count_loops(runner: StageRunner) -> Callable[[], int]:
    """From now on, count the runner's poll loops (it asks its gate once a loop, whether or
    not the gate is closed); returns the count so far. A runner that has looped twice since
    a record became fetchable has seen it, or kept it paused on purpose."""
    gate = runner.gate
    loops = 0

    def counted() -> str | None:
        nonlocal loops
        loops += 1
        return gate() if gate is not None else None

    runner.gate = counted
    return lambda: loops


async def reset_group_to_earliest(settings: Settings, group_id: str, topic: str) -> None:
    """What `kafka-consumer-groups --reset-offsets --to-earliest` does, for a stopped group."""
    (state,) = [t for t in await describe_topics(settings) if t.name == topic]
    tps = [TopicPartition(topic, p) for p in range(state.partitions)]
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        beginning = await consumer.beginning_offsets(tps)
        await consumer.commit({tp: OffsetAndMetadata(beginning[tp], "") for tp in tps})
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Member:
    client_id: str
    partitions: dict[str, list[int]]  # topic -> partitions assigned


async def group_members(settings: Settings, group_id: str) -> tuple[str, list[Member]]:
    """The group's state and its members with their assigned partitions (DescribeGroups)."""
    async with admin_client(settings) as admin:
        group = await describe_group(admin, group_id)
    out = []
    for member in group.members:
        parts: dict[str, list[int]] = {}
        for topic, partition in member.partitions:
            parts.setdefault(topic, []).append(partition)
        out.append(Member(member.client_id, parts))
    return group.state, out
