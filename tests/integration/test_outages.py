"""Our own PostgreSQL or Kafka being away is not the record's fault: records wait, nothing is
dead-lettered, start-up waits too; and a record whose output was published is never
dead-lettered afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
import pytest

from consumers.compose import build_stage
from consumers.infrastructure import InfrastructureWatch
from consumers.journey import JourneyRecorder
from consumers.runtime import StageRunner
from consumers.stage import Outcome, RecordContext
from consumers.worker import run_workers
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.codec import Codec
from ragstream.cost.meter import KafkaUsageSink
from ragstream.devstack.postgres import LocalPostgres
from ragstream.errors import InfrastructureUnavailable, PermanentError
from ragstream.events import CostUsage, DocumentEvent
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Stage, Topology
from tests.conftest import free_port, new_local_kafka
from tests.integration.pipeline_helpers import (
    WorkerProcess,
    caught_up,
    end_offsets,
    make_corpus,
    status_counts,
    variant,
    wait_for_statuses,
    wait_until,
)
from tests.integration.test_worker_health import _home, _status, _until
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration]


async def _count(settings: Settings, topic: str) -> int:
    return sum((await end_offsets(settings, topic)).values())


def _impatient(settings: Settings) -> Settings:
    """Retries so short that, were an outage spent as attempts, it would dead-letter at once."""
    return variant(settings, retry={"base_s": 0.05, "cap_s": 0.1, "max_attempts": 2})


async def _upload(settings: Settings, paths: list[Path], tenant: str) -> list[str]:
    async with Uploader(settings) as up:
        return [(await up.upload_file(p, tenant_id=tenant)).document_id for p in paths]


class _Runner:
    """One StageRunner in this process, stopped at the end of the block."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StageRunner:
        self.task = asyncio.create_task(self.runner.run(self.stop))
        await wait_until(lambda: self.runner.assigned.is_set(), 30, "the runner got no partitions")
        return self.runner

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)


# -- in one process --------------------------------------------------------------------------


