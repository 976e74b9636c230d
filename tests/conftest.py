"""Session-wide services for the test suite: one real Kafka broker and one real PostgreSQL.

Both start once per session in a temporary directory (or are taken from
`RAGSTREAM_KAFKA_BOOTSTRAP` / `RAGSTREAM_DATABASE_URL` when set), wait until ready and are
stopped at the end. A service that cannot start fails the tests that need it, with its log:
nothing is skipped. Each test gets its own topic prefix (so its own topics and groups).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ragstream import tracing
from ragstream.devstack.kafka import LocalKafka
from ragstream.devstack.postgres import LocalPostgres
from ragstream.devstack.secure import SecureSetup
from ragstream.errors import InfrastructureError
from ragstream.settings import Settings, load_settings
from ragstream.store import Store
from ragstream.store.migrate import migrate

TEST_DATABASE = "ragstream_test"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def classpath_cache_dir() -> Path:
    """Where the tests keep Kafka's resolved classpath between sessions (a list of jar paths
    in ~/.m2; checked jar by jar before use), so a session runs no Maven when warm."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ragstream" / "kafka"


def new_local_kafka(directory: Path, *, secure: SecureSetup | None = None) -> LocalKafka:
    """A broker of the tests' own in `directory` on free ports (not started yet), with the
    configured version and heap and the tests' classpath cache; `secure`: SASL_SSL + ACLs."""
    devstack = load_settings().devstack
    return LocalKafka(
        directory,
        port=free_port(),
        controller_port=free_port(),
        version=devstack.kafka_version,
        heap=devstack.kafka_heap,
        start_timeout_s=devstack.start_timeout_s,
        classpath_cache_dir=classpath_cache_dir(),
        secure=secure,
    )


def running_kafka(kafka: LocalKafka, what: str) -> Iterator[LocalKafka]:
    """Start `kafka` (the test fails with its log if it cannot), yield it, stop it."""
    try:
        kafka.start()
    except InfrastructureError as exc:
        kafka.stop()
        pytest.fail(f"{what} did not start: {exc}", pytrace=False)
    yield kafka
    kafka.stop()


def new_local_postgres(directory: Path) -> LocalPostgres:
    """A PostgreSQL of the tests' own in `directory` on a free port (not started yet)."""
    devstack = load_settings().devstack
    return LocalPostgres(
        directory,
        port=free_port(),
        system_user=devstack.postgres_system_user,
        start_timeout_s=devstack.start_timeout_s,
    )


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    """This session's directory for the local services' data and logs, removed at the end.

    In the system temp directory rather than pytest's tmp_path: PostgreSQL's system user must
    pass through every directory above it, and pytest resets /tmp/pytest-of-<user> to 0700 at
    the start of every session, so a second pytest run on the machine would lock it out.
    """
    path = Path(tempfile.mkdtemp(prefix="ragstream-test-services-"))
    path.chmod(0o711)  # others may pass through (not list or read)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def local_kafka(services_dir: Path) -> Iterator[LocalKafka | None]:
    """The session's own broker, or None when RAGSTREAM_KAFKA_BOOTSTRAP names another."""
    if os.environ.get("RAGSTREAM_KAFKA_BOOTSTRAP"):
        yield None
        return
    yield from running_kafka(new_local_kafka(services_dir), "the test Kafka broker")


@pytest.fixture(scope="session")
def kafka_classpath(local_kafka: LocalKafka | None, services_dir: Path) -> list[Path]:
    """Kafka's jars, for running Kafka's own tools (kafka_tool_command) against the broker."""
    kafka = local_kafka or LocalKafka(services_dir, classpath_cache_dir=classpath_cache_dir())
    try:
        return kafka.ensure_classpath()
    except InfrastructureError as exc:
        pytest.fail(f"Kafka's classpath could not be resolved: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def kafka_bootstrap(local_kafka: LocalKafka | None) -> str:
    if local_kafka is None:
        return os.environ["RAGSTREAM_KAFKA_BOOTSTRAP"]
    return local_kafka.bootstrap


@pytest.fixture(scope="session")
def local_postgres(services_dir: Path) -> Iterator[LocalPostgres | None]:
    """The session's own PostgreSQL, or None when RAGSTREAM_DATABASE_URL names another."""
    if os.environ.get("RAGSTREAM_DATABASE_URL"):
        yield None
        return
    postgres = new_local_postgres(services_dir)
    try:
        postgres.start()
    except InfrastructureError as exc:
        pytest.fail(f"the test PostgreSQL did not start: {exc}", pytrace=False)
    yield postgres
    postgres.stop()


@pytest.fixture(scope="session")
def database_url(local_postgres: LocalPostgres | None) -> str:
    if local_postgres is None:
        return os.environ["RAGSTREAM_DATABASE_URL"]
    try:
        return local_postgres.ensure_database(TEST_DATABASE)
    except InfrastructureError as exc:
        pytest.fail(f"the test database could not be created: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server (an S3-compatible HTTP server on a free port) for this session, and the
    standard AWS variables pointing every S3 client of this process at it."""
    from tests.remote_blobs import aws_environment, moto_s3

    with moto_s3(free_port()) as endpoint, pytest.MonkeyPatch.context() as env:
        for name, value in aws_environment(endpoint).items():
            if value is None:
                env.delenv(name, raising=False)
            else:
                env.setenv(name, value)
        yield endpoint


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own: its topics and consumer groups are new."""
    return f"t{uuid4().hex[:10]}"


@pytest.fixture
def settings(kafka_bootstrap: str, database_url: str, prefix: str, tmp_path: Path) -> Settings:
    # Init arguments are deep-merged over the TOML defaults: sections keep their other keys.
    return load_settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "topic_prefix": prefix, "partitions": 3},
        postgres={"url": database_url},
        devstack={"data_dir": tmp_path / "data"},
        observability={"metrics_port": 0},  # a free port per worker process
    )


@pytest.fixture
async def own_database(settings: Settings, prefix: str) -> AsyncIterator[Settings]:
    """`settings` pointing at a database of this test's own, for tests that read store-wide
    figures (the cost ledger's windows are per service, not per tenant). Dropped afterwards."""
    import asyncpg

    base = settings.postgres.dsn()
    parts = urlsplit(base)
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'CREATE DATABASE "{prefix}"')
        yield settings.model_copy(
            update={
                "postgres": settings.postgres.model_copy(
                    update={"url": urlunsplit(parts._replace(path=f"/{prefix}"))}
                )
            }
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{prefix}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def tenant(prefix: str) -> str:
    """A tenant of this test's own."""
    return f"tenant-{prefix}"


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """The store, migrated: workers migrate at start, but a test may poll before one is up."""
    await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=4) as s:
        yield s


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test (ragstream.tracing), every span kept in memory as it ends;
    off again after it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()
