"""A local 3-node KRaft cluster (ragstream.devstack.cluster): topics replicated 3 times with
`min.insync.replicas` 2; one node SIGKILLed while documents flow loses none and duplicates
none, the groups carry on with the survivors, and `ragstream status` shows the
under-replicated partitions until the node is back."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from producers.upload import Uploader
from ragstream.admin import admin_client, ensure_topics
from ragstream.devstack.cluster import LocalKafkaCluster, local_kafka
from ragstream.errors import ConfigError
from ragstream.settings import Settings, load_settings
from ragstream.status import read_status
from ragstream.store import Store
from ragstream.topology import Topology
from tests.conftest import classpath_cache_dir, free_port
from tests.integration.pipeline_helpers import variant, wait_for_statuses, wait_until, workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalKafkaCluster]:
    devstack = load_settings().devstack
    with tempfile.TemporaryDirectory(prefix="ragstream-cluster-") as tmp:
        nodes = LocalKafkaCluster(
            Path(tmp),
            [(free_port(), free_port()) for _ in range(3)],
            version=devstack.kafka_version,
            heap="384m",
            start_timeout_s=devstack.start_timeout_s,
            classpath_cache_dir=classpath_cache_dir(),
        )
        try:
            nodes.start()
            yield nodes
        finally:
            nodes.stop(kill=True)


def body(i: int) -> bytes:
    return f"# Note {i}\n\nReplicated note {i}: three copies, two in sync at least.".encode()


async def test_a_broker_killed_while_documents_flow_loses_and_duplicates_nothing(
    cluster: LocalKafkaCluster, settings: Settings, store: Store
) -> None:
    settings = variant(
        settings, kafka={"bootstrap_servers": cluster.bootstrap, "replication_factor": 3}
    )
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    async with admin_client(settings) as admin:
        (described,) = await admin.describe_topics([topology.embedded])
        assert {len(p["replicas"]) for p in described["partitions"]} == {3}
    status = await read_status(settings, sample_s=0)
    assert status.under_replicated == ()

    victim = cluster.nodes[0]
    ids: list[str] = []
    async with workers(settings, concurrency=1), Uploader(settings) as up:
        for i in range(40):
            if i == 15:  # SIGKILL, as a crash: no controlled shutdown, no leadership handed over
                pid = victim.pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            ids.append((await up.upload_bytes(body(i), f"n{i}.md", tenant_id="ha")).document_id)
            await asyncio.sleep(0.05)  # paced, so the kill falls among the uploads

        async def under() -> bool:
            return bool((await read_status(settings, sample_s=0)).under_replicated)

        await wait_until(under, 60, "status to show under-replicated partitions")
        done = await wait_for_statuses(store, ids, 240)
        assert {d.status for d in done.values()} == {"embedded"}, done

    # Every document once, each with its chunks and one embedding per chunk: nothing lost,
    # nothing written twice.
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        rows = await conn.fetchrow(
            """SELECT count(*) AS documents, sum(chunk_count) AS chunks,
                      (SELECT count(*) FROM chunks c WHERE c.document_id = ANY($1)) AS chunk_rows,
                      (SELECT count(*) FROM embeddings e WHERE e.document_id = ANY($1))
                          AS embedding_rows
               FROM documents WHERE document_id = ANY($1)""",
            ids,
        )
    finally:
        await conn.close()
    assert rows["documents"] == 40
    assert rows["chunks"] == rows["chunk_rows"] == rows["embedding_rows"] > 0, dict(rows)

    # The node comes back: it catches up and status says so.
    await asyncio.to_thread(victim.start)

    async def caught_up() -> bool:
        return not (await read_status(settings, sample_s=0)).under_replicated

    await wait_until(caught_up, 90, "every partition back in sync")


def test_the_stack_runs_one_broker_or_three_and_remembers(tmp_path: Path) -> None:
    settings = load_settings(devstack={"data_dir": tmp_path})
    with pytest.raises(ConfigError, match="runs 1 broker or 3"):
        local_kafka(settings, brokers=2)
    assert isinstance(local_kafka(settings, brokers=3), LocalKafkaCluster)
    assert not isinstance(local_kafka(settings), LocalKafkaCluster)  # not started: nothing kept
    (tmp_path / "kafka-cluster").write_text("someclusterid\n")  # as a first start leaves it
    kept = local_kafka(settings)
    assert isinstance(kept, LocalKafkaCluster) and kept.cluster_id == "someclusterid"
    assert [n.port for n in kept.nodes] == [9092, 9094, 9096]
    with pytest.raises(ConfigError, match="holds a 3-node cluster"):
        local_kafka(settings, brokers=1)
