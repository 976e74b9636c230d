"""The pipeline's throughput against its same-run ceiling, its latency at half load, and the
memory of its processes.

    .venv/bin/python benchmarks/bench_pipeline.py [--documents 2000] [--latency-s 20]
        [--bootstrap HOST:PORT --database-url URL] [--json PATH]

One invocation, one generated corpus (`--documents` distinct Markdown documents of about 4 KB,
7 chunks each), each pass from empty tables:

- pipeline: the default shape, `ragstream worker all` as `ragstream stack up` starts it
  (`ragstream.stack.start_workers`), against topics and a database of its own; timed from the
  start of the upload (the library publisher, as `ragstream upload` publishes) until the last
  document is `embedded` in PostgreSQL.
- ceiling: the same documents through the same four topics by three consumer groups that
  commit, and the same rows written in batches, with no pipeline logic, written with aiokafka
  and asyncpg only (benchmarks/ceiling.py).
- logic: parse, chunk and local embedding of every document, one at a time in one process,
  with no Kafka and no database (the pipeline's own parser, chunker and embedder).
- combined ceiling = 1 / (1/ceiling + 1/logic): the pipeline's work at the ceiling's cost;
  ratio = pipeline / combined ceiling. The logic and ceiling passes run twice, before the
  pipeline and latency passes and after them (logic, ceiling, pipeline, latency, ceiling,
  logic), and each counts at the mean of its two rates: the speed of a shared machine drifts
  over minutes, and a drift then moves both sides of the ratio alike instead of one.
- latency: a fresh pipeline, warmed up with a few documents (its parse and chunk processes
  start on the first), then fed at half the measured pipeline rate for `--latency-s` after a
  first `LATENCY_WARM_UP_S` at that rate that is not counted (fresh topics and tables settle);
  each document's upload-to-embedded time as PostgreSQL holds it (uploaded_at to updated_at).
- memory: the peak RSS (VmHWM) of the worker process and every process under it, and of the
  ceiling's stage processes.
- machine speed: a fixed piece of pure-Python work, timed by its own CPU time every 2 s in a
  process of its own (waiting for a core does not count), reported per pass against the
  pipeline pass. A shared machine's speed moves by a third and more within minutes; when it
  drops during the latency pass, that pass ran above half of what the machine could do then.

It starts its own Kafka broker and PostgreSQL in a temporary directory (or uses those named by
`--bootstrap` and `--database-url`, or RAGSTREAM_KAFKA_BOOTSTRAP and RAGSTREAM_DATABASE_URL),
creates a database per pass on that server and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, astuple, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import ceiling
from benchmarks.bench_embed_scaling import bench_services
from benchmarks.ceiling import StageTimes
from producers.upload import Uploader, upload_paths
from ragstream.admin import admin_client, describe_group, ensure_topics
from ragstream.chunking import Chunker
from ragstream.content_types import detect_content_type
from ragstream.logs import configure_logging
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.parse.local import LocalParser
from ragstream.samples import sample_dir
from ragstream.settings import Settings, load_settings
from ragstream.stack import start_workers, stop_workers
from ragstream.store import migrate
from ragstream.tokens import get_tokenizer
from ragstream.topology import Stage, Topology

TENANT = "bench"
WARM_UP = 5  # documents through a fresh pipeline before its latency is measured
LATENCY_WARM_UP_S = 5.0  # then the first seconds of the half-load feed, not counted

# -- the corpus --------------------------------------------------------------------------------


def _sample_prose() -> tuple[list[str], list[str]]:
    """Paragraphs and headings of the bundled Markdown and text samples."""
    paragraphs, headings = [], []
    for path in sorted(sample_dir().iterdir()):
        if path.suffix not in (".md", ".txt"):
            continue
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError:  # a sample in another encoding, on purpose
            continue
        for block in (b.strip() for b in text.split("\n\n")):
            if block.startswith("#"):
                headings.append(block.lstrip("#").strip())
            elif len(block) > 120 and "\n" not in block and block[0].isalpha():
                paragraphs.append(block)
    return paragraphs, headings


def write_corpus(directory: Path, count: int, *, start: int = 0) -> list[Path]:
    """`count` distinct Markdown documents of about 4 KB: a title, an introduction and six `##`
    sections of about 440 characters of the samples' prose, every section carrying the
    document's own word (`docNNNNNN`), so every chunk text is new (nothing is cached)."""
    paragraphs, headings = _sample_prose()
    rng = random.Random(2000 + start)
    directory.mkdir(parents=True, exist_ok=True)

    def section(tag: str) -> str:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 440:
            words += rng.choice(paragraphs).split(" ")
        words.insert(rng.randrange(len(words)), tag)
        return " ".join(words)

    paths = []
    for n in range(start, start + count):
        tag = f"doc{n:06d}"
        parts = [f"# Field notes {n}: {rng.choice(headings)}", section(tag)]
        for s in range(6):
            parts += [f"## {rng.choice(headings)} ({n}.{s + 1})", section(tag)]
        path = directory / f"notes-{n:06d}.md"
        path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


