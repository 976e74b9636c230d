"""The no-Docker local services: Kafka from Maven Central jars, PostgreSQL + pgvector.

Most tests use the session's broker and database; the start-up failure tests start small
instances of their own in a temporary directory.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ragstream.devstack.jars import CONSUMER_GROUPS, java_binary, kafka_tool_command
from ragstream.devstack.kafka import LocalKafka
from ragstream.devstack.postgres import LocalPostgres
from ragstream.errors import InfrastructureError
from ragstream.settings import load_settings

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _topic_with(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """A new topic of one partition holding `records` (key, value), each sent as its own batch
    and acknowledged."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


@pytest.fixture
def own_kafka(local_kafka: LocalKafka | None) -> LocalKafka:
    if local_kafka is None:
        pytest.skip("about the local broker; RAGSTREAM_KAFKA_BOOTSTRAP names another one")
    return local_kafka


@pytest.fixture
def own_postgres(local_postgres: LocalPostgres | None) -> LocalPostgres:
    if local_postgres is None:
        pytest.skip("about the local PostgreSQL; RAGSTREAM_DATABASE_URL names another one")
    return local_postgres


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _no_subprocess(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"no subprocess expected, got {args!r}")


# -- Kafka ----------------------------------------------------------------------------------


def test_classpath_is_cached_and_needs_no_maven(
    own_kafka: LocalKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = own_kafka.ensure_classpath()
    monkeypatch.setenv("PATH", "/nonexistent")  # no mvn to be found
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
    assert own_kafka.ensure_classpath() == first
    names = {jar.name for jar in first}
    version = own_kafka.version
    assert {f"kafka_2.13-{version}.jar", f"kafka-tools-{version}.jar"} <= names
    # SLF4J 2 only (1.7 cannot bind to Log4j 2), and the Log4j 2 binding is there.
    assert [n for n in names if n.startswith("slf4j-api-")] == [
        next(n for n in names if n.startswith("slf4j-api-2.0."))
    ]
    assert any(n.startswith("log4j-slf4j2-impl-2.24.") for n in names)


def test_start_again_returns_at_once_with_the_same_broker(own_kafka: LocalKafka) -> None:
    pid = own_kafka.pid()
    assert pid is not None and own_kafka.is_running()
    started = time.monotonic()
    assert own_kafka.start() == own_kafka.bootstrap
    assert time.monotonic() - started < 3
    assert own_kafka.pid() == pid
    # Another process (a fresh object on the same directory) sees it running too.
    twin = LocalKafka(own_kafka.data_dir, own_kafka.port, own_kafka.controller_port)
    assert twin.is_running() and twin.pid() == pid


def test_the_broker_jvm_compiles_with_c1_only(own_kafka: LocalKafka) -> None:
    # The running JVM's own flags: no C2 compiler threads competing with the pipeline.
    pid = own_kafka.pid()
    assert pid is not None
    jcmd = Path(java_binary()).resolve().with_name("jcmd")
    flags = subprocess.run(
        [str(jcmd), str(pid), "VM.flags"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "-XX:TieredStopAtLevel=1" in flags.split(), flags


async def test_the_broker_maps_index_files_of_one_mib(own_kafka: LocalKafka, prefix: str) -> None:
    # A partition's index files are sparse files of their maximum size, mapped; the first write
    # faults in the disk's readahead window of zero pages, so they are kept small (10 MiB is
    # Kafka's default).
    topic = f"{prefix}.index-size"
    # batches past index.interval.bytes (4 KiB): an index entry is made
    await _topic_with(
        own_kafka.bootstrap, topic, [(str(n).encode(), bytes(8192)) for n in range(3)]
    )
    # the entry was written (its files made) before the broker acknowledged the batch
    indexes = sorted((own_kafka.log_dirs / f"{topic}-0").glob("*.*index"))
    sizes = {path.name: path.stat().st_size for path in indexes}
    assert {path.suffix for path in indexes} == {".index", ".timeindex"}, sizes
    assert all(0 < size <= 1024 * 1024 for size in sizes.values()), sizes


def test_a_taken_port_fails_with_the_broker_log(
    tmp_path: Path, taken_port: int, own_kafka: LocalKafka
) -> None:
    kafka = LocalKafka(
        tmp_path,
        port=taken_port,
        controller_port=free_port(),
        start_timeout_s=60,
        classpath_cache_dir=own_kafka.classpath_file.parent,
    )
    with pytest.raises(InfrastructureError) as info:
        kafka.start()
    message = str(info.value)
    assert "exited during start-up" in message
    assert f"port {taken_port}" in message and "already in use" in message
    assert "Address already in use" in message  # the broker's own log line
    assert str(kafka.log_path) in message
    assert not kafka.pid_path.exists() and not kafka.is_running()


def test_a_broken_config_fails_fast_with_the_log(tmp_path: Path, own_kafka: LocalKafka) -> None:
    kafka = LocalKafka(
        tmp_path,
        port=free_port(),
        controller_port=free_port(),
        heap="1m",  # the JVM refuses to start
        classpath_cache_dir=own_kafka.classpath_file.parent,
    )
    started = time.monotonic()
    with pytest.raises(InfrastructureError) as info:
        kafka.start()
    assert time.monotonic() - started < 30
    assert "Too small maximum heap" in str(info.value)


@pytest.mark.slow
def test_first_resolution_runs_maven_and_the_next_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka = LocalKafka(tmp_path, classpath_cache_dir=tmp_path / "cache")
    calls: list[list[str]] = []
    real_run = subprocess.run

    def spy(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    jars = kafka.ensure_classpath()
    assert len(calls) == 1 and Path(calls[0][0]).name == "mvn"
    assert kafka.classpath_file.is_file() and all(j.is_file() for j in jars)
    assert not (Path(calls[0][calls[0].index("-f") + 1]).parent / "target").exists()
    assert kafka.ensure_classpath() == jars
    assert len(calls) == 1


@pytest.mark.slow
def test_an_unresolvable_version_fails_with_mavens_output(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, version="4.0.99", classpath_cache_dir=tmp_path)
    with pytest.raises(InfrastructureError) as info:
        kafka.ensure_classpath()
    message = str(info.value)
    assert "Maven could not resolve Kafka 4.0.99" in message
    assert "kafka_2.13:jar:4.0.99" in message or "4.0.99" in message.split("\n", 1)[1]
    assert not kafka.classpath_file.exists()


async def test_kafkas_consumer_group_command_lists_our_group(
    kafka_bootstrap: str, kafka_classpath: list[Path], prefix: str
) -> None:
    topic, group = f"{prefix}.tools", f"{prefix}-tools"
    await _topic_with(kafka_bootstrap, topic, [(b"k", b"hello")])
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.value == b"hello"
        await consumer.commit()
    finally:
        await consumer.stop()

    cmd = kafka_tool_command(
        kafka_classpath,
        CONSUMER_GROUPS,
        ["--bootstrap-server", kafka_bootstrap, "--list"],
    )
    done = await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert group in done.stdout.split()


# -- PostgreSQL -----------------------------------------------------------------------------


async def test_pgvector_hnsw_nearest_neighbours(database_url: str, prefix: str) -> None:
    table = f"{prefix}_items"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, embedding vector(3))")
        await conn.execute(f"CREATE INDEX ON {table} USING hnsw (embedding vector_l2_ops)")
        rows = [(1, "[1,0,0]"), (2, "[0,1,0]"), (3, "[0,0,1]"), (4, "[0.9,0.1,0]")]
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2::vector)", rows)
        nearest = await conn.fetch(
            f"SELECT id FROM {table} ORDER BY embedding <-> $1::vector LIMIT 3", "[1,0.05,0]"
        )
        assert [r["id"] for r in nearest] == [1, 4, 2]
        version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname='vector'")
        assert version is not None
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_the_dev_stack_postgres_is_configured_for_the_pipeline(
    own_postgres: LocalPostgres, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # A buffer cache the HNSW index fits in (initdb's 128MB is outgrown at some 30,000
        # vectors, and every insert then reads pages back from the OS), and room for pools.
        assert await conn.fetchval("SHOW shared_buffers") == "1GB"
        assert await conn.fetchval("SHOW max_connections") == "200"
    finally:
        await conn.close()


def test_postgres_start_again_and_ensure_database_are_idempotent(
    own_postgres: LocalPostgres, database_url: str
) -> None:
    pid = own_postgres.pid()
    assert pid is not None and own_postgres.is_running()
    started = time.monotonic()
    own_postgres.start()
    assert time.monotonic() - started < 3
    assert own_postgres.pid() == pid
    assert own_postgres.ensure_database("ragstream_test") == database_url
    assert own_postgres.dsn("ragstream_test") == database_url


def test_postgres_on_a_taken_port_fails_with_the_server_log(
    services_dir: Path, prefix: str, taken_port: int
) -> None:
    # Under services_dir: PostgreSQL's system user can reach it (pytest's tmp_path it cannot).
    postgres = LocalPostgres(services_dir / prefix, port=taken_port, start_timeout_s=30)
    with pytest.raises(InfrastructureError) as info:
        postgres.start()
    message = str(info.value)
    assert "PostgreSQL did not start" in message
    assert "Address already in use" in message  # from the server's log
    assert str(postgres.log_path) in message
    assert not postgres.is_running()


async def test_postgres_requires_the_generated_password(
    own_postgres: LocalPostgres, database_url: str
) -> None:
    """scram-sha-256 for every connection; the password is generated, kept 0600 in the data
    directory, carried by the DSNs the class hands out and read by the settings."""
    password = own_postgres.password()
    assert password and len(password) >= 24
    assert own_postgres.password_path.stat().st_mode & 0o077 == 0
    assert f":{password}@" in database_url
    without = database_url.replace(f":{password}@", "@")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(without)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(database_url.replace(password, "wrong-password"))
    conn = await asyncpg.connect(database_url)
    try:
        method = await conn.fetchval(
            "SELECT string_agg(DISTINCT auth_method, ',') FROM pg_hba_file_rules"
        )
        assert method == "scram-sha-256"
    finally:
        await conn.close()
    local = load_settings(
        devstack={"data_dir": own_postgres.data_dir, "postgres_port": own_postgres.port},
        postgres={"port": own_postgres.port},
    )
    assert local.postgres.password is not None
    assert local.postgres.password.get_secret_value() == password


def test_a_cluster_made_with_trust_requires_passwords_after_a_restart(
    services_dir: Path, prefix: str
) -> None:
    """A data directory an older version made (trust, no password file) is switched over."""
    postgres = LocalPostgres(services_dir / f"{prefix}-old", port=free_port(), start_timeout_s=60)
    postgres.start()
    try:
        postgres.password_path.unlink()
        hba = postgres.pgdata / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        postgres.stop()
        postgres.start()
        assert postgres.password() is not None
        methods = {ln.split()[-1] for ln in hba.read_text().splitlines() if ln[:1].isalpha()}
        assert methods == {"scram-sha-256"}
        done = postgres.psql("postgres", "SELECT 1;\n")
        assert done.returncode == 0, done.stdout
    finally:
        postgres.stop()
