"""A real single-node Apache Kafka broker (KRaft) from Apache Kafka's own jars, without Docker.

Maven resolves `config/kafka/pom.xml` (kafka_2.13 + kafka-tools at one version) from Maven
Central into `~/.m2`; the resulting classpath is cached in `<data_dir>/kafka/classpath-<v>.txt`
and reused while every jar in it exists, so later starts run no Maven at all. The broker runs
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

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ragstream.errors import InfrastructureError
from ragstream.local.secure import ACL_TOOL, ADMIN, MECHANISM, Acl, SecureSetup, acls
from ragstream.resources import config_dir

if TYPE_CHECKING:
    from ragstream.settings import Settings

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
BROKER_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
# Kafka's operator tools (kafka-consumer-groups.sh and friends), for kafka_tool_command().
CONSUMER_GROUPS = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
TOPICS = "org.apache.kafka.tools.TopicCommand"
GET_OFFSETS = "org.apache.kafka.tools.GetOffsetShell"
METADATA_QUORUM = "org.apache.kafka.tools.MetadataQuorumCommand"
CONFIGS = "kafka.admin.ConfigCommand"

LOG_TAIL_LINES = 60
MAVEN_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 30.0
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_HEAP = re.compile(r"^(\d+)([mMgG])$")
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND
_FRAME = re.compile(r"^\s+(at \S|\.\.\. \d+ more)")


def kafka_config_dir() -> Path:
    """The bundled `config/kafka` directory (pom.xml, log4j2.yaml); may be read-only."""
    return config_dir() / "kafka"


def java_binary() -> str:
    """`$JAVA_HOME/bin/java` when set, else `java` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise InfrastructureError("java not found: the local Kafka broker needs Java 17+ on PATH")
    return found