# -- memory ------------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _tree(pid: int) -> Iterator[int]:
    """`pid` and every process under it."""
    yield pid
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                yield from _tree(int(child))


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and of its children it has reaped (user + system)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(f) for f in fields[11:15]) * TICK_S  # utime stime cutime cstime


def tree_cpu_s(roots: Iterable[int]) -> float:
    """CPU seconds of these processes and every process under them, living or reaped."""
    return sum(cpu_s(pid) for root in roots for pid in _tree(root))


def servers_under(directory: Path) -> dict[str, list[int]]:
    """The broker's and PostgreSQL's root processes started with `directory` in their command
    line (this run's own), by name; empty for servers given on the command line."""
    found: dict[str, list[int]] = {"kafka": [], "postgres": []}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            text = (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            if str(directory) in text:
                name = "postgres" if "postgres" in text.split()[0] else "kafka"
                found[name].append(int(proc.name))
    return {
        name: [p for p in pids if not any(p in set(_tree(q)) - {q} for q in pids)]
        for name, pids in found.items()
    }


@dataclass
class CpuMeter:
    """CPU seconds the run's broker and PostgreSQL spend between `start` and `stop`."""

    servers: dict[str, list[int]]
    spent: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.spent = {name: -tree_cpu_s(pids) for name, pids in self.servers.items()}

    def stop(self) -> dict[str, float]:
        return {name: s + tree_cpu_s(self.servers[name]) for name, s in self.spent.items()}


T = TypeVar("T")

# A latency pass that ran below this share of the pipeline pass's machine speed is flagged.
SLOWER: Final = 0.85


def _label(pid: int, root: int, forkservers: set[int]) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return "?"
    text = " ".join(a for a in argv if a)
    if "forkserver" in text and parent not in forkservers:
        forkservers.add(pid)
        return "multiprocessing forkserver"
    if parent in forkservers:
        return "pool process (forked by the forkserver)"
    if "resource_tracker" in text:
        return "multiprocessing resource tracker"
    if "-m ragstream" in text:
        return "ragstream " + text.split("-m ragstream", 1)[1].strip()
    return text[:60] if pid != root else "worker process"


# The probe's work: some 10 ms of CPU on the 2-core machine, every 2 s (half a percent of a core).
_PROBE = """
import time
while True:
    began = time.process_time()
    total = 0
    for i in range(100_000):
        total += i
    print(f"{time.time():.3f} {(time.process_time() - began) * 1000:.3f}", flush=True)
    time.sleep(2)
"""


class SpeedProbe:
    """How fast the machine runs: the CPU milliseconds of a fixed piece of work, sampled in a
    process of its own while the passes run; `during` gives a window's median."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (time, work ms)
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROBE, stdout=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for line in self._process.stdout:
            at, ms = line.split()
            self.samples.append((float(at), float(ms)))

    def during(self, windows: Iterable[tuple[float, float]]) -> float | None:
        """The median work time (ms) of the samples inside these (start, end) windows."""
        inside = [ms for at, ms in self.samples if any(t0 <= at <= t1 for t0, t1 in windows)]
        return statistics.median(inside) if inside else None

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


@dataclass
class PeakRss:
    """The peak RSS of a process and every process under it, sampled until the end."""

    root: int
    peaks_kib: dict[int, int] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    cpu_s: float = 0.0  # the whole tree's CPU seconds, at the last sample

    def sample(self) -> None:
        forkservers: set[int] = set()
        self.cpu_s = max(self.cpu_s, tree_cpu_s([self.root]))
        for pid in _tree(self.root):
            hwm = _status_kib(pid, "VmHWM")
            if hwm is not None:
                self.peaks_kib[pid] = max(hwm, self.peaks_kib.get(pid, 0))
                self.labels.setdefault(pid, _label(pid, self.root, forkservers))

    async def follow(self, every_s: float = 0.5) -> None:
        while True:
            self.sample()
            await asyncio.sleep(every_s)

    def rows(self) -> list[tuple[str, int, float]]:
        return [(self.labels[p], p, kib / 1024) for p, kib in sorted(self.peaks_kib.items())]


# -- services and databases --------------------------------------------------------------------


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def _on_server(server_dsn: str, statement: str) -> None:
    admin = await asyncpg.connect(_with_database(server_dsn, "postgres"))
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def create_database(server_dsn: str, name: str) -> str:
    await _on_server(server_dsn, f'CREATE DATABASE "{name}"')
    return _with_database(server_dsn, name)


async def drop_database(server_dsn: str, name: str) -> None:
    await _on_server(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Variables the worker process inherits (`start_workers` passes on this environment)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- following a run in PostgreSQL -------------------------------------------------------------


@dataclass(frozen=True)
class PassResult:
    name: str
    documents: int
    chunks: int
    seconds: float
    note: str = ""
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds, by process group

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds

    @classmethod
    def mean_of(cls, runs: Sequence[PassResult]) -> PassResult:
        """Runs of one pass as one: the mean of their rates (and of their CPU); the note
        gives each run's rate, in the order they ran."""
        first = runs[0]
        rate = statistics.mean(r.docs_per_s for r in runs)
        groups = {g for r in runs for g in r.cpu_s}
        cpu = {g: statistics.mean(r.cpu_s.get(g, 0.0) for r in runs) for g in sorted(groups)}
        note = first.note
        if len(runs) > 1:
            note = "runs: " + ", ".join(f"{r.docs_per_s:.1f}" for r in runs) + " docs/s"
        return cls(first.name, first.documents, first.chunks, first.documents / rate, note, cpu)


async def follow(
    dsn: str,
    total: int,
    progress: Progress,
    what: str,
    *,
    alive: Callable[[], str | None] = lambda: None,
    stall_s: float = 180.0,
) -> float:
    """Poll until `total` documents are `embedded`; the epoch time the last one became so.
    Fails on a failed or dead-lettered document, on `alive()` naming a problem, or when nothing
    moves for `stall_s`."""
    task = progress.add_task(what, total=total, breakdown="")
    conn = await asyncpg.connect(dsn)
    try:
        last: dict[str, int] = {}
        moved = time.monotonic()
        while True:
            rows = await conn.fetch(
                "SELECT status, count(*) AS n FROM documents GROUP BY status ORDER BY status"
            )
            counts = {r["status"]: int(r["n"]) for r in rows}
            done = counts.get("embedded", 0)
            progress.update(
                task,
                completed=done,
                breakdown="  ".join(f"{k} {v}" for k, v in counts.items()),
            )
            if done >= total:
                end: float = await conn.fetchval(
                    "SELECT extract(epoch FROM max(updated_at))::float8 FROM documents"
                )
                return end
            if counts.get("failed") or counts.get("dead-lettered"):
                reasons = await conn.fetch(
                    "SELECT status_reason FROM documents WHERE status IN ('failed', 'dead-lettered')"
                    " LIMIT 3"
                )
                raise RuntimeError(f"{what}: documents failed: {[r[0] for r in reasons]}")
            problem = alive()
            if problem:
                raise RuntimeError(f"{what}: {problem}")
            if counts != last:
                last, moved = counts, time.monotonic()
            elif time.monotonic() - moved > stall_s:
                raise RuntimeError(f"{what}: nothing moved for {stall_s:.0f}s: {counts}")
            await asyncio.sleep(0.25)
    finally:
        await conn.close()
        progress.remove_task(task)


async def count_rows(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


# -- the pipeline ------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """A fresh pipeline: topics, database and `ragstream worker all`, as `stack up` starts it."""

    settings: Settings
    server_dsn: str
    database: str
    rss: PeakRss | None = None

    @classmethod
    async def start(
        cls, bootstrap: str, server_dsn: str, work: Path, env: dict[str, str] | None = None
    ) -> Pipeline:
        prefix = f"bench{uuid4().hex[:8]}"
        dsn = await create_database(server_dsn, prefix)
        settings = load_settings(
            kafka={"bootstrap_servers": bootstrap, "topic_prefix": prefix},
            postgres={"url": dsn},
            devstack={"data_dir": work / prefix},
            observability={"metrics_port": 0},
        )
        pipeline = cls(settings, server_dsn, prefix)
        try:
            # what `stack up` does before it starts the workers
            await ensure_topics(settings)
            await migrate(dsn, dimensions=settings.embed.dimensions)
            more = {"RAGSTREAM_POSTGRES__URL": dsn, "RAGSTREAM_OBSERVABILITY__METRICS_PORT": "0"}
            with environ(**more, **(env or {})):
                pid, _ = await asyncio.to_thread(start_workers, settings, 120.0)
            pipeline.rss = PeakRss(pid)
            await pipeline.wait_assigned()
        except BaseException:
            await pipeline.stop()
            raise
        return pipeline

    async def wait_assigned(self, timeout_s: float = 120.0) -> None:
        """Until every stage's group is stable and holds all its input partitions."""
        topology = Topology(self.settings.kafka.topic_prefix)
        deadline = time.monotonic() + timeout_s
        async with admin_client(self.settings) as admin:
            for stage in Stage:
                source = topology.input_topic(stage)
                while True:
                    group = await describe_group(admin, topology.group(stage))
                    held = {p for m in group.members for t, p in m.partitions if t == source}
                    if group.state == "Stable" and len(held) == self.settings.kafka.partitions:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the {stage} group got no partitions: {self.log_tail()}"
                        )
                    await asyncio.sleep(0.2)

    def problem(self) -> str | None:
        if self.rss is None or not Path(f"/proc/{self.rss.root}").exists():
            return f"the worker process ended:\n{self.log_tail()}"
        return None

    def log_tail(self, lines: int = 30) -> str:
        log = self.settings.devstack.data_dir / "workers.log"
        return (
            "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""
        )

    async def run(self, feed: Awaitable[float], total: int, progress: Progress, what: str) -> float:
        """Feed it (`feed` returns the seconds publishing took) and follow it until `total`
        documents are embedded; the epoch time the last one was."""
        assert self.rss is not None
        sampler = asyncio.create_task(self.rss.follow())
        feeding = asyncio.ensure_future(feed)
        publisher_failed = failed(feeding)
        try:
            end = await follow(
                self.settings.postgres.dsn(),
                total,
                progress,
                what,
                alive=lambda: self.problem() or publisher_failed(),
            )
            await feeding
            return end
        finally:
            feeding.cancel()
            sampler.cancel()
            self.rss.sample()

    async def stop(self, *, keep: bool = False) -> None:
        if self.rss is not None:
            self.rss.sample()
        await asyncio.to_thread(stop_workers, self.settings)
        if not keep:
            await drop_database(self.server_dsn, self.database)


def failed(publishing: asyncio.Future[Any]) -> Callable[[], str | None]:
    """What went wrong with publishing, once it has ended in an error."""

    def problem() -> str | None:
        if publishing.done() and not publishing.cancelled() and publishing.exception():
            return f"publishing failed: {publishing.exception()!r}"
        return None

    return problem


async def timed(work: Awaitable[Any]) -> float:
    started = time.monotonic()
    await work
    return time.monotonic() - started


async def upload_all(settings: Settings, paths: Sequence[Path], tenant: str) -> float:
    """Publish every document as `ragstream upload` does; the seconds it took."""
    started = time.monotonic()
    _, rejected = await upload_paths(settings, list(paths), tenant_id=tenant)
    if rejected:
        raise RuntimeError(f"{len(rejected)} uploads not published: {rejected[0].reason}")
    return time.monotonic() - started


async def paced_upload(settings: Settings, paths: Sequence[Path], rate: float) -> float:
    """Publish one document every 1/rate seconds, as the library publisher streams them."""
    async with Uploader(settings) as uploader:
        started = time.monotonic()
        for n, path in enumerate(paths):
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            await uploader.upload_file(path, tenant_id=TENANT, wait=False)
        failed = await uploader.flush()
        if failed:
            raise RuntimeError(f"{len(failed)} uploads not published: {failed[0][1]!r}")
        return time.monotonic() - started


@dataclass(frozen=True)
class StageSteps:
    """A pipeline stage's handling of one record, as its journey steps recorded it."""

    steps: int
    mean_ms: float
    p50_ms: float
    p99_ms: float


async def stage_steps(dsn: str) -> dict[str, StageSteps]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT stage, count(*) AS n, avg(duration_ms) AS mean,"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50,"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms) AS p99"
            " FROM document_events WHERE outcome = 'ok' GROUP BY stage"
        )
    finally:
        await conn.close()
    order = [s.value for s in Stage]
    found = {r["stage"]: StageSteps(r["n"], r["mean"], r["p50"], r["p99"]) for r in rows}
    rank = {stage: n for n, stage in enumerate(order)}
    return {s: found[s] for s in sorted(found, key=lambda s: (rank.get(s, len(order)), s))}