async def test_a_record_whose_output_was_published_is_never_dead_lettered(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    """The journey write after the publish fails for good: the record is done all the same
    (before, it was retried and dead-lettered although its output was out)."""
    settings = _impatient(settings)
    await ensure_topics(settings)

    class RefusingJourney(JourneyRecorder):
        refused = 0

        async def step_done(self, *args: object, **kwargs: object) -> None:
            self.refused += 1
            raise PermanentError("the journey write was refused")

    recorder = RefusingJourney(store)
    runner = StageRunner(
        settings, Stage.PARSE, build_stage(Stage.PARSE, settings, store).handler, Codec(), recorder
    )
    (doc,) = await _upload(settings, make_corpus(tmp_path / "in", 1), tenant)
    topology = Topology(settings.kafka.topic_prefix)
    async with _Runner(runner):
        await wait_for_statuses(store, [doc], 30, statuses=frozenset({"parsed"}))
        await wait_until(lambda: runner.stats.processed == 1, 10, "not handled")
        # Committed: the runner is done with the record (a retry would have been decided and
        # sent before the commit).
        await wait_until(lambda: caught_up(settings, [Stage.PARSE]), 30, "the parse commit")
        assert recorder.refused == 1
        assert runner.stats.retried == 0 and runner.stats.dead_lettered == 0
    assert await _count(settings, topology.parsed) == 1
    assert await _count(settings, topology.retry(Stage.PARSE)) == 0
    assert await _count(settings, topology.dlq) == 0
    got = await store.get_document(doc)
    assert got is not None and got.status == "parsed"


async def test_a_failure_that_cannot_be_recorded_is_not_dead_lettered_until_it_is(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    """A corrupt file's failure meets a database outage: the record waits (readiness false),
    and reaches the DLQ only after its status says dead-lettered."""
    settings = _impatient(settings)
    await ensure_topics(settings)
    database_down = True
    probes = 0

    class DownJourney(JourneyRecorder):
        async def step_failed(self, *args: object, **kwargs: object) -> None:
            if database_down:
                raise InfrastructureUnavailable("database unavailable: test", dependency="postgres")
            await super().step_failed(*args, **kwargs)  # type: ignore[arg-type]

    async def probe() -> bool:
        nonlocal probes
        probes += 1
        return not database_down

    watch = InfrastructureWatch({"postgres": probe}, base_s=0.1, cap_s=0.2)
    runner = StageRunner(
        settings,
        Stage.PARSE,
        build_stage(Stage.PARSE, settings, store).handler,
        Codec(),
        DownJourney(store),
        watch=watch,
    )
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 200)
    (doc,) = await _upload(settings, [bad], tenant)
    topology = Topology(settings.kafka.topic_prefix)
    async with _Runner(runner):
        await wait_until(lambda: not watch.ready(), 30, "the runner never waited")
        # Held through several probes of the database: past the failure's decision.
        await wait_until(lambda: probes >= 3, 10, "the watch to probe the database")
        assert await _count(settings, topology.dlq) == 0, "dead-lettered before it was recorded"
        assert runner.blocked and "postgres" in runner.blocked
        database_down = False
        await wait_for_statuses(store, [doc], 30, statuses=frozenset({"dead-lettered"}))
        await wait_until(lambda: runner.stats.dead_lettered == 1, 10, "not dead-lettered")
        assert watch.ready() and runner.blocked is None
    assert await _count(settings, topology.dlq) == 1
    got = await store.get_document(doc)
    assert got is not None and got.status_reason and "PDF" in got.status_reason
    assert runner.stats.held_for_infrastructure >= 1


async def test_a_database_outage_mid_flow_holds_records_and_spends_no_attempt(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    """Every stage reaches PostgreSQL through a proxy the test closes for a few seconds (every
    connection cut, new ones refused) while documents flow: with a single attempt allowed,
    none is dead-lettered and all are embedded after it opens again."""
    real = urlsplit(settings.postgres.dsn())
    proxy = TcpProxy(free_port(), real.hostname or "127.0.0.1", real.port or 5432)
    await proxy.open()
    through = real._replace(netloc=real.netloc.replace(f":{real.port}", f":{proxy.port}"))
    port = free_port()
    settings = variant(
        _impatient(settings),
        postgres={"url": urlunsplit(through)},
        retry={"max_attempts": 1},
        observability={"metrics_port": port},
    )
    await ensure_topics(settings)
    stop = asyncio.Event()
    runners: list[StageRunner] = []
    task = asyncio.create_task(
        run_workers(settings, list(Stage), concurrency=2, stop=stop, started=runners.extend)
    )
    ready = f"http://127.0.0.1:{port}/ready"
    try:
        await _until(ready, 200)
        ids = await _upload(settings, make_corpus(tmp_path / "in", 24), tenant)
        await wait_until(lambda: sum(r.stats.processed for r in runners) >= 3, 30, "no progress")
        await proxy.close()
        await _until(ready, 503, within_s=15)
        # Records met the outage and are held (with one attempt allowed, spending one would
        # dead-letter them at once).
        await wait_until(
            lambda: sum(r.stats.held_for_infrastructure for r in runners) >= 1, 30, "a record held"
        )
        assert not task.done()
        await proxy.open()
        await _until(ready, 200, within_s=20)
        docs = await wait_for_statuses(store, ids, 90)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await proxy.close()
    assert {d.status for d in docs.values()} == {"embedded"}
    assert sum(r.stats.dead_lettered for r in runners) == 0
    assert sum(r.stats.retried for r in runners) == 0
    assert sum(r.stats.held_for_infrastructure for r in runners) >= 1
    assert await _count(settings, Topology(settings.kafka.topic_prefix).dlq) == 0


# -- worker processes ------------------------------------------------------------------------


def _log_events(proc: WorkerProcess, name: str) -> list[dict[str, object]]:
    return [line for line in proc.lines() if line.get("event") == name]


async def _wait_for_log(proc: WorkerProcess, event: str, count: int, within_s: float) -> None:
    await wait_until(
        lambda: len(_log_events(proc, event)) >= count,
        within_s,
        f"no {count}x {event!r} in the worker log:\n{proc.tail()}",
    )


@pytest.mark.slow
async def test_a_worker_started_with_kafka_and_postgres_down_waits_for_them(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    """Nothing answers at either address when the worker starts: it logs one line per
    attempt, is alive and not ready, and starts work once both come up. No traceback."""
    await ensure_topics(settings)
    real_pg = urlsplit(settings.postgres.dsn())
    pg = TcpProxy(free_port(), real_pg.hostname or "127.0.0.1", real_pg.port or 5432)
    kafka_host, kafka_port = settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
    kafka = TcpProxy(free_port(), kafka_host, int(kafka_port))
    metrics_port = free_port()
    pg_url = urlunsplit(
        real_pg._replace(netloc=real_pg.netloc.replace(f":{real_pg.port}", f":{pg.port}"))
    )
    proc = WorkerProcess(
        settings,
        "all",
        tmp_path / "worker.log",
        env={
            "RAGSTREAM_POSTGRES__URL": pg_url,
            "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka.port}",
            "RAGSTREAM_OBSERVABILITY__METRICS_PORT": str(metrics_port),
        },
    ).start()
    ready = f"http://127.0.0.1:{metrics_port}/ready"
    try:
        await _wait_for_log(proc, "waiting for postgresql", 2, 30)
        assert proc.alive()
        assert await asyncio.to_thread(_status, ready) == 503
        await pg.open()
        await _wait_for_log(proc, "waiting for kafka", 2, 60)
        assert proc.alive()
        assert await asyncio.to_thread(_status, ready) == 503
        await kafka.open()
        await _until(ready, 200, within_s=60)
        ids = await _upload(settings, make_corpus(tmp_path / "in", 3), tenant)
        await wait_for_statuses(store, ids, 60, running=[proc])
        assert await proc.stop() == 0
    finally:
        await proc.stop()
        await pg.close()
        await kafka.close()
    text = proc.log_path.read_text()
    assert "Traceback" not in text, proc.tail(80)
    waits = _log_events(proc, "waiting for postgresql")
    assert all(w.get("address") and w.get("error") for w in waits), waits[:2]
    assert f":{pg.port}/" in str(waits[0]["address"])
    assert "password" not in str(waits[0]["address"]).lower() or "***" in str(waits[0]["address"])


@pytest.mark.slow
async def test_a_worker_all_process_rides_out_a_20s_postgres_stop(
    settings: Settings, tenant: str, tmp_path: Path
) -> None:
    """`ragstream worker all` with documents flowing and usage events arriving, PostgreSQL
    stopped for 20 s: every stage and the accountant stay alive, nothing is dead-lettered,
    readiness is false during the stop and true within seconds of the database's return,
    every document is embedded and every usage event is in the ledger."""
    home = _home()
    postgres = LocalPostgres(
        home, port=free_port(), system_user=settings.devstack.postgres_system_user
    )
    postgres.start()
    metrics_port = free_port()
    try:
        dsn = postgres.ensure_database("outage")
        settings = variant(settings, postgres={"url": dsn})
        await ensure_topics(settings)
        proc = WorkerProcess(
            settings,
            "all",
            tmp_path / "worker.log",
            env={
                "RAGSTREAM_OBSERVABILITY__METRICS_PORT": str(metrics_port),
                "RAGSTREAM_RETRY__MAX_ATTEMPTS": "2",
                "RAGSTREAM_RETRY__BASE_S": "0.2",
            },
        ).start()
        ready = f"http://127.0.0.1:{metrics_port}/ready"
        try:
            await _until(ready, 200, within_s=60)
            paths = make_corpus(tmp_path / "in", 60)
            ids = await _upload(settings, paths[:30], tenant)
            await wait_until(  # some in flight
                lambda: _moved(settings, tenant), 30, "the first documents to be parsed"
            )
            await asyncio.to_thread(postgres.stop)
            stopped_at = time.monotonic()
            ids += await _upload(settings, paths[30:], tenant)
            usage = await _publish_usage(settings, 5)
            await _until(ready, 503, within_s=15)
            # The stop lasts 20 s: its length is what this test is about.
            await asyncio.sleep(max(0.0, 20 - (time.monotonic() - stopped_at)))
            assert proc.alive(), proc.tail()
            await asyncio.to_thread(postgres.start)
            back = time.monotonic()
            await _until(ready, 200, within_s=30)
            ready_after = time.monotonic() - back
            async with await Store.connect(dsn, min_size=1, max_size=2) as store:
                docs = await wait_for_statuses(store, ids, 120, running=[proc])
                in_ledger = await _ledger_count(dsn, usage)
            assert proc.alive()
        finally:
            code = await proc.stop()
        assert code == 0, proc.tail()
    finally:
        postgres.stop()
    print(f"\nready again {ready_after:.1f}s after PostgreSQL came back")
    assert ready_after < 20
    assert {d.status for d in docs.values()} == {"embedded"}, {
        d: (doc.status, doc.status_reason) for d, doc in docs.items() if doc.status != "embedded"
    }
    assert in_ledger == len(usage)
    assert await _count(settings, Topology(settings.kafka.topic_prefix).dlq) == 0
    assert not _log_events(proc, "consumer crashed; restarting it")
    assert _log_events(
        proc, "dependency unavailable: record held, no attempt spent"
    ) or _log_events(proc, "dependency unavailable; records held, nothing dead-lettered")


async def _moved(settings: Settings, tenant: str) -> bool:
    """Some document of the tenant is past its upload."""
    counts = await status_counts(settings, tenant)
    return any(n for status, n in counts.items() if status in ("parsed", "chunked", "embedded"))


async def _publish_usage(settings: Settings, count: int) -> list[str]:
    sink = KafkaUsageSink(settings)
    await sink.start()
    ids = []
    try:
        for n in range(count):
            event = CostUsage(
                service="openai",
                operation="embeddings",
                model="text-embedding-3-small",
                unit="tokens",
                units=100 + n,
                unit_price_usd=Decimal("0.00000002"),
                cost_usd=Decimal("0.000002"),
                tenant_id="outage-tenant",
                document_ids=[str(uuid4())],
            )
            await sink.publish(event)
            ids.append(str(event.event_id))
    finally:
        await sink.stop()
    return ids


async def _ledger_count(dsn: str, event_ids: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM cost_ledger WHERE event_id::text = ANY($1::text[])",
                event_ids,
            )
        )
    finally:
        await conn.close()


# Unused-import guards for names used only in type positions above.
_ = (Awaitable, Callable, datetime, Outcome, RecordContext, DocumentEvent)


@pytest.mark.slow
async def test_sigterm_stops_a_worker_in_time_while_the_broker_is_down(
    settings: Settings, tmp_path: Path
) -> None:
    """The broker is SIGKILLed under a running `worker all`; SIGTERM still stops the worker
    within kafka.shutdown_grace_s + 5 s (no wait on a coordinator that does not answer)."""
    kafka = new_local_kafka(_home())
    await asyncio.to_thread(kafka.start)
    try:
        settings = variant(settings, kafka={"bootstrap_servers": kafka.bootstrap})
        await ensure_topics(settings)
        metrics_port = free_port()
        proc = WorkerProcess(
            settings,
            "all",
            tmp_path / "worker.log",
            env={
                "RAGSTREAM_OBSERVABILITY__METRICS_PORT": str(metrics_port),
                "RAGSTREAM_KAFKA__SHUTDOWN_GRACE_S": "2",
            },
        ).start()
        try:
            ready = f"http://127.0.0.1:{metrics_port}/ready"
            await _until(ready, 200, within_s=60)
            ids = await _upload(
                settings, make_corpus(tmp_path / "in", 6), settings.kafka.topic_prefix
            )
            await wait_until(proc.handled, 30, "a record handled", explain=proc.tail)
            await asyncio.to_thread(kafka.stop, kill=True)
            # The records in hand have met the outage: the worker holds them, not ready.
            await _until(ready, 503, within_s=60)
            assert proc.alive()
            began = time.monotonic()
            code = await proc.stop(timeout_s=30)
            took = time.monotonic() - began
        finally:
            await proc.stop()
    finally:
        await asyncio.to_thread(kafka.stop, kill=True)
    print(
        f"\nstopped {took:.1f}s after SIGTERM with the broker down (exit {code}); {len(ids)} uploaded"
    )
    assert took <= 2 + 5 + 1.0, proc.tail(60)
    assert "Traceback" not in proc.log_path.read_text(), proc.tail(60)
