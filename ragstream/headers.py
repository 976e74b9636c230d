"""Every Kafka header ragstream reads or writes, read and built here (the keys themselves are
named in `ragstream.topology`).

    event_headers(event_type, correlation_id)      what every event carries
    retry_attempt / retry_due_ms                   a retry copy's bookkeeping, read defensively
    retry_headers(record, exc, ...)                a retry copy's headers
    dead_letter_headers(record, exc, ...)          a dead letter's headers
    original_headers(headers)                      a dead letter's own headers, for redrive
    redrive_headers(headers, position)             a redriven copy's headers
    replay_headers(headers, replay_id)             a replayed copy's headers

Anyone may publish to ragstream's topics, so a reader never trusts a header: one that is absent,
not a number, or absurd is read as absent.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable
from typing import Any, Final

from ragstream.scrub import Scrubber
from ragstream.topology import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DUE_AT,
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_DOCUMENT,
    H_ERR_FIRST_FAILURE,
    H_ERR_GROUP,
    H_ERR_KIND,
    H_ERR_LAST_FAILURE,
    H_ERR_MESSAGE,
    H_ERR_OFFSET,
    H_ERR_PARTITION,
    H_ERR_PREFIX,
    H_ERR_STACKTRACE,
    H_ERR_STAGE,
    H_ERR_TENANT,
    H_ERR_TIMESTAMP,
    H_ERR_TOPIC,
    H_EVENT_TYPE,
    H_REDRIVE_OF,
    H_REPLAY,
)

Headers = list[tuple[str, bytes]]
RecordHeaders = Iterable[tuple[str, bytes]] | None  # as a consumed record has them

STACK_LIMIT: Final = 4000  # characters of the stack trace a header keeps (its end)
MESSAGE_LIMIT: Final = 1000  # characters of the error message a header keeps
MAX_ATTEMPT: Final = 1000  # an attempt number past any retry policy's: read as this
MAX_WAIT_MS: Final = 2 * 86_400_000  # a due time further ahead than any wait ragstream sets
_RETRY: Final = (H_ATTEMPT, H_DUE_AT)
_ORIGIN: Final = (H_ERR_TOPIC, H_ERR_PARTITION, H_ERR_OFFSET, H_ERR_TIMESTAMP, H_ERR_FIRST_FAILURE)


# -- reading -----------------------------------------------------------------------------------


def header(headers: RecordHeaders, key: str) -> bytes | None:
    """The first value of header `key`, or None."""
    for k, v in headers or ():
        if k == key:
            return bytes(v)
    return None


def last_text(headers: RecordHeaders, key: str) -> str | None:
    """The last value of header `key` as text (undecodable bytes replaced), or None."""
    found = None
    for k, v in headers or ():
        if k == key:
            found = bytes(v).decode("utf-8", errors="replace")
    return found


def int_header(headers: RecordHeaders, key: str, default: int) -> int:
    """A header holding a decimal integer, or `default` when it is absent or is not one: a
    crafted header must neither stop a worker nor hold a partition."""
    raw = header(headers, key)
    if raw is None:
        return default
    try:
        text = raw.decode("ascii")
        return int(text) if text.strip().lstrip("-").isdigit() else default
    except UnicodeDecodeError:
        return default


def retry_attempt(headers: RecordHeaders) -> int:
    """The attempt a record is due for: 1 for a first delivery, at most MAX_ATTEMPT."""
    return max(1, min(int_header(headers, H_ATTEMPT, 1), MAX_ATTEMPT))


def retry_due_ms(headers: RecordHeaders, now_ms: int) -> int | None:
    """When a retry copy becomes due (epoch ms), or None when it is due now: no due time, one
    in the past, or one further ahead than ragstream ever sets (not one of ours)."""
    due = int_header(headers, H_DUE_AT, 0)
    if due <= now_ms or due > now_ms + MAX_WAIT_MS:
        return None
    return due


def correlation_id(headers: RecordHeaders) -> str | None:
    return (header(headers, H_CORRELATION_ID) or b"").decode(errors="replace") or None


def is_replay_copy(headers: RecordHeaders) -> bool:
    """Written by a live replay (`ragstream.replay`)."""
    return header(headers, H_REPLAY) is not None


# -- building ----------------------------------------------------------------------------------


def event_headers(event_type: str, correlation: str | None) -> Headers:
    """What every event carries: its type and, where it has one, its correlation id."""
    headers = [(H_EVENT_TYPE, event_type.encode())]
    if correlation is not None:
        headers.append((H_CORRELATION_ID, correlation.encode()))
    return headers


def carried_headers(headers: RecordHeaders) -> Headers:
    """The record's own headers, without retry or error bookkeeping."""
    return [
        (k, bytes(v))
        for k, v in headers or ()
        if not k.startswith(H_ERR_PREFIX) and k not in _RETRY
    ]