async def pipeline_pass(
    bootstrap: str,
    server_dsn: str,
    work: Path,
    paths: Sequence[Path],
    progress: Progress,
    meter: CpuMeter,
) -> tuple[PassResult, PeakRss, dict[str, StageSteps]]:
    pipeline = await Pipeline.start(bootstrap, server_dsn, work)
    try:
        assert pipeline.rss is not None
        workers_before = tree_cpu_s([pipeline.rss.root])
        meter.start()
        started = time.time()
        publishing = asyncio.ensure_future(upload_all(pipeline.settings, paths, TENANT))
        end = await pipeline.run(publishing, len(paths), progress, "pipeline")
        cpu = {"stages": pipeline.rss.cpu_s - workers_before, **meter.stop()}
        dsn = pipeline.settings.postgres.dsn()
        chunks = await count_rows(dsn, "chunks")
        steps = await stage_steps(dsn)
        note = f"uploads published in {publishing.result():.1f} s"
        result = PassResult("pipeline", len(paths), chunks, end - started, note, cpu)
        return result, pipeline.rss, steps
    finally:
        await pipeline.stop()


@dataclass(frozen=True)
class Latency:
    rate: float
    documents: int
    p50_ms: float
    p99_ms: float


async def latency_pass(
    bootstrap: str,
    server_dsn: str,
    work: Path,
    paths: Sequence[Path],
    rate: float,
    progress: Progress,
) -> tuple[Latency, PeakRss]:
    """A fresh pipeline, warmed up with a few documents of another tenant (its parse and chunk
    processes start on the first document), then fed `paths` at `rate`."""
    pipeline = await Pipeline.start(bootstrap, server_dsn, work)
    warm, paced = paths[:WARM_UP], paths[WARM_UP:]
    try:
        feed = upload_all(pipeline.settings, warm, f"{TENANT}-warm-up")
        await pipeline.run(feed, len(warm), progress, "warming up")
        feed = paced_upload(pipeline.settings, paced, rate)
        await pipeline.run(feed, len(paths), progress, f"latency at {rate:.1f} docs/s")
        conn = await asyncpg.connect(pipeline.settings.postgres.dsn())
        try:
            rows = await conn.fetch(
                "SELECT extract(epoch FROM updated_at - uploaded_at)::float8 * 1000 AS ms "
                "FROM documents WHERE status = 'embedded' AND tenant_id = $1 AND uploaded_at >= "
                "(SELECT min(uploaded_at) FROM documents WHERE tenant_id = $1) + $2::interval",
                TENANT,
                timedelta(seconds=LATENCY_WARM_UP_S),
            )
        finally:
            await conn.close()
        ms = sorted(r["ms"] for r in rows)
        assert pipeline.rss is not None
        return Latency(rate, len(ms), _percentile(ms, 50), _percentile(ms, 99)), pipeline.rss
    finally:
        await pipeline.stop()


