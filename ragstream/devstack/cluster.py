"""A local KRaft cluster of three nodes, each broker and controller in one process (a combined
quorum), from the same jars as the single broker (ragstream.devstack.kafka).

Why combined: on one machine three JVMs instead of six (three controllers and three brokers),
and the quorum still survives the loss of any one node, which is what a local cluster is for
(failover tests, replication you can watch). In production Kafka recommends dedicated
controllers; the settings that matter to ragstream (replication factor 3,
`min.insync.replicas` 2, `acks=all`) are the same either way.

Node n (1, 2, 3) lives in `<data_dir>/kafka-<n>`, listens on `devstack.kafka_port + 2(n-1)` and
its controller on `devstack.kafka_controller_port + 2(n-1)` (9092/9093, 9094/9095, 9096/9097 by
default). All three are formatted with one cluster id, kept in `<data_dir>/kafka-cluster`,
which also marks the data directory as a cluster's: `stack up` then runs three nodes without
being told again.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ragstream.devstack.kafka import LocalKafka
from ragstream.devstack.kraft import new_cluster_id
from ragstream.devstack.secure import SecureSetup
from ragstream.errors import ConfigError, InfrastructureError

if TYPE_CHECKING:
    from ragstream.settings import Settings

CLUSTER_FILE = "kafka-cluster"
T = TypeVar("T")


class LocalKafkaCluster:
    """Three (or `len(ports)`) KRaft nodes started, stopped and probed together."""

    def __init__(
        self,
        data_dir: Path,
        ports: Sequence[tuple[int, int]],
        *,
        version: str = "4.3.1",
        heap: str = "512m",
        start_timeout_s: float = 90.0,
        classpath_cache_dir: Path | None = None,
    ) -> None:
        if len(ports) < 3:
            raise InfrastructureError(f"a local cluster has 3 nodes or more, not {len(ports)}")
        self.data_dir = data_dir.resolve()
        self.marker = self.data_dir / CLUSTER_FILE
        self.cluster_id = cluster_id = self._cluster_id()
        voters = [(n, controller) for n, (_, controller) in enumerate(ports, 1)]
        cache = classpath_cache_dir or self.data_dir / "kafka-1"
        self.nodes = [
            LocalKafka(
                self.data_dir,
                port,
                controller,
                version,
                heap,
                start_timeout_s,
                classpath_cache_dir=cache,
                node_id=n,
                voters=voters,
                home_name=f"kafka-{n}",
                format_cluster_id=cluster_id,
            )
            for n, (port, controller) in enumerate(ports, 1)
        ]

    @classmethod
    def from_settings(cls, settings: Settings, brokers: int = 3) -> LocalKafkaCluster:
        devstack = settings.devstack
        ports = [
            (devstack.kafka_port + 2 * i, devstack.kafka_controller_port + 2 * i)
            for i in range(brokers)
        ]
        return cls(
            devstack.data_dir,
            ports,
            version=devstack.kafka_version,
            heap=devstack.kafka_heap,
            start_timeout_s=devstack.start_timeout_s,
        )

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def is_running(self) -> bool:
        return all(node.is_running() for node in self.nodes)

    def pid(self) -> int | None:
        """A running node's process id (None when no node runs): as LocalKafka.pid()."""
        return next((p for p in (n.pid() for n in self.nodes) if p is not None), None)

    def start(self) -> str:
        """Start every node that is not running, at once (a node is ready only when a quorum
        of controllers has formed, so they cannot start one after another)."""
        if not self.marker.exists():
            if (self.data_dir / "kafka" / "logs" / "meta.properties").exists():
                raise InfrastructureError(
                    f"{self.data_dir} holds a single broker's data; a cluster needs a fresh "
                    "devstack.data_dir (or remove its kafka directory, and its topics with it)"
                )
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{self.cluster_id}\n")  # before any node is formatted
        self._each(lambda node: node.start())
        return self.bootstrap

    def stop(self, *, kill: bool = False) -> None:
        self._each(lambda node: node.stop(kill=kill))

    def tool_command(self, tool_main_class: str, args: Sequence[str]) -> list[str]:
        """One of Kafka's tools on the nodes' classpath (LocalKafka.tool_command)."""
        return self.nodes[0].tool_command(tool_main_class, args)

    def _each(self, action: Callable[[LocalKafka], T]) -> list[T]:
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            return list(pool.map(action, self.nodes))

    def _cluster_id(self) -> str:
        """The id every node is formatted with: the one kept in the marker, else a new one
        (kept by the first start, before any node is formatted)."""
        try:
            return self.marker.read_text().split()[0]
        except (FileNotFoundError, IndexError):
            return new_cluster_id()


def is_cluster(data_dir: Path) -> bool:
    """Whether the data directory holds a local cluster's data (not a single broker's)."""
    return (data_dir / CLUSTER_FILE).exists()


def local_kafka(
    settings: Settings, *, secure: SecureSetup | None = None, brokers: int | None = None
) -> LocalKafka | LocalKafkaCluster:
    """The stack's Kafka: a cluster when `brokers` asks for more than one or the data
    directory already holds one, else the single broker (secure or not)."""
    data_dir = settings.devstack.data_dir
    if brokers is not None and brokers not in (1, 3):
        raise ConfigError(f"--brokers {brokers}: the local stack runs 1 broker or 3")
    if brokers == 1 and is_cluster(data_dir):
        raise ConfigError(
            f"{data_dir} holds a 3-node cluster's data; leave out --brokers, or use a fresh "
            "devstack.data_dir for a single broker"
        )
    if (brokers or 1) > 1 or (brokers is None and is_cluster(data_dir)):
        if secure is not None or (data_dir / "kafka" / "secure").exists():
            raise ConfigError("the local 3-node cluster runs without --secure (PLAINTEXT only)")
        return LocalKafkaCluster.from_settings(settings, brokers or 3)
    return LocalKafka.from_settings(settings, secure=secure)
