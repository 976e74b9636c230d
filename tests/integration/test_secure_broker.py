"""The pipeline against an authenticated broker: SASL_SSL with SCRAM-SHA-512, a CA of the
stack's own, and least-privilege ACLs (publisher, worker, admin). One secure broker serves the
module; each test has its own topic prefix."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.devstack.kafka import LocalKafka
from ragstream.devstack.secure import ADMIN, PUBLISHER, WORKER, SecureSetup
from ragstream.settings import Settings, load_settings
from ragstream.store import Store
from ragstream.topology import Stage, Topology
from tests.conftest import new_local_kafka, running_kafka
from tests.integration.pipeline_helpers import (
    make_corpus,
    ragstream_in,
    wait_for_statuses,
    worker_env,
    workers,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    home = Path(tmp_path_factory.mktemp("secure-broker"))
    broker = new_local_kafka(home, secure=SecureSetup.ensure(home))
    yield from running_kafka(broker, "the secure Kafka broker")


def _as(settings: Settings, kafka: LocalKafka, user: str) -> Settings:
    assert kafka.secure is not None
    base = settings.kafka.model_copy(update={"bootstrap_servers": kafka.bootstrap})
    return settings.model_copy(update={"kafka": kafka.secure.client_kafka_settings(user, base)})


def _env(settings: Settings, kafka: LocalKafka, user: str, **extra: str) -> dict[str, str]:
    assert kafka.secure is not None
    env = worker_env(settings, RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap)
    env.update(kafka.secure.client_env(user))
    env.update(extra)
    return env


@pytest.fixture
async def secured(settings: Settings, secure_kafka: LocalKafka) -> Settings:
    """This test's prefix on the secure broker: topics created and ACLs applied (as admin)."""
    admin = _as(settings, secure_kafka, ADMIN)
    await ensure_topics(admin)
    await asyncio.to_thread(secure_kafka.apply_acls, settings.kafka.topic_prefix)
    return admin


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`ragstream ARGS` as an operator runs it, in a process of its own (an event loop in a
    thread of this process, beside the workers' forkservers, could miss a wake-up as it
    closed): exit code, and stdout then stderr."""
    code, out, err = await ragstream_in(env | {"COLUMNS": "200"}, *args)
    return code, out + err


async def test_the_pipeline_runs_against_the_secure_broker(
    settings: Settings,
    secured: Settings,
    secure_kafka: LocalKafka,
    store: Store,
    tenant: str,
    tmp_path: Path,
) -> None:
    """Uploads as the publisher, workers as the worker principal, operators as admin: every
    document is embedded, a dead letter is redriven, status shows the groups."""
    worker = _as(settings, secure_kafka, WORKER)
    publisher = _as(settings, secure_kafka, PUBLISHER)
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 100)
    async with workers(worker, list(Stage), accountant=True, ready_timeout_s=60):
        async with Uploader(publisher) as up:
            ids = [
                (await up.upload_file(p, tenant_id=tenant)).document_id
                for p in make_corpus(tmp_path / "in", 6)
            ]
            broken = (await up.upload_file(bad, tenant_id=tenant)).document_id
        docs = await wait_for_statuses(store, [*ids, broken], 90)
        assert {docs[d].status for d in ids} == {"embedded"}
        assert docs[broken].status == "dead-lettered"

        admin_env = _env(settings, secure_kafka, ADMIN)
        code, out = await _cli(admin_env, "dlq", "redrive", "--stage", "parse")
        assert code == 0 and "1" in out, out
        code, out = await _cli(admin_env, "status")
        assert code == 0, out
        for stage in Stage:
            assert f"{settings.kafka.topic_prefix}-{stage.value}" in out, out


async def test_a_publisher_may_only_write_uploads(
    settings: Settings, secured: Settings, secure_kafka: LocalKafka
) -> None:
    publisher = _as(settings, secure_kafka, PUBLISHER)
    topology = Topology(settings.kafka.topic_prefix)
    producer = AIOKafkaProducer(**publisher.kafka.client_options())
    await producer.start()
    try:
        await producer.send_and_wait(topology.uploaded, b"x", key=b"k")  # allowed
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(producer.send_and_wait(topology.control, b"x", key=b"k"), 30)
    finally:
        await producer.stop()
    # A record on the embedded topic: admin reads it back, the publisher sees no such topic
    # and gets nothing from it.
    admin_producer = AIOKafkaProducer(**secured.kafka.client_options())
    await admin_producer.start()
    try:
        await admin_producer.send_and_wait(topology.embedded, b"confidential", key=b"k")
    finally:
        await admin_producer.stop()
    assert await _read_embedded(secured, topology) == [b"confidential"]
    assert await _read_embedded(publisher, topology) == []
    consumer = AIOKafkaConsumer(**publisher.kafka.client_options())
    await consumer.start()
    try:
        visible = await consumer.topics()  # uploaded topics only (other tests' prefixes too)
        assert topology.uploaded in visible, visible
        assert all(t.endswith(".documents.uploaded") for t in visible), visible
    finally:
        await consumer.stop()


async def _read_embedded(settings: Settings, topology: Topology) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topology.embedded, p) for p in range(3)])
        got: list[bytes] = []
        deadline = asyncio.get_running_loop().time() + 8
        while not got and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            got += [r.value for records in batch.values() for r in records if r.value]
        return got
    finally:
        await consumer.stop()


async def test_a_plaintext_client_is_refused(secure_kafka: LocalKafka) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=secure_kafka.bootstrap, request_timeout_ms=3000)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(producer.start(), 30)
    await producer.stop()


def test_a_wrong_password_says_so_in_one_line(
    settings: Settings, secured: Settings, secure_kafka: LocalKafka, tmp_path: Path
) -> None:
    env = _env(
        settings,
        secure_kafka,
        WORKER,
        RAGSTREAM_KAFKA__SASL_PASSWORD="not-the-password",
        RAGSTREAM_OBSERVABILITY__LOG_FORMAT="json",
    )
    worker = subprocess.run(
        [sys.executable, "-m", "ragstream", "worker", "chunk"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert worker.returncode == 1, worker.stderr[-2000:]
    errors = [ln for ln in worker.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: kafka.sasl_password: authentication failed for user 'worker' "
        f"(SCRAM-SHA-512) at {secure_kafka.bootstrap}"
    ], worker.stderr[-2000:]
    assert "Traceback" not in worker.stderr
    for args in (["status"], ["stack", "kafka-tool", "topics", "--list"]):
        cmd = subprocess.run(
            [sys.executable, "-m", "ragstream", *args],
            env={**env, "RAGSTREAM_KAFKA__SASL_USERNAME": ADMIN, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert cmd.returncode == 1, (args, cmd.stdout[-1000:], cmd.stderr[-1000:])
        assert "authentication failed for user 'admin'" in cmd.stderr, cmd.stderr[-1000:]


def test_kafkas_own_tools_authenticate(
    settings: Settings, secured: Settings, secure_kafka: LocalKafka
) -> None:
    env = _env(settings, secure_kafka, ADMIN, COLUMNS="200")
    listed = subprocess.run(
        [sys.executable, "-m", "ragstream", "stack", "kafka-tool", "topics", "--list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert f"{settings.kafka.topic_prefix}.documents.uploaded" in listed.stdout


def test_the_secure_files_are_private_and_point_at_the_broker(secure_kafka: LocalKafka) -> None:
    data = secure_kafka.data_dir
    for private in (data / "secure.env", data / "secure" / "passwords.json"):
        assert private.stat().st_mode & 0o077 == 0, private
    env_text = (data / "secure.env").read_text()
    assert "RAGSTREAM_KAFKA__SASL_PASSWORD=" in env_text
    os.environ.pop("RAGSTREAM_CONFIG", None)
    loaded = _load_with(data / "secure.toml")
    assert loaded.kafka.security_protocol == "SASL_SSL"
    assert loaded.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert loaded.kafka.ssl_cafile == data / "secure" / "ca.pem"


def _load_with(config: Path) -> Settings:
    old = os.environ.get("RAGSTREAM_CONFIG")
    os.environ["RAGSTREAM_CONFIG"] = str(config)
    try:
        return load_settings()
    finally:
        if old is None:
            os.environ.pop("RAGSTREAM_CONFIG", None)
        else:
            os.environ["RAGSTREAM_CONFIG"] = old