def _percentile(ordered: Sequence[float], p: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(p) - 1]


# -- the ceiling and the logic -----------------------------------------------------------------


async def ceiling_pass(
    bootstrap: str,
    server_dsn: str,
    paths: Sequence[Path],
    vectors: Sequence[Sequence[bytes]],
    partitions: int,
    progress: Progress,
    meter: CpuMeter,
) -> tuple[PassResult, dict[str, ceiling.StageReport]]:
    name = f"ceiling{uuid4().hex[:8]}"
    dsn = await create_database(server_dsn, name)
    vectors_file = paths[0].parent.with_name(f"{name}.vectors")
    ceiling.write_vectors(vectors_file, vectors)
    config = ceiling.CeilingConfig(bootstrap, dsn, name, partitions, len(paths), str(vectors_file))
    try:
        await ceiling.prepare(config)
        stages = await ceiling.start_stages(config)
        try:
            # sampled as they run: each stage process ends once it has seen every document
            samplers = [PeakRss(stage.process.pid) for stage in stages]
            following = [asyncio.create_task(sampler.follow()) for sampler in samplers]
            meter.start()
            started = time.time()
            publishing = asyncio.ensure_future(timed(ceiling.publish(config, paths, TENANT)))
            try:
                end = await follow(dsn, len(paths), progress, "ceiling", alive=failed(publishing))
            finally:
                for task in following:
                    task.cancel()
            servers_cpu = meter.stop()
            published_s = await publishing
            reports = await ceiling.finish_stages(stages, timeout_s=60)
            # each stage process counts its own CPU from `ready` on, to its end
            cpu = {"stages": sum(r.times.cpu_s for r in reports.values()), **servers_cpu}
        finally:
            await ceiling.stop_stages(stages)
        chunks = await count_rows(dsn, "chunks")
    finally:
        await drop_database(server_dsn, name)
        vectors_file.unlink(missing_ok=True)
    note = f"published in {published_s:.1f} s"
    return PassResult("ceiling", len(paths), chunks, end - started, note, cpu), reports


