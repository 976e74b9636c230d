"""A chaos run, shared by the bounded test (tests/integration/test_chaos.py) and the long run
(benchmarks/chaos.py).

A broker and a PostgreSQL of the run's own; `ragstream worker` processes under a supervisor
that starts again whatever ends (as systemd's `Restart=always` would); documents uploaded in
batches through the producer (`producers.upload.Uploader`) while faults come on a schedule:
SIGKILL of a random worker every `kill_interval_s` (started again at once), broker SIGKILLs
and restarts, PostgreSQL stops and restarts. Then the pipeline is left to settle, and the
report (tests/integration/chaos_report.py) says what became of every document:

    services = start_services(directory)      # LocalKafka + LocalPostgres, on free ports
    report = await run_chaos(services, ChaosPlan(documents=300), work_dir,
                             on_progress=snapshot_printer(10), on_event=print)
    report.problems()      # [] when nothing was lost, duplicated or dead-lettered
    report.describe()      # the figures, the timeline, worker exits, the documents that went
                           # wrong grouped by what went wrong (status, reason, DLQ headers)
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
from aiokafka.errors import KafkaError

from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.devstack.kafka import LocalKafka
from ragstream.devstack.postgres import LocalPostgres
from ragstream.errors import InfrastructureError, RetryableError
from ragstream.settings import load_settings
from ragstream.store.migrate import migrate
from ragstream.topology import Stage, Topology
from tests.conftest import new_local_kafka, new_local_postgres
from tests.integration.chaos_report import SETTLED, ChaosEvent, ChaosReport, examine
from tests.integration.pipeline_helpers import (
    committed_offsets,
    end_offsets,
    make_corpus,
    status_counts,
)
from tests.integration.worker_supervisor import Supervisor

DATABASE = "ragstream_chaos"

# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosPlan:
    """What a run does: how many documents, which worker processes, and which faults when.

    The faults come in the chaos window (`window_s`): broker and PostgreSQL outages in turns,
    each a quarter into a slot of its own, and a worker SIGKILL every `kill_interval_s`; the
    documents go up in batches every `upload_every_s` over the first 80% of it."""

    documents: int = 300
    kill_interval_s: float = 10.0  # 0: no worker is killed
    broker_restarts: int = 1
    broker_down_s: float = 5.0  # from the SIGKILL to the restart
    postgres_restarts: int = 1
    postgres_stop_s: float = 20.0  # from the stop to the restart
    workers: tuple[str, ...] = ("all", "all", "parse", "chunk", "embed")
    partitions: int = 6
    duration_s: float | None = None  # the chaos window; None: room for every outage
    upload_every_s: float = 5.0  # a batch every this many seconds, over 80% of the window
    settle_timeout_s: float = 180.0
    quiet_s: float = 20.0  # settled: no lag, and no status moved for this long
    seed: int | None = None

    def __str__(self) -> str:
        return (
            f"{self.documents} documents, workers {','.join(self.workers)}, "
            + (f"a SIGKILL every {self.kill_interval_s:g}s, " if self.kill_interval_s > 0 else "")
            + f"{self.broker_restarts} broker SIGKILL(s), {self.postgres_restarts} PostgreSQL "
            f"stop(s) of {self.postgres_stop_s:g}s, over {self.window_s:.0f}s"
        )

    @property
    def window_s(self) -> float:
        if self.duration_s is not None:
            return self.duration_s
        outage = max(self.postgres_stop_s, self.broker_down_s + 15.0)
        return max(60.0, self.faults * (outage + 25.0))

    @property
    def faults(self) -> int:
        return self.broker_restarts + self.postgres_restarts

    def fault_schedule(self) -> list[tuple[float, str]]:
        """(seconds into the window, "kafka" | "postgres"): alternating, a quarter into equal
        slots. Outages run one after another even when the slots are too short for them."""
        brokers, databases = ["kafka"] * self.broker_restarts, ["postgres"] * self.postgres_restarts
        kinds = []
        while brokers or databases:
            kinds += [brokers.pop()] if brokers else []
            kinds += [databases.pop()] if databases else []
        slot = self.window_s / max(1, len(kinds))
        return [(slot * (i + 0.25), kind) for i, kind in enumerate(kinds)]

    def upload_schedule(self) -> list[tuple[float, range]]:
        """(seconds into the window, document numbers) for each batch."""
        span = 0.8 * self.window_s
        batches = max(1, min(self.documents, round(span / self.upload_every_s)))
        bounds = [round(self.documents * i / batches) for i in range(batches + 1)]
        return [(span * i / batches, range(bounds[i], bounds[i + 1])) for i in range(batches)]


# -- the services ------------------------------------------------------------------------------


@dataclass
class Services:
    """A broker and a PostgreSQL the run may kill and restart (same data directory and ports)."""

    kafka: LocalKafka
    postgres: LocalPostgres
    database_url: str

    def stop(self) -> None:
        self.kafka.stop()
        self.postgres.stop()


def start_services(directory: Path) -> Services:
    """A broker and a PostgreSQL of their own in `directory` (which PostgreSQL's system user
    must be able to pass through), on free ports."""
    kafka, postgres = new_local_kafka(directory), new_local_postgres(directory)
    try:
        kafka.start()
        postgres.start()
        url = postgres.ensure_database(DATABASE)
    except BaseException:
        kafka.stop()
        postgres.stop()
        raise
    return Services(kafka, postgres, url)


# -- progress ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What `on_progress` gets every couple of seconds."""

    elapsed_s: float
    phase: str  # "chaos" | "settling"
    published: int
    documents: int
    statuses: dict[str, int] | None  # None while PostgreSQL does not answer
    kills: int
    unplanned_exits: int
    outage: str | None  # "kafka" or "postgres" while it is down
    last_event: str

    def line(self) -> str:
        statuses = (
            "postgres down"
            if self.statuses is None
            else ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())) or "none yet"
        )
        return (
            f"{self.elapsed_s:6.0f}s {self.phase:<8} published {self.published}/{self.documents}"
            f" | {statuses} | kills {self.kills}, unplanned exits {self.unplanned_exits}"
            f" | {'DOWN: ' + self.outage if self.outage else 'all up'} | {self.last_event}"
        )


