"""The no-Docker local stack: a Kafka broker, PostgreSQL with pgvector, topics, migrations,
and the stage workers as one background process.

`stack_up` is idempotent: what already runs is left as it is. It reports what it started, so
a caller (the demo) can stop exactly that and leave a stack someone else started running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ragstream.admin import TopicState, ensure_topics
from ragstream.errors import InfrastructureError
from ragstream.local.kafka import LocalKafka, process_alive, wait_exit
from ragstream.local.postgres import LocalPostgres
from ragstream.settings import Settings
from ragstream.store.migrate import migrate

log = structlog.get_logger(__name__)


@dataclass
class StackInfo:
    kafka_bootstrap: str
    postgres_dsn: str
    data_dir: str
    started: list[str] = field(default_factory=list)
    topics: list[TopicState] = field(default_factory=list)
    migrations: list[str] = field(default_factory=list)
    workers_pid: int | None = None
    workers_log: str | None = None
    metrics_url: str | None = None
    prometheus_url: str | None = None


async def stack_up(
    settings: Settings, *, workers: bool = True, prometheus: bool = False
) -> StackInfo:
    kafka = LocalKafka.from_settings(settings)
    postgres = LocalPostgres.from_settings(settings)
    started: list[str] = []
    kafka_was_up, pg_was_up = kafka.is_running(), postgres.is_running()
    # Both servers start at once: the broker's JVM and PostgreSQL don't wait on each other.
    await asyncio.gather(asyncio.to_thread(kafka.start), asyncio.to_thread(postgres.start))
    started += [] if kafka_was_up else ["kafka"]
    started += [] if pg_was_up else ["postgres"]
    await asyncio.to_thread(postgres.ensure_database, settings.postgres.database)
    topics = await ensure_topics(settings)
    migrations = await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    info = StackInfo(
        kafka_bootstrap=kafka.bootstrap,
        postgres_dsn=settings.postgres.redacted_dsn(),
        data_dir=str(settings.local.data_dir.resolve()),
        started=started,
        topics=topics,
        migrations=migrations,
    )
    if workers:
        pid, fresh = start_workers(settings)
        info.workers_pid = pid
        info.workers_log = str(_workers_log(settings))
        if fresh:
            started.append("workers")
        obs = settings.observability
        info.metrics_url = f"http://{obs.metrics_host}:{obs.metrics_port}/metrics"
    if prometheus:
        port, fresh = start_prometheus(settings)
        info.prometheus_url = f"http://127.0.0.1:{port}"
        if fresh:
            started.append("prometheus")
    return info


def _pid_alive(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that process runs (an exited child of ours is reaped)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if process_alive(pid) else None


def start_prometheus(settings: Settings) -> tuple[int, bool]:
    """Debian's `prometheus` scraping the stack's workers, with ragstream's alert rules."""
    from ragstream.resources import config_dir

    port = settings.local.prometheus_port
    home = settings.local.data_dir / "prometheus"
    pidfile = home / "prometheus.pid"
    if _pid_alive(pidfile) is not None:
        return port, False
    binary = shutil.which("prometheus")
    if binary is None:
        raise InfrastructureError(
            "prometheus is not installed (Debian: apt-get install prometheus)"
        )
    home.mkdir(parents=True, exist_ok=True)
    obs = settings.observability
    rules = (config_dir() / "prometheus" / "alerts.yml").resolve()
    config = home / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 5s\n  evaluation_interval: 15s\n"
        f"rule_files:\n  - {rules}\n"
        "scrape_configs:\n  - job_name: ragstream-workers\n    static_configs:\n"
        f"      - targets: ['{obs.metrics_host}:{obs.metrics_port}']\n"
    )
    with (home / "prometheus.log").open("ab") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pidfile.write_text(str(proc.pid))
    time.sleep(0.5)
    if proc.poll() is not None:
        pidfile.unlink(missing_ok=True)
        tail = "\n".join((home / "prometheus.log").read_text(errors="replace").splitlines()[-20:])
        raise InfrastructureError(f"prometheus exited at start:\n{tail}")
    return port, True


def stop_prometheus(settings: Settings) -> bool:
    pidfile = settings.local.data_dir / "prometheus" / "prometheus.pid"
    pid = _pid_alive(pidfile)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    pidfile.unlink(missing_ok=True)
    return True


def _workers_pidfile(settings: Settings) -> Path:
    return settings.local.data_dir / "workers.pid"


def _workers_log(settings: Settings) -> Path:
    return settings.local.data_dir / "workers.log"


def workers_pid(settings: Settings) -> int | None:
    """The pid of the stack's background worker process, if it is alive."""
    return _pid_alive(_workers_pidfile(settings))


def start_workers(settings: Settings, timeout_s: float = 30.0) -> tuple[int, bool]:
    """Start `ragstream worker all` in the background (once); returns (pid, started_now)."""
    running = workers_pid(settings)
    if running is not None:
        return running, False
    settings.local.data_dir.mkdir(parents=True, exist_ok=True)
    logfile = _workers_log(settings)
    env = {
        **os.environ,
        # The child must see the same settings this process has, whatever their source.
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "RAGSTREAM_LOCAL__DATA_DIR": str(settings.local.data_dir.resolve()),
        "RAGSTREAM_BLOBS__ROOT": str(settings.blob_root().resolve()),
        "RAGSTREAM_OBSERVABILITY__LOG_FORMAT": "json",
    }
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ragstream", "worker", "all"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    _workers_pidfile(settings).write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # wait until every stage has started consuming
        if proc.poll() is not None:
            _workers_pidfile(settings).unlink(missing_ok=True)
            tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
            raise InfrastructureError(f"workers exited at start (code {proc.returncode}):\n{tail}")
        if logfile.read_text(errors="replace").count('"stage started"') >= 3:
            break
        time.sleep(0.2)
    log.info("workers.started", pid=proc.pid, log=str(logfile))
    return proc.pid, True


def stop_workers(settings: Settings, timeout_s: float = 30.0) -> bool:
    """SIGTERM the background workers (they finish in-hand records, commit and leave)."""
    pid = workers_pid(settings)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout_s):
        os.kill(pid, signal.SIGKILL)
    _workers_pidfile(settings).unlink(missing_ok=True)
    return True


def stack_down(settings: Settings, only: list[str] | None = None) -> list[str]:
    """Stop workers, broker and PostgreSQL (all, or those named in `only`); returns what stopped."""
    stopped = []
    if (only is None or "prometheus" in only) and stop_prometheus(settings):
        stopped.append("prometheus")
    if (only is None or "workers" in only) and stop_workers(settings):
        stopped.append("workers")
    for name, server in (
        ("kafka", LocalKafka.from_settings(settings)),
        ("postgres", LocalPostgres.from_settings(settings)),
    ):
        if (only is None or name in only) and server.is_running():
            server.stop()
            stopped.append(name)
    return stopped