async def logic_pass(
    settings: Settings, paths: Sequence[Path], progress: Progress, meter: CpuMeter
) -> tuple[PassResult, list[list[bytes]]]:
    """Parse, chunk and embed each document in turn, as the stages call them, in this process
    (the parser and chunker run their work in their child processes, as in the pipeline).
    Also the vectors made, per document, for the ceiling to write."""
    documents = [(p.name, p.read_bytes()) for p in paths]
    parser = LocalParser(settings.parse)
    chunker = Chunker(settings.chunk, get_tokenizer())
    embedder = LocalEmbedder(settings.embed.dimensions)

    async def one(name: str, data: bytes) -> list[list[float]]:
        parsed = await parser.parse(
            data, filename=name, content_type=detect_content_type(name, data)
        )
        chunks = await chunker.achunk(parsed.markdown)
        return (await embedder.embed([c.text for c in chunks])).vectors

    task = progress.add_task("logic only", total=len(documents), breakdown="")
    vectors: list[list[bytes]] = []
    seconds = 0.0
    try:
        await one(*documents[0])  # starts the parser's and chunker's processes
        meter.start()
        own = -tree_cpu_s([os.getpid()])
        for name, data in documents:
            started = time.monotonic()
            made = await one(name, data)
            seconds += time.monotonic() - started
            vectors.append([ceiling.pack_vector(v) for v in made])
            progress.advance(task)
        servers = meter.stop()  # this process's children, to be taken out of its own
        own += tree_cpu_s([os.getpid()]) - sum(servers.values())
    finally:
        progress.remove_task(task)
        await parser.aclose()
        await chunker.aclose()
    chunks = sum(map(len, vectors))
    return PassResult("logic", len(documents), chunks, seconds, cpu_s={"stages": own}), vectors


