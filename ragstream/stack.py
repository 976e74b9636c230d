"""The no-Docker local stack: a Kafka broker, PostgreSQL with pgvector, topics, migrations.

`stack_up` is idempotent: what already runs is left as it is. It reports what it started, so
a caller (the demo) can stop exactly that and leave a stack someone else started running.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from ragstream.admin import TopicState, ensure_topics
from ragstream.local.kafka import LocalKafka
from ragstream.local.postgres import LocalPostgres
from ragstream.settings import Settings

log = structlog.get_logger(__name__)


@dataclass
class StackInfo:
    kafka_bootstrap: str
    postgres_dsn: str
    data_dir: str
    started: list[str] = field(default_factory=list)
    topics: list[TopicState] = field(default_factory=list)
    migrations: list[str] = field(default_factory=list)


async def stack_up(settings: Settings) -> StackInfo:
    kafka = LocalKafka.from_settings(settings)
    postgres = LocalPostgres.from_settings(settings)
    started: list[str] = []
    # Both servers start at once: the broker's JVM and PostgreSQL don't wait on each other.
    kafka_was_up, pg_was_up = kafka.is_running(), postgres.is_running()
    await asyncio.gather(asyncio.to_thread(kafka.start), asyncio.to_thread(postgres.start))
    started += [] if kafka_was_up else ["kafka"]
    started += [] if pg_was_up else ["postgres"]
    await asyncio.to_thread(postgres.ensure_database, settings.postgres.database)
    topics = await ensure_topics(settings)
    migrations = await _migrate(settings)
    return StackInfo(
        kafka_bootstrap=kafka.bootstrap,
        postgres_dsn=settings.postgres.redacted_dsn(),
        data_dir=str(settings.local.data_dir.resolve()),
        started=started,
        topics=topics,
        migrations=migrations,
    )


async def _migrate(settings: Settings) -> list[str]:
    from ragstream.store.migrate import migrate

    return await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)


def stack_down(settings: Settings, only: list[str] | None = None) -> list[str]:
    """Stop the local servers (all, or those named in `only`); returns what was stopped."""
    stopped = []
    kafka = LocalKafka.from_settings(settings)
    postgres = LocalPostgres.from_settings(settings)
    for name, server in (("kafka", kafka), ("postgres", postgres)):
        if (only is None or name in only) and server.is_running():
            server.stop()
            stopped.append(name)
    return stopped
