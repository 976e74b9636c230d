"""A real single-node Apache Kafka broker (KRaft) from Apache Kafka's own jars, without Docker.

Maven resolves Kafka's jars from Maven Central (`ragstream.devstack.jars`); the classpath is
cached in `<data_dir>/kafka/classpath-<v>.txt`, so later starts run no Maven at all. The broker runs
detached on Java 17+ (it outlives the process that started it), logs to
`<data_dir>/kafka/broker.log` and keeps its data in `<data_dir>/kafka/logs`.

    kafka = LocalKafka.from_settings(settings)
    bootstrap = kafka.start()          # idempotent: returns at once if already running
    kafka.stop()                       # controlled shutdown, SIGKILL after a timeout
    kafka.stop(kill=True)              # SIGKILL now (a crash); the data is kept for the next start

Kafka's own tools run on the same classpath:

    subprocess.run(kafka.tool_command(CONSUMER_GROUPS, ["--bootstrap-server", bootstrap, "--list"]))
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ragstream.devstack.files import file_lock
from ragstream.devstack.jars import (
    BROKER_MAIN,
    KafkaJars,
    java_binary,
    kafka_config_dir,
    kafka_tool_command,
    tail,
)
from ragstream.devstack.kraft import (
    cluster_id_at,
    format_storage,
    new_cluster_id,
    node_properties,
    stored_cluster_id,
    write_properties,
)
from ragstream.devstack.secure import ACL_TOOL, ADMIN, MECHANISM, Acl, SecureSetup, acls
from ragstream.errors import InfrastructureError
from ragstream.pids import process_alive, wait_exit

if TYPE_CHECKING:
    from ragstream.settings import Settings

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 30.0
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_HEAP = re.compile(r"^(\d+)([mMgG])$")
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalKafka:
    """One local KRaft broker+controller in `<data_dir>/kafka`, listening on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 9092,
        controller_port: int = 9093,
        version: str = "4.3.1",
        heap: str = "512m",
        start_timeout_s: float = 90.0,
        *,
        classpath_cache_dir: Path | None = None,
        secure: SecureSetup | None = None,
        node_id: int = 1,
        voters: Sequence[tuple[int, int]] = (),
        home_name: str = "kafka",
        format_cluster_id: str | None = None,
    ) -> None:
        """One KRaft node, broker and controller in one process. Alone by default; a node of
        a cluster (ragstream.devstack.cluster) gets its `node_id`, the quorum's `voters`
        ((node id, controller port) each), a home of its own and the cluster's id."""
        if not _VERSION.match(version):
            raise InfrastructureError(f"kafka version {version!r} is not of the form 4.x.y")
        if not _HEAP.match(heap):
            raise InfrastructureError(f"kafka heap {heap!r} is not of the form 512m or 1g")
        if port == controller_port:
            raise InfrastructureError(f"kafka port and controller port are both {port}")
        self.data_dir = data_dir.resolve()
        self.home = self.data_dir / home_name
        self.node_id = node_id
        self.voters = list(voters) or [(node_id, controller_port)]
        self.format_cluster_id = format_cluster_id
        self.port = port
        self.controller_port = controller_port
        self.version = version
        self.heap = heap
        self.start_timeout_s = start_timeout_s
        cache = (classpath_cache_dir or self.home).resolve()
        self.jars = KafkaJars(cache / f"classpath-{version}.txt", version)
        self.log_dirs = self.home / "logs"
        self.properties_path = self.home / "server.properties"
        self.log_path = self.home / "broker.log"
        self.pid_path = self.home / "broker.pid"
        # Secure mode belongs to the data: a broker formatted with SCRAM users keeps them.
        self.secure_marker = self.home / "secure"
        if secure is None and self.secure_marker.exists():
            secure = SecureSetup.ensure(self.data_dir)
        self.secure = secure

    @classmethod
    def from_settings(cls, settings: Settings, *, secure: SecureSetup | None = None) -> LocalKafka:
        devstack = settings.devstack
        return cls(
            data_dir=devstack.data_dir,
            port=devstack.kafka_port,
            controller_port=devstack.kafka_controller_port,
            version=devstack.kafka_version,
            heap=devstack.kafka_heap,
            start_timeout_s=devstack.start_timeout_s,
            secure=secure,
        )

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def client_options(self) -> dict[str, object]:
        """aiokafka options of an admin client of this broker (SASL_SSL as admin if secure)."""
        opts: dict[str, object] = {"bootstrap_servers": self.bootstrap}
        if self.secure is not None:
            from aiokafka.helpers import create_ssl_context

            opts.update(
                security_protocol="SASL_SSL",
                sasl_mechanism=MECHANISM,
                sasl_plain_username=ADMIN,
                sasl_plain_password=self.secure.passwords[ADMIN],
                ssl_context=create_ssl_context(cafile=str(self.secure.certs.ca_cert)),
            )
        return opts

    @property
    def classpath_file(self) -> Path:
        return self.jars.path

    def ensure_classpath(self) -> list[Path]:
        """Kafka's jars: the cached list if every jar still exists, else resolved by Maven."""
        return self.jars.ensure()

    def tool_command(self, tool_main_class: str, args: Sequence[str]) -> list[str]:
        """kafka_tool_command() on this broker's classpath (resolved if need be)."""
        return kafka_tool_command(self.ensure_classpath(), tool_main_class, args)

    def apply_acls(self, prefix: str) -> list[Acl]:
        """Add the least-privilege ACLs (config/kafka/acls.toml) for a topic prefix, with
        Kafka's own AclCommand as admin; adding an ACL that exists changes nothing."""
        if self.secure is None:
            raise InfrastructureError("ACLs need the secure broker (ragstream stack up --secure)")
        entries = acls(prefix)
        config = str(self.secure.tool_config(ADMIN))
        runs = [  # one JVM per entry, all at once
            (
                acl,
                subprocess.Popen(
                    self.tool_command(
                        ACL_TOOL,
                        [
                            *("--bootstrap-server", self.bootstrap),
                            *("--command-config", config),
                            *acl.tool_args(),
                        ],
                    ),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for acl in entries
        ]
        for acl, proc in runs:
            out, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise InfrastructureError(
                    f"adding the ACL for {acl.principal} on {acl.resource} {acl.name!r} failed "
                    f"(exit {proc.returncode}):\n{(err or out)[-2000:]}"
                )
        log.info("kafka.acls.applied", prefix=prefix, entries=len(entries))
        return entries

    # -- lifecycle ------------------------------------------------------------------------

    def is_running(self) -> bool:
        """The broker from the pid file is alive and its port answers."""
        return self.pid() is not None and port_open(self.port)

    def start(self) -> str:
        """Start the broker unless it runs already; wait until it serves metadata."""
        self.home.mkdir(parents=True, exist_ok=True)
        with file_lock(self.home / ".lifecycle.lock"):
            pid = self.pid()
            if pid is not None:
                # Ours already (maybe still starting, from another process): wait for it.
                self._wait_ready(pid, started=time.monotonic())
                return self.bootstrap
            classpath = self.ensure_classpath()
            self._write_properties()
            self._format_storage(classpath)
            return self._launch(classpath)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, *, kill: bool = False) -> None:
        """SIGTERM (controlled shutdown), SIGKILL if it has not exited after `timeout_s`.

        `kill`: SIGKILL at once, as a crash would. The data stays: the next start recovers
        the logs (topics, records and committed offsets are all there)."""
        if not self.home.is_dir():
            return
        with file_lock(self.home / ".lifecycle.lock"):
            pid = self.pid()
            if pid is None:
                self.pid_path.unlink(missing_ok=True)
                return
            log.info("kafka.stopping", pid=pid, kill=kill)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            if not wait_exit(pid, 10.0 if kill else timeout_s):
                log.warning("kafka.stop.killing", pid=pid, after_s=timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_exit(pid, 10.0)
            self.pid_path.unlink(missing_ok=True)
            log.info("kafka.stopped", pid=pid)

    def cluster_id(self) -> str | None:
        """The cluster id this data directory was formatted with (None before the first start)."""
        return stored_cluster_id(self.log_dirs)

    def pid(self) -> int | None:
        """The running broker's process id (from the pid file, checked alive), if any."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not process_alive(pid):
            return None
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists():  # guard against a recycled pid (Linux)
            with contextlib.suppress(OSError):
                if str(self.properties_path).encode() not in cmdline.read_bytes():
                    return None
        return pid

    def _write_properties(self) -> None:
        props = node_properties(
            HOST, self.node_id, self.voters, self.port, self.controller_port, self.log_dirs
        )
        if self.secure is not None:
            props.update(self.secure.broker_properties(HOST, self.port, self.controller_port))
        write_properties(self.properties_path, props)

    def _format_storage(self, classpath: list[Path]) -> None:
        if (self.log_dirs / "meta.properties").exists():
            if self.secure is not None and not self.secure_marker.exists():
                raise InfrastructureError(
                    f"the broker in {self.home} was created without --secure, so it has no "
                    "SCRAM users; stop it and remove that directory (its topics go with it), "
                    "or use another devstack.data_dir for the secure stack"
                )
            return
        cluster_id = self.format_cluster_id or new_cluster_id()
        extra = self.secure.format_args() if self.secure is not None else []
        format_storage(classpath, self.properties_path, self.log_dirs, cluster_id, extra)
        if self.secure is not None:
            self.secure_marker.write_text("SASL_SSL with SCRAM-SHA-512 users; see ../secure/\n")
        log.info(
            "kafka.storage.formatted",
            log_dirs=str(self.log_dirs),
            cluster_id=cluster_id,
            secure=self.secure is not None,
        )

    def _launch(self, classpath: list[Path]) -> str:
        if self.log_path.exists():  # keep the previous run's log for a post-mortem
            self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        port_was_taken = port_open(self.port) or port_open(self.controller_port)
        argv = [
            java_binary(),
            f"-Xmx{self.heap}",
            f"-Xms{_initial_heap(self.heap)}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            # C1 only: on the 2-core machine the broker shares with the workers and PostgreSQL,
            # C2's compilations took 7-16% of a core for minutes after a start (and came back
            # with each new mix of requests), more than its faster code saved.
            "-XX:TieredStopAtLevel=1",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={kafka_config_dir() / 'log4j2.yaml'}",
            "-cp",
            os.pathsep.join(map(str, classpath)),
            BROKER_MAIN,
            str(self.properties_path),
        ]
        try:
            pid = self._spawn(argv)
        except OSError as exc:
            raise InfrastructureError(f"could not run {argv[0]}: {exc}") from exc
        self.pid_path.write_text(f"{pid}\n")
        log.info("kafka.starting", pid=pid, bootstrap=self.bootstrap, version=self.version)
        started = time.monotonic()
        try:
            self._wait_ready(pid, started, hint_port_taken=port_was_taken)
        except InfrastructureError:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
                wait_exit(pid, 10.0)
            self.pid_path.unlink(missing_ok=True)
            raise
        log.info("kafka.ready", pid=pid, seconds=round(time.monotonic() - started, 1))
        return self.bootstrap

    def _spawn(self, argv: list[str]) -> int:
        # posix_spawn, not Popen: the broker is meant to outlive this process (and this
        # object), so nothing should own it; setsid keeps a terminal's Ctrl-C away from it.
        return os.posix_spawn(
            argv[0],
            argv,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(self.log_path), _APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )

    def _wait_ready(self, pid: int, started: float, *, hint_port_taken: bool = False) -> None:
        deadline = started + self.start_timeout_s
        while True:
            if not process_alive(pid):
                hint = (
                    f" (port {self.port} or {self.controller_port} was already in use)"
                    if hint_port_taken
                    else ""
                )
                raise InfrastructureError(
                    f"the Kafka broker exited during start-up{hint}; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            # Ready when *this* broker serves metadata: the cluster id tells it from another
            # broker that may hold the port.
            if port_open(self.port) and cluster_id_at(self.client_options()) == self.cluster_id():
                return
            if time.monotonic() > deadline:
                raise InfrastructureError(
                    f"the Kafka broker did not become ready within {self.start_timeout_s:.0f}s; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(0.25)


def _initial_heap(heap: str) -> str:
    match = _HEAP.match(heap)
    assert match is not None
    mb = int(match.group(1)) * (1024 if match.group(2) in "gG" else 1)
    return f"{min(mb, 128)}m"