# -- the report --------------------------------------------------------------------------------


@dataclass
class Report:
    documents: int
    mean_kib: float
    pipeline: PassResult
    ceiling: PassResult  # the mean of `runs["ceiling"]`
    logic: PassResult  # the mean of `runs["logic"]`
    latency: Latency | None
    rss: list[tuple[str, int, float]]  # (process, pid, peak MiB)
    ceiling_stages: dict[str, StageTimes]
    pipeline_steps: dict[str, StageSteps]
    runs: dict[str, list[PassResult]] = field(default_factory=dict)  # before and after
    # (pass, the speed probe's median work ms during it), in the order run
    speeds: list[tuple[str, float | None]] = field(default_factory=list)

    def speed(self, name: str) -> float | None:
        """The machine's speed during a pass against the pipeline pass (below 1: slower)."""
        work = dict(self.speeds)
        reference, during = work.get("pipeline"), work.get(name)
        return reference / during if reference and during else None

    @property
    def combined(self) -> float:
        return 1 / (1 / self.ceiling.docs_per_s + 1 / self.logic.docs_per_s)

    @property
    def ratio(self) -> float:
        return self.pipeline.docs_per_s / self.combined

    def as_json(self) -> dict[str, Any]:
        def figures(p: PassResult) -> dict[str, Any]:
            return {**asdict(p), "docs_per_s": p.docs_per_s, "chunks_per_s": p.chunks_per_s}

        passes = {p.name: figures(p) for p in (self.pipeline, self.ceiling, self.logic)}
        for name, runs in self.runs.items():
            passes[name]["runs"] = [figures(r) for r in runs]
        return {
            "documents": self.documents,
            "mean_kib": self.mean_kib,
            **passes,
            "combined_docs_per_s": self.combined,
            "ratio": self.ratio,
            "latency": asdict(self.latency) if self.latency else None,
            "peak_rss": [{"process": n, "pid": p, "mib": m} for n, p, m in self.rss],
            "ceiling_stages": {s: asdict(t) for s, t in self.ceiling_stages.items()},
            "pipeline_steps": {s: asdict(t) for s, t in self.pipeline_steps.items()},
            "machine_speed": [
                {"pass": name, "probe_ms": ms, "vs_pipeline": self.speed(name)}
                for name, ms in self.speeds
            ],
        }

    def print(self, console: Console) -> None:
        chunks_per_doc = self.pipeline.chunks / self.pipeline.documents
        table = Table(
            title=f"{self.documents} documents, {self.mean_kib:.1f} KiB and "
            f"{chunks_per_doc:.1f} chunks each"
        )
        for column in ("pass", "docs/s", "chunks/s", "seconds"):
            table.add_column(column, justify="left" if column == "pass" else "right")
        table.add_column("note")
        label = {
            "pipeline": "pipeline (`worker all`, from upload start)",
            "ceiling": "ceiling (Kafka + PostgreSQL, no logic), mean",
            "logic": "logic only (parse + chunk + embed), mean",
        }
        for p in (self.pipeline, self.ceiling, self.logic):
            table.add_row(
                label[p.name],
                f"{p.docs_per_s:.1f}",
                f"{p.chunks_per_s:.0f}",
                f"{p.seconds:.1f}",
                p.note,
            )
        chunk_rate = self.combined * self.logic.chunks / self.logic.documents
        table.add_row("combined ceiling", f"{self.combined:.1f}", f"{chunk_rate:.0f}", "", "")
        table.add_row("[bold]ratio pipeline / combined", f"[bold]{self.ratio:.2f}", "", "", "")
        console.print(table)
        if self.latency:
            lat = Table(title="upload → embedded at half the pipeline's rate")
            columns = ("docs/s offered", "documents", "p50 ms", "p99 ms", "machine speed")
            for column in columns:
                lat.add_column(column, justify="right")
            speed = self.speed("latency")
            lat.add_row(
                f"{self.latency.rate:.1f}",
                str(self.latency.documents),
                f"{self.latency.p50_ms:.0f}",
                f"{self.latency.p99_ms:.0f}",
                f"{speed:.2f}" if speed else "",
            )
            console.print(lat)
            if speed is not None and speed < SLOWER:
                console.print(
                    f"[yellow]the machine ran at {speed:.2f} of its pipeline-pass speed during "
                    "the latency pass: the load offered was more than half of what it could "
                    "do then"
                )
        steps = Table(title="the pipeline's stages: one record's step, from its journey")
        for column in ("stage", "steps", "mean ms", "p50 ms", "p99 ms"):
            steps.add_column(column, justify="left" if column == "stage" else "right")
        for stage, st in self.pipeline_steps.items():
            steps.add_row(
                stage, str(st.steps), f"{st.mean_ms:.1f}", f"{st.p50_ms:.1f}", f"{st.p99_ms:.1f}"
            )
        console.print(steps)
        cpu = Table(title="CPU seconds per 1,000 documents (user + system)")
        groups = ("stages", "postgres", "kafka")
        for column in ("pass", "own processes", "PostgreSQL", "Kafka", "total"):
            cpu.add_column(column, justify="left" if column == "pass" else "right")
        for p in (self.pipeline, self.ceiling, self.logic):
            per = {g: p.cpu_s.get(g, 0.0) * 1000 / p.documents for g in groups}
            cells = [f"{per[g]:.1f}" if g in p.cpu_s else "" for g in groups]
            cpu.add_row(p.name, *cells, f"{sum(per.values()):.1f}")
        console.print(cpu)
        stages = Table(
            title="the ceiling's stage processes: where their time went (mean of its runs)"
        )
        for column in ("stage", "busy s", "in PostgreSQL s", "in Kafka s"):
            stages.add_column(column, justify="left" if column == "stage" else "right")
        for stage, t in self.ceiling_stages.items():
            stages.add_row(stage, f"{t.busy_s:.1f}", f"{t.postgres_s:.1f}", f"{t.kafka_s:.1f}")
        console.print(stages)
        speeds = Table(
            title="machine speed: a fixed piece of work's CPU ms (median), against the pipeline "
            "pass (below 1: slower)"
        )
        for column in ("pass", "probe ms", "speed"):
            speeds.add_column(column, justify="left" if column == "pass" else "right")
        for name, ms in self.speeds:
            speed = self.speed(name)
            speeds.add_row(name, f"{ms:.1f}" if ms else "", f"{speed:.2f}" if speed else "")
        console.print(speeds)
        mem = Table(title="peak RSS (VmHWM)")
        mem.add_column("process")
        mem.add_column("pid", justify="right")
        mem.add_column("MiB", justify="right")
        for name, pid, mib in self.rss:
            mem.add_row(name, str(pid), f"{mib:.0f}")
        console.print(mem)


