"""Operating the pipeline: more processes for a stage, more partitions for a topic, SIGTERM in
the middle of a batch, and `ragstream status` / `ragstream topics scale` as an operator runs
them (real `python -m ragstream` processes against the session's broker and PostgreSQL).

The embed stage runs in `real` mode against the local server that speaks OpenAI's API, with a
fixed latency per request, so a backlog takes long enough to watch it move. A member that gives
partitions away (a rebalance, or SIGTERM) lets the records it has started finish (within
`kafka.shutdown_grace_s`, 10 s by default) and hands the rest of its batch back uncommitted, so
a handover takes about one request's time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import RecordsToDelete
from aiokafka.structs import OffsetAndMetadata
from pipeline_helpers import (
    WorkerProcess,
    committed_offsets,
    group_members,
    make_corpus,
    ragstream,
    read_topic,
    variant,
    wait_for_statuses,
    wait_until,
    workers,
)

from producers.upload import Uploader, upload_paths
from ragstream.admin import admin_client, describe_topics, ensure_topics
from ragstream.devstack.jars import CONSUMER_GROUPS, kafka_tool_command
from ragstream.settings import Settings
from ragstream.status import read_status
from ragstream.store import Document, Store
from ragstream.topology import Stage, Topology
from tests.servers.openai_server import Fault, OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EMBED = Stage.EMBED.value


def paid_embeddings(server: OpenAIServer, **more: str) -> dict[str, str]:
    """Environment of an embed process that calls the local OpenAI server (and has budget)."""
    return {
        "RAGSTREAM_SERVICES__OPENAI__MODE": "real",
        "RAGSTREAM_SERVICES__OPENAI__BASE_URL": server.base_url,
        "RAGSTREAM_SERVICES__OPENAI__API_KEY": "test-key",
        "RAGSTREAM_BUDGETS__DAILY_USD": "1000",
        "RAGSTREAM_BUDGETS__HOURLY_REQUESTS": "100000",
        **more,
    }


async def status_json(settings: Settings, *args: str) -> dict[str, Any]:
    code, out, err = await ragstream(settings, "status", "--json", *args)
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


async def backlog(
    settings: Settings, paths: Sequence[Path], tenant: str, *, timeout_s: float = 90
) -> list[str]:
    """Upload, and let parse and chunk (in this process) put every document on the chunked
    topic, where the embed group finds a backlog. The document ids."""
    async with workers(settings, [Stage.PARSE, Stage.CHUNK]):
        receipts, rejected = await upload_paths(settings, paths, tenant_id=tenant)
        assert rejected == []
        chunked = Topology(settings.kafka.topic_prefix).chunked
        await read_topic(settings, chunked, at_least=len(receipts), timeout_s=timeout_s)
    return [r.document_id for r in receipts]


async def assert_embedded_once(store: Store, tenant: str, docs: dict[str, Document]) -> None:
    """Every document embedded, each table holding exactly its rows, no natural key twice."""
    assert Counter(d.status for d in docs.values()) == {"embedded": len(docs)}
    duplicates = await store.duplicate_rows(tenant)
    assert duplicates == dict.fromkeys(duplicates, 0), duplicates
    chunks = sum(d.chunk_count or 0 for d in docs.values())
    counts = await store.count_rows(tenant)
    assert {t: counts[t] for t in ("documents", "parse_results", "chunks", "embeddings")} == {
        "documents": len(docs),
        "parse_results": len(docs),
        "chunks": chunks,
        "embeddings": chunks,
    }


def explain(*procs: WorkerProcess) -> Any:
    return lambda: "\n".join(f"--- {p.client_id}\n{p.tail()}" for p in procs)


# -- one to three processes --------------------------------------------------------------------


async def test_three_embed_processes_share_a_backlog_and_status_shows_the_spread(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    settings = variant(settings, kafka={"partitions": 6})
    topology = Topology(settings.kafka.topic_prefix)
    await ensure_topics(settings)
    ids = await backlog(settings, make_corpus(tmp_path / "docs", 60, seed=81), tenant)

    with OpenAIServer(latency_s=0.3) as server:
        procs = [
            WorkerProcess(
                settings,
                EMBED,
                tmp_path / f"embed-{n}.log",
                client_id=f"embed-{n}",
                # A known pace, so a backlog is left to share when the others join: one
                # record per call, one call at a time (0.3 s or more a document).
                env=paid_embeddings(
                    server,
                    RAGSTREAM_KAFKA__BATCH_RECORDS="1",
                    RAGSTREAM_KAFKA__CONCURRENT_BATCHES="1",
                ),
                args=("--concurrency", "1"),
            )
            for n in (1, 2, 3)
        ]

        def spread() -> bool:
            held = [set(p.assigned(topology.chunked) or ()) for p in procs]
            return all(held) and sum(map(len, held)) == 6 and set().union(*held) == set(range(6))

        try:
            procs[0].start()
            await wait_until(
                lambda: len(procs[0].handled()) >= 3, 60, "embed-1 at work", explain=explain(*procs)
            )
            handled_alone = len(procs[0].handled())
            procs[1].start()
            procs[2].start()
            await wait_until(
                spread, 60, "three members sharing 6 partitions", explain=explain(*procs)
            )
            seen: list[dict[str, Any]] = []

            async def settled() -> bool:  # what the operator sees once the rebalance is over
                seen.append(await status_json(settings, "--group", EMBED, "--sample", "0.5"))
                (group,) = seen[-1]["groups"]
                return group["state"] == "Stable" and len(group["members"]) == 3

            await wait_until(settled, 30, "status to show three members", poll_s=0.2)
            docs = await wait_for_statuses(store, ids, 120, running=procs, explain=explain(*procs))
        finally:
            codes = [await p.stop() for p in procs]
    assert codes == [0, 0, 0], explain(*procs)()
    assert handled_alone < len(ids), "the backlog was gone before the others joined"

    (group,) = seen[-1]["groups"]
    assert (group["name"], group["group_id"], group["state"]) == (
        EMBED,
        topology.group(Stage.EMBED),
        "Stable",
    )
    members = {m["client_id"]: m for m in group["members"]}
    assert sorted(members) == ["embed-1", "embed-2", "embed-3"]
    held = {
        c: {p["partition"] for p in m["partitions"] if p["topic"] == topology.chunked}
        for c, m in members.items()
    }
    assert all(held.values()), held
    assert sum(map(len, held.values())) == 6 and set().union(*held.values()) == set(range(6))
    owner = {m["member_id"]: c for c, m in members.items()}
    for row in group["partitions"]:  # each partition names the member that holds it
        if row["topic"] == topology.chunked:
            assert row["partition"] in held[owner[row["member_id"]]]
    assert group["lag"] == sum(p["lag"] for p in group["partitions"])
    assert group["records_per_s"] is not None

    for proc in procs:  # all three embedded documents; the two that joined took a share
        assert proc.handled(), proc.client_id
    done = [{h["document_id"] for h in p.handled()} for p in procs]
    assert set().union(*done) == set(ids)
    await assert_embedded_once(store, tenant, docs)


# -- growing a topic while it is in use ----------------------------------------------------------


async def test_growing_the_stage_topics_during_a_run_loses_nothing(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    # Clients refresh metadata every 2 s here (30 s by default), so the group sees the new
    # partitions within the test.
    settings = variant(settings, kafka={"metadata_max_age_ms": 2000})
    topology = Topology(settings.kafka.topic_prefix)
    await ensure_topics(settings)
    before = make_corpus(tmp_path / "before", 30, seed=82)
    after = make_corpus(tmp_path / "after", 30, seed=83, start=100)

    async with workers(settings) as runners:
        first, _ = await upload_paths(settings, before, tenant_id=tenant)
        for stage in Stage:  # while the first uploads are on their way
            code, out, err = await ragstream(settings, "topics", "scale", stage.value, "-p", "6")
            assert code == 0, err
            assert f"{topology.input_topic(stage)}: 3 -> 6 partitions" in out
            assert "about 50% of keys" in " ".join(out.split())
        second, _ = await upload_paths(settings, after, tenant_id=tenant)
        ids = [r.document_id for r in [*first, *second]]
        docs = await wait_for_statuses(store, ids, 120)

        def grown() -> bool:
            return all(
                {tp.partition for tp in r.assignment if tp.topic == r.input_topic} == set(range(6))
                for r in runners
            )

        await wait_until(grown, 30, "every stage to read all six partitions of its input")
    described = {t.name: t.partitions for t in await describe_topics(settings)}
    assert [described[topology.input_topic(s)] for s in Stage] == [6, 6, 6]

    uploaded = await read_topic(settings, topology.uploaded, at_least=len(ids))
    on_new = {d.document_id for d in uploaded if d.record.partition >= 3}
    assert on_new and on_new <= {r.document_id for r in second}
    for stage in Stage:  # every record on the new partitions was read and committed
        topic = topology.input_topic(stage)
        committed = await committed_offsets(settings, topology.group(stage))
        ends = {
            d.record.partition: d.record.offset + 1
            for d in await read_topic(settings, topic, at_least=len(ids))
        }
        for partition in range(3, 6):
            assert committed.get(TopicPartition(topic, partition), 0) == ends.get(partition, 0)
    embedded = await read_topic(settings, topology.embedded, at_least=len(ids))
    assert {d.document_id for d in embedded} == set(ids)
    await assert_embedded_once(store, tenant, docs)


# -- SIGTERM in the middle of a batch ------------------------------------------------------------


async def test_sigterm_mid_batch_hands_over_at_once_and_loses_and_repeats_nothing(
    settings: Settings, tenant: str, store: Store, tmp_path: Path
) -> None:
    topology = Topology(settings.kafka.topic_prefix)
    group = topology.group(Stage.EMBED)
    await ensure_topics(settings)
    ids = await backlog(settings, make_corpus(tmp_path / "docs", 42, seed=84), tenant)
    session_timeout_s = 45.0  # Kafka's default, the time a vanished member is waited for

    with OpenAIServer(latency_s=0.3) as server:
        env = paid_embeddings(
            server,
            RAGSTREAM_KAFKA__SESSION_TIMEOUT_MS="45000",
            RAGSTREAM_KAFKA__CONCURRENT_BATCHES="1",
            RAGSTREAM_KAFKA__BATCH_RECORDS="1",
        )
        a, b = (
            # One document at a time, each a request of 0.3 s or more: embed-a is almost always
            # in the middle of one, and its share of the backlog lasts seconds after the split.
            WorkerProcess(
                settings,
                EMBED,
                tmp_path / f"{c}.log",
                client_id=c,
                env=env,
                args=("--concurrency", "1"),
            )
            for c in ("embed-a", "embed-b")
        )

        def split() -> bool:
            pa, pb = a.assigned(topology.chunked), b.assigned(topology.chunked)
            return bool(pa and pb and not set(pa) & set(pb) and set(pa) | set(pb) == {0, 1, 2})

        try:
            a.start()
            b.start()
            await wait_until(split, 60, "both processes to hold partitions", explain=explain(a, b))
            handled = len(a.handled())  # then it works on its own share
            await wait_until(lambda: len(a.handled()) >= handled + 2, 60, "embed-a at work")
            held_by_a = set(a.assigned(topology.chunked) or ())
            a_worker = f"{socket.gethostname()}:{a.pid}"
            sigterm_at, sigterm_wall = time.monotonic(), time.time()
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(a.proc.wait, 30)
            exit_s = time.monotonic() - sigterm_at
            # What embed-a left of its partitions: the records after its last commit.
            committed = await committed_offsets(settings, group)
            ends = {
                d.record.partition: d.record.offset + 1
                for d in await read_topic(settings, topology.chunked)
            }
            done_at = {p: committed.get(TopicPartition(topology.chunked, p), 0) for p in held_by_a}
            behind = {p: done_at[p] for p in held_by_a if done_at[p] < ends.get(p, 0)}

            async def b_holds_all() -> bool:
                state, members = await group_members(settings, group)
                return (
                    state == "Stable"
                    and [m.client_id for m in members] == ["embed-b"]
                    and sorted(members[0].partitions.get(topology.chunked, [])) == [0, 1, 2]
                )

            await wait_until(b_holds_all, session_timeout_s, "embed-b to hold every partition")
            handover_s = time.monotonic() - sigterm_at
            status = await status_json(settings, "--sample", "0")
            docs = await wait_for_statuses(store, ids, 90, running=[b], explain=explain(a, b))
        finally:
            codes = (await a.stop(), await b.stop())
    assert code == 0 and codes == (0, 0), explain(a, b)()
    assert exit_s < 10, f"embed-a took {exit_s:.1f}s to stop"
    # It left the group (LeaveGroup) instead of being waited for until its session timed out.
    assert handover_s < session_timeout_s / 3, f"handover took {handover_s:.1f}s"
    assert a.events("consumer stopped"), a.tail()
    # It was in the middle of a batch: it finished the record in hand or handed records back
    # after the signal, and left records of its partitions to embed-b.
    after_signal = [
        line
        for line in [*a.handled(), *a.events("in-flight records handed back")]
        if datetime.fromisoformat(line["timestamp"]).timestamp() > sigterm_wall
    ]
    assert after_signal, a.tail()
    assert behind, "embed-a had finished its partitions before it was stopped"
    after_a = [
        h
        for h in b.handled()
        if h["topic"] == topology.chunked
        and h["partition"] in behind
        and h["offset"] >= behind[h["partition"]]
    ]
    assert after_a, "embed-b never took over embed-a's unfinished partitions"
    # embed-a withdrew its circuit reports when it stopped; embed-b's are there
    (openai,) = [s for s in status["services"] if s["service"] == "openai"]
    reporting = {w["worker_id"] for w in openai["circuit"]["workers"]}
    assert a_worker not in reporting
    assert f"{socket.gethostname()}:{b.pid}" in reporting
    await assert_embedded_once(store, tenant, docs)


# -- status against Kafka's own tool -----------------------------------------------------------


async def test_status_lag_agrees_with_kafka_consumer_groups(
    settings: Settings, kafka_classpath: list[Path]
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    topic, group = topology.uploaded, topology.group(Stage.PARSE)
    producer = AIOKafkaProducer(**settings.kafka.client_options())
    await producer.start()
    try:
        for partition, count in ((0, 10), (1, 5), (2, 4)):
            for n in range(count):
                await producer.send_and_wait(topic, b"x%d" % n, partition=partition)
    finally:
        await producer.stop()
    tps = [TopicPartition(topic, p) for p in range(3)]
    async with admin_client(settings) as admin:
        # Partition 1: retention moved its log start to 2; the group never committed there.
        await admin.delete_records({tps[1]: RecordsToDelete(2)}, timeout_ms=10_000)
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tps[0], tps[2]])
        await consumer.commit({tps[0]: OffsetAndMetadata(4, ""), tps[2]: OffsetAndMetadata(4, "")})
    finally:
        await consumer.stop()

    status = await read_status(settings, [Stage.PARSE.value], sample_s=0)
    (parse,) = status.groups
    ours = {p.partition: p for p in parse.partitions if p.topic == topic}
    assert {p: (r.log_start, r.committed, r.log_end, r.lag) for p, r in ours.items()} == {
        0: (0, 4, 10, 6),
        1: (2, None, 5, 3),  # no committed offset: counted from the log start
        2: (0, 4, 4, 0),
    }
    assert parse.lag == 9 and parse.state == "Empty" and parse.members == ()

    cmd = kafka_tool_command(
        kafka_classpath,
        CONSUMER_GROUPS,
        ["--bootstrap-server", settings.kafka.bootstrap_servers, "--describe", "--group", group],
    )
    done = await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(group)]
    theirs = {int(r[2]): (r[3], r[4], r[5]) for r in rows if r[1] == topic}
    for partition, (current, log_end, lag) in theirs.items():
        assert (int(current), int(log_end), int(lag)) == (
            ours[partition].committed,
            ours[partition].log_end,
            ours[partition].lag,
        )
    assert set(theirs) == {0, 2}  # it lists only partitions the group committed


# -- circuit state across processes --------------------------------------------------------------


async def test_status_shows_a_workers_open_circuit_and_forgets_the_worker_when_it_stops(
    settings: Settings, tenant: str
) -> None:
    await ensure_topics(settings)
    me = f"{socket.gethostname()}:{os.getpid()}"
    with OpenAIServer() as server:
        settings = variant(
            settings,
            services={
                "openai": {
                    "mode": "real",
                    "base_url": server.base_url,
                    "api_key": "test-key",
                    "circuit_failures": 1,
                }
            },
        )
        server.fail_for(60, Fault.http(503))
        async with workers(settings):
            before = await read_status(settings, [EMBED], sample_s=0)
            (openai,) = [s for s in before.services if s.service == "openai"]
            assert openai.circuit.state == "closed" and me in {
                w.report.worker_id for w in openai.circuit.live
            }
            async with Uploader(settings) as up:
                await up.upload_bytes(
                    b"# Down\n\nThe service is down.", "down.md", tenant_id=tenant
                )

            async def opened() -> bool:
                status = await read_status(settings, [EMBED], sample_s=0)
                (svc,) = [s for s in status.services if s.service == "openai"]
                mine = [w for w in svc.circuit.live if w.report.worker_id == me]
                return svc.circuit.state == "open" and bool(mine) and mine[0].report.state == "open"

            await wait_until(opened, 30, "the open circuit to show in status", poll_s=0.5)
            server.calm()
        status = await read_status(settings, [EMBED], sample_s=0)
    (openai,) = [s for s in status.services if s.service == "openai"]
    assert me not in {w.report.worker_id for w in openai.circuit.workers}  # tombstoned
    code, out, _ = await ragstream(settings, "status", "--sample", "0")
    assert code == 0 and "paid services" in out and "no usage yet" in out


# -- bad operator input ------------------------------------------------------------------------


async def test_bad_scale_and_status_input_is_refused_clearly(settings: Settings) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    elsewhere = variant(settings, kafka={"topic_prefix": f"{settings.kafka.topic_prefix}x"})
    runs = await asyncio.gather(
        ragstream(settings, "topics", "scale", "embed", "--partitions", "2"),
        ragstream(settings, "topics", "scale", topology.chunked, "--partitions", "3"),
        ragstream(settings, "topics", "scale", "embedings", "--partitions", "6"),
        ragstream(settings, "topics", "scale", "control", "--partitions", "3"),
        ragstream(settings, "topics", "scale", "embed", "--partitions", "0"),
        ragstream(settings, "status", "--group", "embedd"),
        ragstream(elsewhere, "status"),
    )
    expected = [
        f"{topology.chunked} has 3 partitions; a topic can only grow (asked for 2)",
        f"{topology.chunked} already has 3 partitions; a topic can only grow",
        "unknown topic 'embedings': give a stage (parse, chunk, embed) or a topic name",
        f"{topology.control} is not scaled: it is compacted",
        "Invalid value for '--partitions'",
        "unknown group 'embedd': choose one of parse, chunk, embed, cost",
        f"no ragstream topics with prefix '{settings.kafka.topic_prefix}x'",
    ]
    for (code, out, err), message in zip(runs, expected, strict=True):
        said = " ".join((out + err).split())
        assert code != 0, said
        assert message in said, said
        assert "Traceback" not in said, said
    described = {t.name: t.partitions for t in await describe_topics(settings)}
    assert described[topology.chunked] == 3 and described[topology.control] == 1
