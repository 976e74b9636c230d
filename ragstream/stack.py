"""The no-Docker local stack: a Kafka broker, PostgreSQL with pgvector, topics, migrations,
and the stage workers as one background process.

`stack_up` is idempotent: what already runs is left as it is and whatever part is not running
is started, so after `stack_down(settings, ["kafka"])` it brings back just the broker, on its
data (topics, records, committed offsets). It reports what it started, so a caller (the demo)
can stop exactly that and leave a stack someone else started running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ragstream.admin import TopicState, ensure_topics
from ragstream.devstack.cluster import LocalKafkaCluster, local_kafka
from ragstream.devstack.kafka import LocalKafka
from ragstream.devstack.postgres import LocalPostgres
from ragstream.devstack.secure import ADMIN, WORKER, SecureSetup
from ragstream.errors import ConfigError, InfrastructureError
from ragstream.pids import process_alive, wait_exit
from ragstream.scrape import prune
from ragstream.settings import Settings, with_devstack_password
from ragstream.store.migrate import migrate
from ragstream.topology import Stage

log = structlog.get_logger(__name__)

# The parts `stack_down` stops one by one, in the order it stops them.
PARTS = ("prometheus", "workers", "kafka", "postgres")


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
    worker_processes: dict[str, int] = field(default_factory=dict)  # worker name -> pid
    prometheus_url: str | None = None
    secure_env: str | None = None  # secure mode: the file to `source` for admin access


async def stack_up(
    settings: Settings,
    *,
    workers: bool = True,
    prometheus: bool = False,
    secure: bool = False,
    brokers: int | None = None,
) -> StackInfo:
    """Start what is not running. `secure`: the broker listens on SASL_SSL with SCRAM users
    and ACLs (ragstream.devstack.secure); a broker created secure stays secure without it.
    `brokers` 3: a 3-node KRaft cluster (ragstream.devstack.cluster), topics replicated 3 times
    with `min.insync.replicas` 2; a data directory made for a cluster stays one."""
    setup = SecureSetup.ensure(settings.devstack.data_dir) if secure else None
    kafka = local_kafka(settings, secure=setup, brokers=brokers)
    if isinstance(kafka, LocalKafkaCluster):  # every client gets every node; topics RF 3
        over = {"bootstrap_servers": kafka.bootstrap, "replication_factor": len(kafka.nodes)}
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update=over)})
    postgres = LocalPostgres.from_settings(settings)
    started: list[str] = []
    kafka_was_up, pg_was_up = kafka.is_running(), postgres.is_running()
    # Both servers start at once: the broker's JVM and PostgreSQL don't wait on each other.
    await asyncio.gather(asyncio.to_thread(kafka.start), asyncio.to_thread(postgres.start))
    started += [] if kafka_was_up else ["kafka"]
    started += [] if pg_was_up else ["postgres"]
    # A first start generated the server's password: clients built from these settings need it.
    settings = with_devstack_password(settings)
    await asyncio.to_thread(postgres.ensure_database, settings.postgres.database)
    worker_env: dict[str, str] = {}
    secure_setup = None if isinstance(kafka, LocalKafkaCluster) else kafka.secure
    if secure_setup is not None:  # the stack itself acts as admin; its workers as `worker`
        settings = settings.model_copy(
            update={"kafka": secure_setup.client_kafka_settings(ADMIN, settings.kafka)}
        )
        worker_env = secure_setup.client_env(WORKER)
    topics = await ensure_topics(settings)
    if secure_setup is not None:
        assert isinstance(kafka, LocalKafka)
        await asyncio.to_thread(kafka.apply_acls, settings.kafka.topic_prefix)
    migrations = await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    info = StackInfo(
        kafka_bootstrap=kafka.bootstrap,
        postgres_dsn=settings.postgres.redacted_dsn(),
        data_dir=str(settings.devstack.data_dir.resolve()),
        started=started,
        topics=topics,
        migrations=migrations,
    )
    if secure_setup is not None:
        info.secure_env = str(settings.devstack.data_dir.resolve() / "secure.env")
    if workers:
        pid, fresh = start_workers(settings, extra_env=worker_env)
        info.workers_pid = pid
        info.workers_log = str(_workers_log(settings))
        if fresh:
            started.append("workers")
        info.worker_processes = worker_processes(pid)
        info.metrics_url = served_metrics_url(settings)
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

    port = settings.devstack.prometheus_port
    home = settings.devstack.data_dir / "prometheus"
    pidfile = home / "prometheus.pid"
    if _pid_alive(pidfile) is not None:
        return port, False
    binary = shutil.which("prometheus")
    if binary is None:
        raise InfrastructureError(
            "prometheus is not installed (Debian: apt-get install prometheus)"
        )
    home.mkdir(parents=True, exist_ok=True)
    rules = (config_dir() / "prometheus" / "alerts.yml").resolve()
    config = home / "prometheus.yml"
    targets = scrape_dir(settings)
    targets.mkdir(parents=True, exist_ok=True)
    prune(targets)
    # Every process the stack runs writes its real address into `targets` while it serves
    # (ragstream.scrape); Prometheus rereads the directory.
    config.write_text(
        "global:\n  scrape_interval: 5s\n  evaluation_interval: 15s\n"
        f"rule_files:\n  - {rules}\n"
        "scrape_configs:\n  - job_name: ragstream-workers\n    file_sd_configs:\n"
        f"      - files: ['{targets}/*.json']\n        refresh_interval: 5s\n"
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


def scrape_dir(settings: Settings) -> Path:
    """Where the stack's processes announce their metrics address to its Prometheus."""
    return settings.devstack.data_dir / "prometheus" / "targets"


