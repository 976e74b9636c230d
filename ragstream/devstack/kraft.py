"""A KRaft node's own files: the `server.properties` it is started with (written at every
start), its storage formatted once with the cluster's id, and the cluster id a running broker
reports.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import os
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from ragstream.devstack.jars import LOG_TAIL_LINES, STORAGE_TOOL, java_binary, kafka_config_dir
from ragstream.errors import InfrastructureError


def node_properties(
    host: str,
    node_id: int,
    voters: Sequence[tuple[int, int]],
    port: int,
    controller_port: int,
    log_dirs: Path,
) -> dict[str, str]:
    """The plaintext configuration of one broker+controller node of a quorum of `voters`."""
    # Internal topics replicated as widely as the cluster allows (3 at most), each write
    # acknowledged by all but one replica: one node can be lost without losing a commit.
    rf = min(3, len(voters))
    min_isr = str(max(1, rf - 1))
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": ",".join(f"{n}@{host}:{p}" for n, p in voters),
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(log_dirs),
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
        # Index files of 1 MiB, not 10: each is a sparse file the broker maps, and its first
        # write faults in a read-around of the disk's whole readahead window (read_ahead_kb,
        # 8 MiB on some virtual disks), zero pages the kernel fills and charges to the request
        # handler: about 10 CPU-seconds, with every request waiting, when a fresh set of topics
        # takes its first records. A segment still rolls only after hundreds of MiB.
        "log.index.size.max.bytes": str(1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
    }
    return props


def write_properties(path: Path, props: dict[str, str]) -> None:
    """Write a Java .properties file whole (a temporary file, then a rename)."""
    text = "# Written by ragstream (ragstream.devstack.kafka) at every start; edits are lost.\n"
    text += "".join(f"{k}={_escape(v)}\n" for k, v in props.items())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def format_storage(
    classpath: Sequence[Path],
    properties_path: Path,
    log_dirs: Path,
    cluster_id: str,
    extra_args: Sequence[str] = (),
) -> None:
    """Format a node's storage for `cluster_id` with Kafka's StorageTool (once, before its
    first start); `extra_args` add to it (the SCRAM users of a secure broker)."""
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
        str(properties_path),
        *extra_args,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, check=False, cwd=properties_path.parent
    )
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise InfrastructureError(
            f"formatting Kafka storage in {log_dirs} failed (exit {done.returncode}):\n{output}"
        )


def stored_cluster_id(log_dirs: Path) -> str | None:
    """The cluster id a node's storage was formatted with (None before the first start)."""
    try:
        text = (log_dirs / "meta.properties").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    return None


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


def new_cluster_id() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64 without padding, as Kafka makes."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):
            return value


def _escape(value: str) -> str:
    """Escape a value for a Java .properties file."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")