async def bench(args: argparse.Namespace, bootstrap: str, server_dsn: str, work: Path) -> Report:
    console = Console(stderr=True)
    settings = load_settings(kafka={"bootstrap_servers": bootstrap}, devstack={"data_dir": work})
    console.print(f"writing {args.documents} documents")
    paths = write_corpus(work / "corpus", args.documents)
    mean_kib = statistics.mean(p.stat().st_size for p in paths) / 1024
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[breakdown]}"),
        TimeElapsedColumn(),
        console=console,
    )
    say = progress.console.print
    meter = CpuMeter(servers_under(work))
    logic: list[PassResult] = []
    ceilings: list[PassResult] = []
    probe = SpeedProbe()
    windows: list[tuple[str, float, float]] = []  # (pass, start, end) in the order run

    async def marked(name: str, running: Awaitable[T]) -> T:
        began = time.time()
        try:
            return await running
        finally:
            windows.append((name, began, time.time()))

    async def logic_run(when: str) -> list[list[bytes]]:
        say(f"logic only ({when}): parsing, chunking and embedding in this process")
        result, made = await marked(f"logic ({when})", logic_pass(settings, paths, progress, meter))
        logic.append(result)
        return made

    async def ceiling_run(
        when: str, vectors: Sequence[Sequence[bytes]]
    ) -> dict[str, ceiling.StageReport]:
        say(f"ceiling ({when}): starting its three stage processes")
        result, reports = await marked(
            f"ceiling ({when})",
            ceiling_pass(
                bootstrap, server_dsn, paths, vectors, settings.kafka.partitions, progress, meter
            ),
        )
        ceilings.append(result)
        return reports

    await probe.start()
    try:
        with progress:
            vectors = await logic_run("before")
            stages = await ceiling_run("before", vectors)
            say("pipeline: starting `ragstream worker all` as `stack up` does")
            pipeline, worker_rss, steps = await marked(
                "pipeline", pipeline_pass(bootstrap, server_dsn, work, paths, progress, meter)
            )
            latency = None
            rss = [(f"pipeline: {n}", p, m) for n, p, m in worker_rss.rows()]
            if args.latency_s > 0:
                rate = pipeline.docs_per_s / 2
                count = max(5, round(rate * (args.latency_s + LATENCY_WARM_UP_S))) + WARM_UP
                more = write_corpus(work / "latency", count, start=args.documents)
                say("latency: starting a fresh `ragstream worker all`")
                latency, latency_rss = await marked(
                    "latency", latency_pass(bootstrap, server_dsn, work, more, rate, progress)
                )
                rss += [(f"latency run: {n}", p, m) for n, p, m in latency_rss.rows()]
            again = await ceiling_run("after", vectors)
            await logic_run("after")
    finally:
        await probe.stop()
    for label, run in (("ceiling", stages), ("ceiling, after", again)):
        rss += [(f"{label}: {s} stage", r.pid, r.peak_rss_kib / 1024) for s, r in run.items()]
    times = {
        s: StageTimes(
            *(
                statistics.mean(pair)
                for pair in zip(astuple(r.times), astuple(again[s].times), strict=True)
            )
        )
        for s, r in stages.items()
    }
    return Report(
        args.documents,
        mean_kib,
        pipeline,
        PassResult.mean_of(ceilings),
        PassResult.mean_of(logic),
        latency,
        rss,
        times,
        steps,
        {"ceiling": ceilings, "logic": logic},
        [(name, probe.during([(t0, t1)])) for name, t0, t1 in windows],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument(
        "--latency-s", type=float, default=20.0, help="length of the half-load run (0: none)"
    )
    parser.add_argument("--bootstrap", default=os.environ.get("RAGSTREAM_KAFKA_BOOTSTRAP"))
    parser.add_argument("--database-url", default=os.environ.get("RAGSTREAM_DATABASE_URL"))
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    args = parser.parse_args()
    configure_logging("WARNING", "console")  # the tables, not every record
    with bench_services(args.bootstrap, args.database_url) as (bootstrap, server_dsn, directory):
        report = asyncio.run(bench(args, bootstrap, server_dsn, directory))
    report.print(Console(width=None if sys.stdout.isatty() else 120))
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2))


if __name__ == "__main__":
    main()