def stop_prometheus(settings: Settings, *, kill: bool = False) -> bool:
    return _stop_process(settings.devstack.data_dir / "prometheus" / "prometheus.pid", kill=kill)


def _stop_process(pidfile: Path, *, kill: bool, timeout_s: float = 30.0) -> bool:
    """SIGTERM the process in `pidfile` and wait (SIGKILL after `timeout_s`); `kill`: SIGKILL
    at once. False if it was not running."""
    pid = _pid_alive(pidfile)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    if not wait_exit(pid, 10.0 if kill else timeout_s):
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid, 10.0)
    pidfile.unlink(missing_ok=True)
    return True


def _workers_pidfile(settings: Settings) -> Path:
    return settings.devstack.data_dir / "workers.pid"


def _workers_log(settings: Settings) -> Path:
    return settings.devstack.data_dir / "workers.log"


def workers_pid(settings: Settings) -> int | None:
    """The pid of the stack's background worker process, if it is alive."""
    return _pid_alive(_workers_pidfile(settings))


def start_workers(
    settings: Settings, timeout_s: float = 30.0, *, extra_env: dict[str, str] | None = None
) -> tuple[int, bool]:
    """Start `ragstream worker all` in the background (once); returns (pid, started_now).
    `extra_env` is added to its environment (the secure broker's worker credentials)."""
    running = workers_pid(settings)
    if running is not None:
        return running, False
    settings.devstack.data_dir.mkdir(parents=True, exist_ok=True)
    logfile = _workers_log(settings)
    # The log is appended to across starts: only what this start writes counts.
    start_at = logfile.stat().st_size if logfile.exists() else 0
    env = {
        **os.environ,
        # The child must see the same settings this process has, whatever their source.
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "RAGSTREAM_KAFKA__REPLICATION_FACTOR": str(settings.kafka.replication_factor),
        "RAGSTREAM_DEVSTACK__DATA_DIR": str(settings.devstack.data_dir.resolve()),
        "RAGSTREAM_BLOBS__ROOT": str(settings.blob_root().resolve()),
        "RAGSTREAM_OBSERVABILITY__LOG_FORMAT": "json",
        "RAGSTREAM_OBSERVABILITY__SCRAPE_DIR": str(scrape_dir(settings)),
        **(extra_env or {}),
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
            tail = "\n".join(_read_from(logfile, start_at).splitlines()[-30:])
            raise InfrastructureError(f"workers exited at start (code {proc.returncode}):\n{tail}")
        if _consuming(_read_from(logfile, start_at)) >= {s.value for s in Stage}:
            break
        time.sleep(0.2)
    log.info("workers.started", pid=proc.pid, log=str(logfile))
    return proc.pid, True


def worker_processes(pid: int) -> dict[str, int]:
    """The `ragstream worker <name>` processes `worker all` (pid) runs, by name."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"worker" in argv[:-1]:
                    found[argv[argv.index(b"worker") + 1].decode()] = int(child)
                elif b"exporter" in argv:
                    found["exporter"] = int(child)
    return found


def served_metrics_url(settings: Settings) -> str:
    """Where the stack's `worker all` serves /metrics: the address its log says it bound (the
    port the OS picked when `observability.metrics_port` is 0), else the configured one."""
    obs = settings.observability
    url = f"http://{obs.metrics_host}:{obs.metrics_port}/metrics"
    log_path = _workers_log(settings)
    if obs.metrics_port or not log_path.exists():
        return url  # a configured port is the one bound: no need to read the log
    for line in log_path.read_text(errors="replace").splitlines():
        if '"serving metrics and health"' in line and '"workers"' in line:
            with contextlib.suppress(ValueError, AttributeError):
                url = str(json.loads(line)["url"])
    return url


def _consuming(log_text: str) -> set[str]:
    """The consumers a worker's JSON log says have started."""
    started = set()
    for line in log_text.splitlines():
        if '"consumer started"' in line:
            with contextlib.suppress(ValueError, AttributeError):
                started.add(str(json.loads(line).get("stage")))
    return started


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", "replace")


def stop_workers(settings: Settings, timeout_s: float = 30.0, *, kill: bool = False) -> bool:
    """SIGTERM the background workers (they finish in-hand records, commit and leave);
    `kill`: SIGKILL (no commit, no leave: their group waits out the session timeout)."""
    return _stop_process(_workers_pidfile(settings), kill=kill, timeout_s=timeout_s)


def stack_down(
    settings: Settings, only: Sequence[str] | None = None, *, kill: bool = False
) -> list[str]:
    """Stop the parts named in `only` (all by default: prometheus, workers, broker, PostgreSQL,
    in that order); returns what was running and stopped. Each keeps its data, so `stack_up`
    brings it back as it was.

    Without `kill`, each stops the way an operator expects: workers and prometheus on
    SIGTERM, the broker by controlled shutdown (SIGTERM, waited for), PostgreSQL by a fast
    shutdown. With `kill`, as in a crash: SIGKILL, and PostgreSQL's immediate shutdown."""
    unknown = sorted(set(only or ()) - set(PARTS))
    if unknown:
        raise ConfigError(
            f"unknown stack part {', '.join(unknown)}; choose from {', '.join(PARTS)}"
        )
    stopped = []
    if (only is None or "prometheus" in only) and stop_prometheus(settings, kill=kill):
        stopped.append("prometheus")
    if (only is None or "workers" in only) and stop_workers(settings, kill=kill):
        stopped.append("workers")
    for name, server in (
        ("kafka", local_kafka(settings)),
        ("postgres", LocalPostgres.from_settings(settings)),
    ):
        if (only is None or name in only) and server.pid() is not None:
            server.stop(kill=kill)
            stopped.append(name)
    return stopped
