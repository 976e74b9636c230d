"""Apache Kafka's own jars, resolved by Maven from Maven Central and cached, and the JVM command
lines that run the broker's tools on them.

Maven resolves `config/kafka/pom.xml` (kafka_2.13 + kafka-tools at one version) into `~/.m2`;
the resulting classpath is cached in a `classpath-<version>.txt` file and reused while every jar
in it exists, so later starts run no Maven at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from ragstream.devstack import files
from ragstream.devstack.files import file_lock
from ragstream.errors import InfrastructureError
from ragstream.resources import config_dir

log = structlog.get_logger(__name__)

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
    return files.tail(path, lines, window=256 * 1024, drop=_FRAME)


class KafkaJars:
    """The classpath of one Kafka version, cached in `path` (`classpath-<version>.txt`)."""

    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.version = version

    def ensure(self) -> list[Path]:
        """Kafka's jars: the cached list if every jar still exists, else resolved by Maven."""
        cached = self._cached()
        if cached is not None:
            return cached
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_suffix(".lock")):
            cached = self._cached()  # another process may have resolved it meanwhile
            if cached is not None:
                return cached
            self._resolve_with_maven()
        resolved = self._cached()
        if resolved is None:
            raise InfrastructureError(f"Maven wrote no usable classpath to {self.path}")
        return resolved

    def _cached(self) -> list[Path] | None:
        try:
            text = self.path.read_text().strip()
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
        partial = self.path.with_suffix(".partial")
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
                cwd=self.path.parent,
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
        partial.replace(self.path)
        log.info(
            "kafka.classpath.resolved",
            version=self.version,
            seconds=round(time.monotonic() - started, 1),
        )
