"""Every header ragstream reads or writes: crafted values are read as absent, and each copy
(retry, dead letter, redrive, replay) carries the record's own headers and its own bookkeeping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ragstream.headers import (
    MAX_ATTEMPT,
    MAX_WAIT_MS,
    carried_headers,
    correlation_id,
    dead_letter_headers,
    event_headers,
    int_header,
    is_replay_copy,
    last_text,
    redrive_headers,
    replay_headers,
    retry_attempt,
    retry_due_ms,
    retry_headers,
)
from ragstream.scrub import Scrubber
from ragstream.topology import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DUE_AT,
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_DOCUMENT,
    H_ERR_FIRST_FAILURE,
    H_ERR_KIND,
    H_ERR_MESSAGE,
    H_ERR_OFFSET,
    H_ERR_STAGE,
    H_ERR_TENANT,
    H_ERR_TOPIC,
    H_EVENT_TYPE,
    H_REDRIVE_OF,
    H_REPLAY,
)

NOW_MS = 1_800_000_000_000


def record(*headers: tuple[str, bytes]) -> SimpleNamespace:
    return SimpleNamespace(
        topic="p.documents.uploaded",
        partition=3,
        offset=41,
        timestamp=NOW_MS - 5,
        headers=list(headers),
    )


def keys(headers: list[tuple[str, bytes]]) -> list[str]:
    return [k for k, _ in headers]


def value(headers: list[tuple[str, bytes]], key: str) -> bytes | None:
    return dict(headers).get(key)


# -- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, 1), (b"2", 2), (b"0", 1), (b"-4", 1), (b"x", 1), (b"\xff", 1), (b"99999", MAX_ATTEMPT)],
)
def test_the_attempt_is_read_defensively(raw: bytes | None, expected: int) -> None:
    headers = [] if raw is None else [(H_ATTEMPT, raw)]
    assert retry_attempt(headers) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        (str(NOW_MS - 1).encode(), None),  # past: due now
        (str(NOW_MS + 500).encode(), NOW_MS + 500),
        (str(NOW_MS + MAX_WAIT_MS + 1).encode(), None),  # further ahead than ragstream waits
        (b"soon", None),
    ],
)
def test_a_due_time_is_ours_only_when_it_is_ahead_within_reason(
    raw: bytes | None, expected: int | None
) -> None:
    headers = [] if raw is None else [(H_DUE_AT, raw)]
    assert retry_due_ms(headers, NOW_MS) == expected


def test_plain_readers() -> None:
    headers = [("k", b"1"), ("k", b"\xff2"), (H_CORRELATION_ID, b"c-1")]
    assert int_header(headers, "k", 7) == 1 and int_header(headers, "none", 7) == 7
    assert last_text(headers, "k") == "\ufffd2" and last_text(None, "k") is None
    assert correlation_id(headers) == "c-1" and correlation_id([]) is None
    assert is_replay_copy([(H_REPLAY, b"r")]) and not is_replay_copy(None)


# -- building ----------------------------------------------------------------------------------


def test_event_headers_name_the_type_and_the_correlation_id_when_there_is_one() -> None:
    assert event_headers("DocumentParsed", "c") == [
        (H_EVENT_TYPE, b"DocumentParsed"),
        (H_CORRELATION_ID, b"c"),
    ]
    assert event_headers("CostUsage", None) == [(H_EVENT_TYPE, b"CostUsage")]


def test_a_first_failure_names_the_record_and_a_later_one_keeps_where_it_first_came_from() -> None:
    scrub = Scrubber(["s3cret"])
    first = retry_headers(
        record((H_CORRELATION_ID, b"c")),
        ValueError("token s3cret refused"),
        stage="parse",
        group="g",
        scrub=scrub,
        attempt=2,
        due_ms=NOW_MS + 1000,
    )
    assert value(first, H_ERR_TOPIC) == b"p.documents.uploaded"
    assert value(first, H_ERR_OFFSET) == b"41"
    assert value(first, H_ATTEMPT) == b"2" and value(first, H_DUE_AT) == str(NOW_MS + 1000).encode()
    assert b"s3cret" not in value(first, H_ERR_MESSAGE)  # type: ignore[operator]
    copy = SimpleNamespace(topic="p.retry.parse", partition=0, offset=9, timestamp=1, headers=first)
    dead = dead_letter_headers(
        copy,
        RuntimeError("again"),
        stage="parse",
        group="g",
        kind="exhausted",
        attempts=2,
        scrub=scrub,
        tenant="acme",
        document="d-1",
    )
    assert value(dead, H_ERR_TOPIC) == b"p.documents.uploaded"  # not the retry topic
    assert value(dead, H_ERR_FIRST_FAILURE) == value(first, H_ERR_FIRST_FAILURE)
    assert H_ATTEMPT not in keys(dead) and H_DUE_AT not in keys(dead)
    assert value(dead, H_ERR_CLASS) == b"RuntimeError" and value(dead, H_ERR_STAGE) == b"parse"
    assert value(dead, H_ERR_KIND) == b"exhausted" and value(dead, H_ERR_ATTEMPTS) == b"2"
    assert value(dead, H_ERR_TENANT) == b"acme" and value(dead, H_ERR_DOCUMENT) == b"d-1"
    assert keys(dead).count(H_ERR_TOPIC) == 1
    assert carried_headers(dead) == [(H_CORRELATION_ID, b"c")]


def test_redrive_headers_keep_the_originals_and_name_the_dlq_position() -> None:
    headers = [
        (H_EVENT_TYPE, b"DocumentUploaded"),
        (H_CORRELATION_ID, b"corr-1"),
        (H_ERR_CLASS, b"PermanentError"),
        (H_ATTEMPT, b"3"),
        (H_REDRIVE_OF, b"0:1"),
        ("custom", b"\xff"),
    ]
    assert redrive_headers(headers, "1:7") == [
        (H_EVENT_TYPE, b"DocumentUploaded"),
        (H_CORRELATION_ID, b"corr-1"),
        ("custom", b"\xff"),
        (H_REDRIVE_OF, b"1:7"),
    ]


def test_replay_headers_keep_the_record_headers_and_replace_an_earlier_replay_id() -> None:
    headers = [(H_CORRELATION_ID, b"c1"), (H_REPLAY, b"old"), ("x", b"1")]
    assert replay_headers(headers, "new") == [
        (H_CORRELATION_ID, b"c1"),
        ("x", b"1"),
        (H_REPLAY, b"new"),
    ]
