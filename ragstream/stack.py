"""The no-Docker local stack: a Kafka broker, PostgreSQL with pgvector, topics, migrations,
and the stage workers as one background process.

`stack_up` is idempotent: what already runs is left as it is. It reports what it started, so
a caller (the demo) can stop exactly that and leave a stack someone else started running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ragstream.admin import TopicState, ensure_topics
from ragstream.errors import InfrastructureError
from ragstream.local.kafka import LocalKafka
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


async def stack_up(settings: Settings, *, workers: bool = True) -> StackInfo:
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
    return info


def _workers_pidfile(settings: Settings) -> Path:
    return settings.local.data_dir / "workers.pid"


def _workers_log(settings: Settings) -> Path:
    return settings.local.data_dir / "workers.log"


def workers_pid(settings: Settings) -> int | None:
    """The pid of the stack's background worker process, if it is alive."""
    try:
        pid = int(_workers_pidfile(settings).read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        return pid
    return pid


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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and workers_pid(settings) == pid:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if workers_pid(settings) == pid:
        os.kill(pid, signal.SIGKILL)
    _workers_pidfile(settings).unlink(missing_ok=True)
    return True


def stack_down(settings: Settings, only: list[str] | None = None) -> list[str]:
    """Stop workers, broker and PostgreSQL (all, or those named in `only`); returns what stopped."""
    stopped = []
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
