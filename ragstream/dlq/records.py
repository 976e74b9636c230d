"""A dead letter as read from the DLQ topic, the filter operators select them with, and
whether its value still decodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ragstream.codec import Codec
from ragstream.errors import PermanentError
from ragstream.events import Event
from ragstream.headers import last_text
from ragstream.operator_input import InvalidInput, epoch_ms, format_ms, parse_stage, parse_time
from ragstream.scrub import Scrubber
from ragstream.topology import (
    H_CORRELATION_ID,
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_DOCUMENT,
    H_ERR_KIND,
    H_ERR_MESSAGE,
    H_ERR_OFFSET,
    H_ERR_PARTITION,
    H_ERR_PREFIX,
    H_ERR_STAGE,
    H_ERR_TENANT,
    H_ERR_TOPIC,
    H_EVENT_TYPE,
)

POISON = "poison"


# -- records and filters -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """One record of the DLQ topic, as it is on the broker."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_consumer(cls, record: Any, scrub: Scrubber | None = None) -> DlqRecord:
        """The record as read; with `scrub`, its error headers scrubbed of secrets (a dead
        letter written by an older version, or by another system, may hold one)."""
        headers = tuple((k, bytes(v or b"")) for k, v in record.headers or ())
        if scrub is not None:
            headers = tuple(
                (k, scrub.bytes(v) if k.startswith(H_ERR_PREFIX) else v) for k, v in headers
            )
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=headers,
        )

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, key: str) -> str | None:
        """A header's value as text (the last one if repeated), or None."""
        return last_text(self.headers, key)

    @property
    def stage(self) -> str | None:
        return self.header(H_ERR_STAGE)

    @property
    def error_class(self) -> str | None:
        return self.header(H_ERR_CLASS)

    @property
    def kind(self) -> str | None:
        return self.header(H_ERR_KIND)

    @property
    def message(self) -> str:
        return self.header(H_ERR_MESSAGE) or ""

    @property
    def tenant(self) -> str | None:
        return self.header(H_ERR_TENANT)

    @property
    def document(self) -> str | None:
        return self.header(H_ERR_DOCUMENT)

    @property
    def origin_topic(self) -> str | None:
        return self.header(H_ERR_TOPIC) or None

    @property
    def attempts(self) -> int | None:
        text = self.header(H_ERR_ATTEMPTS)
        return int(text) if text and text.isdigit() else None

    def summary(self) -> dict[str, Any]:
        """What `list --json` prints for the record."""
        origin = None
        if self.origin_topic:
            origin = (
                f"{self.origin_topic}:{self.header(H_ERR_PARTITION)}:{self.header(H_ERR_OFFSET)}"
            )
        return {
            "position": self.position,
            "partition": self.partition,
            "offset": self.offset,
            "time": format_ms(self.timestamp_ms),
            "stage": self.stage,
            "error_class": self.error_class,
            "kind": self.kind,
            "attempts": self.attempts,
            "tenant": self.tenant,
            "document": self.document,
            "event_type": self.header(H_EVENT_TYPE),
            "correlation_id": self.header(H_CORRELATION_ID),
            "origin": origin,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which DLQ records an operation takes; an empty field takes all. Times are epoch ms of the
    DLQ record: since inclusive, until exclusive."""

    stages: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()  # compared case-insensitively
    tenants: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    @classmethod
    def build(
        cls,
        *,
        stages: Iterable[str] = (),
        error_classes: Iterable[str] = (),
        tenants: Iterable[str] = (),
        since: str | None = None,
        until: str | None = None,
        now: datetime | None = None,
    ) -> DlqFilter:
        """A filter from operator text; InvalidInput names the option that cannot be used."""
        now = now or datetime.now(UTC)
        since_ms = epoch_ms(parse_time(since, option="--since", now=now)) if since else None
        until_ms = epoch_ms(parse_time(until, option="--until", now=now)) if until else None
        if since_ms is not None and until_ms is not None and since_ms >= until_ms:
            raise InvalidInput(f"--since {since!r} is not before --until {until!r}")
        return cls(
            stages=frozenset(parse_stage(s).value for s in stages),
            error_classes=frozenset(c.strip().lower() for c in error_classes if c.strip()),
            tenants=frozenset(t for t in tenants if t),
            since_ms=since_ms,
            until_ms=until_ms,
        )

    def matches(self, record: DlqRecord) -> bool:
        if self.stages and record.stage not in self.stages:
            return False
        if self.error_classes and (record.error_class or "").lower() not in self.error_classes:
            return False
        if self.tenants and record.tenant not in self.tenants:
            return False
        if self.since_ms is not None and record.timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or record.timestamp_ms < self.until_ms


def is_poison(record: DlqRecord, codec: Codec) -> bool:
    """Dead-lettered as undecodable, or bytes that do not decode now."""
    return record.kind == POISON or decode_value(record, codec)[0] is None


def decode_value(record: DlqRecord, codec: Codec) -> tuple[Event | None, str | None]:
    """(event, None) when the value decodes, else (None, why not)."""
    if record.value is None:
        return None, "no value (null)"
    try:
        return codec.decode(record.value), None
    except PermanentError as exc:  # DecodeError, or a record that builds no event
        return None, str(exc)