def original_headers(headers: RecordHeaders) -> Headers:
    """A dead letter's own headers: without `ragstream.errors.*`, retry bookkeeping and an
    earlier `ragstream.redrive.of`."""
    return [(k, v) for k, v in carried_headers(headers) if k != H_REDRIVE_OF]


def failure_headers(
    record: Any, exc: BaseException, *, stage: str, group: str, scrub: Scrubber
) -> Headers:
    """The record's own headers, where it first came from (kept from an earlier retry copy,
    else this record) and why it failed now (message and stack trace scrubbed of secrets)."""
    now = str(int(time.time() * 1000)).encode()
    if header(record.headers, H_ERR_TOPIC) is not None:
        origin = [(k, v) for k in _ORIGIN if (v := header(record.headers, k)) is not None]
    else:
        origin = [
            (H_ERR_TOPIC, record.topic.encode()),
            (H_ERR_PARTITION, str(record.partition).encode()),
            (H_ERR_OFFSET, str(record.offset).encode()),
            (H_ERR_TIMESTAMP, str(record.timestamp).encode()),
            (H_ERR_FIRST_FAILURE, now),
        ]
    stack = scrub("".join(traceback.format_exception(exc)))[-STACK_LIMIT:]
    return [
        *carried_headers(record.headers),
        *origin,
        (H_ERR_STAGE, stage.encode()),
        (H_ERR_GROUP, group.encode()),
        (H_ERR_CLASS, type(exc).__name__.encode()),
        (H_ERR_MESSAGE, scrub(str(exc))[:MESSAGE_LIMIT].encode()),
        (H_ERR_STACKTRACE, stack.encode()),
        (H_ERR_LAST_FAILURE, now),
    ]


def retry_headers(
    record: Any,
    exc: BaseException,
    *,
    stage: str,
    group: str,
    scrub: Scrubber,
    attempt: int,
    due_ms: int,
) -> Headers:
    """A retry copy's: the failure's headers plus the attempt it is due for and when."""
    return [
        *failure_headers(record, exc, stage=stage, group=group, scrub=scrub),
        (H_ATTEMPT, str(attempt).encode()),
        (H_DUE_AT, str(due_ms).encode()),
    ]


def dead_letter_headers(
    record: Any,
    exc: BaseException,
    *,
    stage: str,
    group: str,
    kind: str,
    attempts: int,
    scrub: Scrubber,
    tenant: str | None = None,
    document: str | None = None,
) -> Headers:
    """A dead letter's: the failure's headers, its kind and attempts, and the tenant and
    document when the record decoded."""
    headers = [
        *failure_headers(record, exc, stage=stage, group=group, scrub=scrub),
        (H_ERR_KIND, kind.encode()),
        (H_ERR_ATTEMPTS, str(attempts).encode()),
    ]
    if tenant is not None:
        headers.append((H_ERR_TENANT, tenant.encode()))
    if document is not None:
        headers.append((H_ERR_DOCUMENT, document.encode()))
    return headers


def redrive_headers(headers: RecordHeaders, position: str) -> Headers:
    """A dead letter's own headers plus `ragstream.redrive.of: <dlq partition>:<dlq offset>`."""
    return [*original_headers(headers), (H_REDRIVE_OF, position.encode())]


def replay_headers(headers: RecordHeaders, replay_id: str) -> Headers:
    """The record's headers with `ragstream.replay: <replay id>` (replacing an earlier one)."""
    kept = [(k, bytes(v)) for k, v in headers or () if k != H_REPLAY]
    return [*kept, (H_REPLAY, replay_id.encode())]
