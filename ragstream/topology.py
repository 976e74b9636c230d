"""Topic names, consumer groups and header keys: the one place they are spelled."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    PARSE = "parse"
    CHUNK = "chunk"
    EMBED = "embed"


# The consumer that is not a stage: the cost accountant (group <prefix>-cost, reading the usage
# topic, retrying through <prefix>.retry.cost, writing nothing downstream).
COST = "cost"


# Header keys carried by every ragstream record.
H_EVENT_TYPE = "ragstream.event-type"
H_CORRELATION_ID = "ragstream.correlation-id"
H_REPLAY = "ragstream.replay"
# W3C trace context (ragstream.tracing): the span a record came from. Set by the upload and by
# every stage on its outputs, retry copies and dead letters while tracing is on; outside
# publishers may set them too (one that does not parse is ignored).
H_TRACEPARENT = "traceparent"
H_TRACESTATE = "tracestate"
# Retry headers, added to the original record's headers when it goes to <prefix>.retry.<stage>.
H_ATTEMPT = "ragstream.retry.attempt"  # the attempt the record is due for (2, 3, ...)
H_DUE_AT = "ragstream.retry.due-at-ms"  # epoch ms before which it must not run again
# Dead-letter headers (in the spirit of Kafka Connect's __connect.errors.*). Retry records carry
# the ERR_* headers too, so the DLQ record names the original topic, partition and offset.
H_ERR_PREFIX = "ragstream.errors."
H_ERR_TOPIC = "ragstream.errors.topic"
H_ERR_PARTITION = "ragstream.errors.partition"
H_ERR_OFFSET = "ragstream.errors.offset"
H_ERR_TIMESTAMP = "ragstream.errors.timestamp"  # the original record's timestamp, epoch ms
H_ERR_STAGE = "ragstream.errors.stage"
H_ERR_GROUP = "ragstream.errors.group"
H_ERR_CLASS = "ragstream.errors.class"  # e.g. PermanentError, DecodeError, RetryableError
H_ERR_KIND = "ragstream.errors.kind"  # permanent | poison | exhausted
H_ERR_MESSAGE = "ragstream.errors.message"
H_ERR_STACKTRACE = "ragstream.errors.stacktrace"  # truncated
H_ERR_ATTEMPTS = "ragstream.errors.attempts"
H_ERR_FIRST_FAILURE = "ragstream.errors.first-failure-ms"
H_ERR_LAST_FAILURE = "ragstream.errors.last-failure-ms"
H_ERR_TENANT = "ragstream.errors.tenant-id"  # when the record decoded
H_ERR_DOCUMENT = "ragstream.errors.document-id"  # when the record decoded
# Set on records an operator sent back from the DLQ: "<dlq partition>:<dlq offset>".
H_REDRIVE_OF = "ragstream.redrive.of"

CONTROL_THROTTLE = "throttle"
CONTROL_MODE = "mode"
CONTROL_CIRCUIT = "circuit"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


@dataclass(frozen=True)
class Topology:
    """Every name derived from one prefix (default `ragstream`)."""

    prefix: str = "ragstream"

    @property
    def uploaded(self) -> str:
        return f"{self.prefix}.documents.uploaded"

    @property
    def parsed(self) -> str:
        return f"{self.prefix}.documents.parsed"

    @property
    def chunked(self) -> str:
        return f"{self.prefix}.documents.chunked"

    @property
    def embedded(self) -> str:
        return f"{self.prefix}.documents.embedded"

    @property
    def cost_usage(self) -> str:
        return f"{self.prefix}.cost.usage"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def retry(self, consumer: Stage | str) -> str:
        """Retry topic of a stage or of the cost accountant (`<prefix>.retry.cost`)."""
        return f"{self.prefix}.retry.{consumer}"

    def input_topic(self, consumer: Stage | str) -> str:
        inputs: dict[str, str] = {
            Stage.PARSE: self.uploaded,
            Stage.CHUNK: self.parsed,
            Stage.EMBED: self.chunked,
            COST: self.cost_usage,
        }
        return inputs[consumer]

    def output_topic(self, consumer: Stage | str) -> str | None:
        """Where a consumer publishes its result; None for the cost accountant."""
        outputs: dict[str, str] = {
            Stage.PARSE: self.parsed,
            Stage.CHUNK: self.chunked,
            Stage.EMBED: self.embedded,
        }
        return outputs.get(consumer)

    def group(self, name: Stage | str) -> str:
        """Consumer group of a stage (`<prefix>-parse`) or of another consumer (`<prefix>-cost`)."""
        return f"{self.prefix}-{name}"

    @staticmethod
    def control_key(kind: str, service: str, tenant: str | None = None) -> bytes:
        """Key on the compacted control topic: one live value per kind, service (and tenant)."""
        return ":".join(p for p in (kind, service, tenant) if p).encode()

    def topics(self, partitions: int) -> list[TopicSpec]:
        """Every topic the flow needs, with its partition count and configuration."""
        stage_cfg = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}
        specs = [
            TopicSpec(self.uploaded, partitions, stage_cfg),
            TopicSpec(self.parsed, partitions, stage_cfg),
            TopicSpec(self.chunked, partitions, stage_cfg),
            TopicSpec(self.embedded, partitions, stage_cfg),
        ]
        specs += [TopicSpec(self.retry(s), partitions, stage_cfg) for s in (*Stage, COST)]
        specs += [
            TopicSpec(
                self.cost_usage,
                partitions,
                {"cleanup.policy": "delete", "retention.ms": str(30 * 24 * 3600 * 1000)},
            ),
            # Compacted: the latest throttle state and service mode per key, read whole at start.
            TopicSpec(
                self.control,
                1,
                {
                    "cleanup.policy": "compact",
                    "min.compaction.lag.ms": "0",
                    "segment.ms": "3600000",
                },
            ),
            # Dead letters are kept until an operator purges them.
            TopicSpec(self.dlq, 3, {"cleanup.policy": "delete", "retention.ms": "-1"}),
        ]
        return specs