def kafka_tool_command(
    classpath: Sequence[Path], tool_main_class: str, args: Sequence[str], *, heap: str = "256m"
) -> list[str]:
    """The command line that runs one of Kafka's own tools (e.g. CONSUMER_GROUPS) on `classpath`.

    Tool output goes to stdout; Kafka's own log lines (warnings and up) to stderr.
    """
    return [
        java_binary(),
        f"-Xmx{heap}",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",  # short-lived JVM: start fast rather than run fast
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={kafka_config_dir() / 'log4j2.yaml'}",
        "-Dragstream.log.target=SYSTEM_ERR",
        "-Dragstream.log.level=WARN",
        "-cp",
        os.pathsep.join(str(p) for p in classpath),
        tool_main_class,
        *args,
    ]


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' if it does not exist), Java stack frames left
    out so the messages and their causes fit."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return ""
    kept = [ln for ln in data.decode("utf-8", "replace").splitlines() if not _FRAME.match(ln)]
    return "\n".join(kept[-lines:])


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
        a cluster (ragstream.local.cluster) gets its `node_id`, the quorum's `voters`
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
        self.classpath_file = cache / f"classpath-{version}.txt"
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
        local = settings.local
        return cls(
            data_dir=local.data_dir,
            port=local.kafka_port,
            controller_port=local.kafka_controller_port,
            version=local.kafka_version,
            heap=local.kafka_heap,
            start_timeout_s=local.start_timeout_s,
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

    # -- classpath ------------------------------------------------------------------------

    def ensure_classpath(self) -> list[Path]:
        """Kafka's jars: the cached list if every jar still exists, else resolved by Maven."""
        cached = self._cached_classpath()
        if cached is not None:
            return cached
        self.classpath_file.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.classpath_file.with_suffix(".lock")):
            cached = self._cached_classpath()  # another process may have resolved it meanwhile
            if cached is not None:
                return cached
            self._resolve_with_maven()
        resolved = self._cached_classpath()
        if resolved is None:
            raise InfrastructureError(f"Maven wrote no usable classpath to {self.classpath_file}")
        return resolved

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

    def _cached_classpath(self) -> list[Path] | None:
        try:
            text = self.classpath_file.read_text().strip()
        except FileNotFoundError:
            return None
        jars = [Path(p) for p in text.split(os.pathsep) if p]
        if not jars or not all(j.is_file() for j in jars):
            return None
        return jars

    def _resolve_with_maven(self) -> None:
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfrastructureError(
                "Maven (mvn) not found on PATH: it resolves Kafka's jars from Maven Central "
                "the first time the local broker starts"
            )
        partial = self.classpath_file.with_suffix(".partial")
        cmd = [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(kafka_config_dir() / "pom.xml"),
            "dependency:build-classpath",
            f"-Dkafka.version={self.version}",
            f"-Dmdep.outputFile={partial}",
        ]
        log.info("kafka.classpath.resolving", version=self.version, pom=cmd[5])
        started = time.monotonic()
        try:
            done = subprocess.run(
                cmd,
                cwd=self.classpath_file.parent,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=MAVEN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise InfrastructureError(
                f"Maven did not resolve Kafka {self.version} within {MAVEN_TIMEOUT_S:.0f}s"
            ) from exc
        if done.returncode != 0 or not partial.is_file():
            output = "\n".join((done.stdout + done.stderr).splitlines()[-LOG_TAIL_LINES:])
            partial.unlink(missing_ok=True)
            raise InfrastructureError(
                f"Maven could not resolve Kafka {self.version} (exit {done.returncode}): "
                f"{' '.join(cmd)}\n{output}"
            )
        partial.replace(self.classpath_file)
        log.info(
            "kafka.classpath.resolved",
            version=self.version,
            seconds=round(time.monotonic() - started, 1),
        )

    # -- lifecycle ------------------------------------------------------------------------

    def is_running(self) -> bool:
        """The broker from the pid file is alive and its port answers."""
        return self.pid() is not None and port_open(self.port)

    def start(self) -> str:
        """Start the broker unless it runs already; wait until it serves metadata."""
        self.home.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.home / ".lifecycle.lock"):
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
        with _file_lock(self.home / ".lifecycle.lock"):
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
        try:
            text = (self.log_dirs / "meta.properties").read_text()
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

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
        # Internal topics replicated as widely as the cluster allows (3 at most), each write
        # acknowledged by all but one replica: one node can be lost without losing a commit.
        rf = min(3, len(self.voters))
        min_isr = str(max(1, rf - 1))
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(f"{n}@{HOST}:{p}" for n, p in self.voters),
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": str(rf),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": str(rf),
            "share.coordinator.state.topic.min.isr": min_isr,
            "default.replication.factor": str(rf),
            "min.insync.replicas": min_isr,
            "group.initial.rebalance.delay.ms": "0",
            # Compaction (the control topic): one cleaner thread with a buffer that fits the
            # heap, checking often so a compacted topic is cleaned within seconds.
            "log.cleaner.enable": "true",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.cleaner.backoff.ms": "5000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
        }
        if self.secure is not None:
            props.update(self.secure.broker_properties(HOST, self.port, self.controller_port))
        text = "# Written by ragstream (ragstream.local.kafka) at every start; edits are lost.\n"
        text += "".join(f"{k}={_escape(v)}\n" for k, v in props.items())
        tmp = self.properties_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.properties_path)

    def _format_storage(self, classpath: list[Path]) -> None:
        if (self.log_dirs / "meta.properties").exists():
            if self.secure is not None and not self.secure_marker.exists():
                raise InfrastructureError(
                    f"the broker in {self.home} was created without --secure, so it has no "
                    "SCRAM users; stop it and remove that directory (its topics go with it), "
                    "or use another local.data_dir for the secure stack"
                )
            return
        cluster_id = self.format_cluster_id or _cluster_id()
        cmd = [
            java_binary(),
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={kafka_config_dir() / 'log4j2.yaml'}",
            "-cp",
            os.pathsep.join(map(str, classpath)),
            STORAGE_TOOL,
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.properties_path),
            *(self.secure.format_args() if self.secure is not None else []),
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, check=False, cwd=self.home
        )
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise InfrastructureError(
                f"formatting Kafka storage in {self.log_dirs} failed (exit {done.returncode}):\n"
                f"{output}"
            )
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


def cluster_id_at(options: str | dict[str, object], timeout_ms: int = 1000) -> str | None:
    """The cluster id the broker at `options` (a bootstrap address, or aiokafka client
    options) reports (one aiokafka admin round trip), or None if it does not answer. Runs in
    a private event loop on a thread of its own, so it works whether or not the caller runs
    an event loop."""
    opts = {"bootstrap_servers": options} if isinstance(options, str) else dict(options)

    async def probe() -> str | None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**opts, request_timeout_ms=timeout_ms)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
        except Exception:
            return None
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        if not cluster.get("brokers"):
            return None
        return str(cluster.get("cluster_id"))

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-probe") as pool:
        return pool.submit(asyncio.run, probe()).result()


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (reaping it first if it is our exited child)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not running
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes do not start or resolve at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cluster_id() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64 without padding, as Kafka makes."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):
            return value


def _initial_heap(heap: str) -> str:
    match = _HEAP.match(heap)
    assert match is not None
    mb = int(match.group(1)) * (1024 if match.group(2) in "gG" else 1)
    return f"{min(mb, 128)}m"


def _escape(value: str) -> str:
    """Escape a value for a Java .properties file."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")