# -- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Doc:
    path: Path
    document_id: str
    correlation_id: str


class _Run:
    """One run: its settings (a topic prefix and tenant of its own), its workers, its report."""

    def __init__(
        self,
        services: Services,
        plan: ChaosPlan,
        work_dir: Path,
        on_progress: Callable[[Snapshot], None] | None,
        on_event: Callable[[ChaosEvent], None] | None,
    ) -> None:
        self.services = services
        self.plan = plan
        self.work_dir = work_dir
        self.on_progress = on_progress
        self.on_event = on_event
        self.rng = random.Random(plan.seed)
        prefix = f"chaos{uuid4().hex[:8]}"
        self.settings = load_settings(
            kafka={
                "bootstrap_servers": services.kafka.bootstrap,
                "topic_prefix": prefix,
                "partitions": plan.partitions,
            },
            postgres={"url": services.database_url},
            devstack={"data_dir": work_dir / "data"},
            observability={"metrics_port": 0},
        )
        self.topology = Topology(prefix)
        self.report = ChaosReport(
            f"chaos run {prefix}: {plan}", prefix, f"tenant-{prefix}", work_dir
        )
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.outage: str | None = None
        self.published = 0
        self.supervisor = Supervisor(
            self.settings, plan.workers, work_dir / "logs", self.clock, self.note
        )

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str) -> None:
        event = ChaosEvent(self.clock(), what)
        self.report.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    async def _until(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + at_s - time.monotonic()))

    # -- documents in --------------------------------------------------------------------------

    async def upload(self, docs: list[_Doc]) -> None:
        for at_s, numbers in self.plan.upload_schedule():
            await self._until(at_s)
            await self._publish([docs[n] for n in numbers])
        self.note(f"all {len(docs)} documents published")

    async def _publish(self, batch: list[_Doc]) -> None:
        """Publish every document of the batch, retrying a failed send with the same document
        and correlation id (as any producer that must not lose a document does)."""
        queue = list(batch)
        failing_since: float | None = None
        while queue:
            try:
                async with Uploader(self.settings) as uploader:
                    while queue:
                        doc = queue[0]
                        await uploader.upload_bytes(
                            doc.path.read_bytes(),
                            doc.path.name,
                            tenant_id=self.report.tenant,
                            document_id=doc.document_id,
                            correlation_id=doc.correlation_id,
                            source_system="chaos",
                        )
                        queue.pop(0)
                        self.published += 1
                if failing_since is not None:
                    self.note(f"uploads go through again after {self.clock() - failing_since:.0f}s")
            except (RetryableError, InfrastructureError, KafkaError, OSError) as exc:
                self.report.upload_retries += 1
                if failing_since is None:
                    failing_since = self.clock()
                    self.note(f"upload failed ({type(exc).__name__}); retrying every second")
                await asyncio.sleep(1.0)

    # -- faults --------------------------------------------------------------------------------

    async def faults(self) -> None:
        for at_s, kind in self.plan.fault_schedule():
            await self._until(at_s)
            if kind == "kafka":
                kafka = self.services.kafka
                stop = functools.partial(kafka.stop, kill=True)
                what, down_s = f"broker SIGKILL (pid {kafka.pid()})", self.plan.broker_down_s
                await self._outage(kind, what, stop, kafka.start, down_s, "serving metadata")
            else:
                postgres = self.services.postgres
                what, down_s = "PostgreSQL stop (fast shutdown)", self.plan.postgres_stop_s
                await self._outage(
                    kind, what, postgres.stop, postgres.start, down_s, "accepting connections"
                )

    async def _outage(
        self,
        kind: str,
        what: str,
        stop: Callable[[], object],
        start: Callable[[], object],
        down_s: float,
        ready: str,
    ) -> None:
        """Stop a service, leave it down for `down_s`, start it again and wait until `ready`."""
        self.outage = kind
        began = self.clock()
        self.note(what)
        await asyncio.to_thread(stop)
        await asyncio.sleep(down_s)
        self.note(f"{kind} restarting")
        await asyncio.to_thread(start)
        self.outage = None
        self.report.outages.append((kind, self.clock() - began))
        self.note(f"{kind} back, {ready}, after {self.clock() - began:.1f}s")

    async def kills(self, over: asyncio.Event) -> None:
        """A SIGKILL every `kill_interval_s` within the window (none in its last second, so the
        last one restarted has time to start before the settling)."""
        interval = self.plan.kill_interval_s
        n = 1
        while interval > 0 and n * interval < self.plan.window_s - 1:
            try:
                await asyncio.wait_for(
                    over.wait(), max(0.0, self.t0 + n * interval - time.monotonic())
                )
                return
            except TimeoutError:
                await self.supervisor.kill_random(self.rng)
                n += 1

    # -- watching ------------------------------------------------------------------------------

    async def statuses(self) -> dict[str, int] | None:
        try:
            return await asyncio.wait_for(status_counts(self.settings, self.report.tenant), 5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None

    async def progress(self) -> None:
        while True:
            if self.on_progress is not None:
                events = self.report.events
                self.on_progress(
                    Snapshot(
                        self.clock(),
                        self.phase,
                        self.published,
                        self.plan.documents,
                        await self.statuses(),
                        self.supervisor.kills,
                        len(self.supervisor.exits),
                        self.outage,
                        events[-1].what if events else "",
                    )
                )
            await asyncio.sleep(2.0)

    async def lag(self) -> int | None:
        """Records the stage groups have not committed, on their input and retry topics."""
        try:
            total = 0
            for stage in Stage:
                group = await committed_offsets(self.settings, self.topology.group(stage))
                for topic in (self.topology.input_topic(stage), self.topology.retry(stage)):
                    for tp, end in (await end_offsets(self.settings, topic)).items():
                        total += max(0, end - group.get(tp, 0))
            return total
        except (KafkaError, OSError, RetryableError, InfrastructureError):
            return None

    async def settle(self) -> bool:
        """Until every document is in a terminal status, or no status has moved for `quiet_s`,
        with nothing left uncommitted; False after `settle_timeout_s`."""
        deadline = time.monotonic() + self.plan.settle_timeout_s
        last: dict[str, int] | None = None
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            counts = await self.statuses()
            if counts != last:
                last, quiet_since = counts, time.monotonic()
            if counts is not None:
                finished = sum(n for s, n in counts.items() if s in SETTLED)
                done = finished == self.plan.documents
                quiet = time.monotonic() - quiet_since >= self.plan.quiet_s
                if (done or quiet) and await self.lag() == 0:
                    return True
            await asyncio.sleep(2.0)
        return False

    # -- all of it -----------------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        plan, report = self.plan, self.report
        await ensure_topics(self.settings)
        await migrate(self.settings.postgres.dsn(), dimensions=self.settings.embed.dimensions)
        seed = self.rng.randrange(2**31)
        paths = make_corpus(self.work_dir / "docs", plan.documents, seed=seed, kinds=(".md",))
        docs = [_Doc(p, str(uuid4()), str(uuid4())) for p in paths]
        self.supervisor.start_all()
        background: list[asyncio.Task[None]] = []
        try:
            await self.supervisor.wait_started(120)
            self.t0 = time.monotonic()
            self.phase = "chaos"
            self.note(f"{len(plan.workers)} workers running; chaos window of {plan.window_s:.0f}s")
            background += [
                asyncio.create_task(self.supervisor.watch()),
                asyncio.create_task(self.progress()),
            ]
            over = asyncio.Event()
            killing = asyncio.create_task(self.kills(over))
            background.append(killing)
            async with asyncio.TaskGroup() as chaos:
                chaos.create_task(self.upload(docs))
                chaos.create_task(self.faults())
                chaos.create_task(self._until(plan.window_s))
            over.set()
            await killing
            report.chaos_s = self.clock()
            self.phase = "settling"
            self.note("chaos over: no more kills or outages; waiting for the pipeline to settle")
            report.settled = await self.settle()
            report.settle_s = self.clock() - report.chaos_s
            self.note("settled" if report.settled else "did not settle in time")
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            report.stop_codes = await self.supervisor.stop_all()
            report.kills = self.supervisor.kills
            report.exits = list(self.supervisor.exits)
        report.uploaded = self.published
        await examine(report, self.settings, {d.document_id: d.path.name for d in docs})
        return report


async def run_chaos(
    services: Services,
    plan: ChaosPlan,
    work_dir: Path,
    *,
    on_progress: Callable[[Snapshot], None] | None = None,
    on_event: Callable[[ChaosEvent], None] | None = None,
) -> ChaosReport:
    """One chaos run on `services` (its own topic prefix and tenant); logs and documents in
    `work_dir`. `on_progress` gets a snapshot every 2 s, `on_event` each fault, restart and
    phase as it happens. Returns the report, whatever it says; raises only if the run itself
    could not go on (a service that would not restart, a worker that never started)."""
    await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
    return await _Run(services, plan, work_dir, on_progress, on_event).run()


def snapshot_printer(every_s: float = 10.0) -> Callable[[Snapshot], None]:
    """An `on_progress` that prints a line at most every `every_s` (and at each phase change)."""
    state: dict[str, Any] = {"at": -every_s, "phase": None}

    def show(snap: Snapshot) -> None:
        if snap.elapsed_s - state["at"] >= every_s or snap.phase != state["phase"]:
            state["at"], state["phase"] = snap.elapsed_s, snap.phase
            print(snap.line(), flush=True)

    return show
