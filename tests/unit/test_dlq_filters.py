"""The DLQ tools' pure parts: operator input, filters, header handling, poison detection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ragstream.codec import Codec
from ragstream.dlq import (
    DlqFilter,
    DlqRecord,
    InvalidInput,
    decode_value,
    is_poison,
    parse_position,
    parse_positions,
    parse_stage,
    parse_time,
)
from ragstream.errors import ConfigError
from ragstream.events import DocumentParsed
from ragstream.topology import (
    H_CORRELATION_ID,
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_KIND,
    H_ERR_MESSAGE,
    H_ERR_STAGE,
    H_ERR_TENANT,
    H_ERR_TOPIC,
    H_EVENT_TYPE,
    Stage,
)

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def record(
    *,
    stage: str = "parse",
    error_class: str = "PermanentError",
    tenant: str | None = "acme",
    kind: str = "permanent",
    ts: datetime = NOW,
    value: bytes | None = b"x",
    extra: tuple[tuple[str, bytes], ...] = (),
) -> DlqRecord:
    headers = [
        (H_EVENT_TYPE, b"DocumentUploaded"),
        (H_CORRELATION_ID, b"corr-1"),
        (H_ERR_TOPIC, b"p.documents.uploaded"),
        (H_ERR_STAGE, stage.encode()),
        (H_ERR_CLASS, error_class.encode()),
        (H_ERR_KIND, kind.encode()),
        (H_ERR_ATTEMPTS, b"3"),
        (H_ERR_MESSAGE, "bad ünïcode".encode()),
        *extra,
    ]
    if tenant is not None:
        headers.append((H_ERR_TENANT, tenant.encode()))
    return DlqRecord(
        topic="p.dlq",
        partition=1,
        offset=7,
        timestamp_ms=int(ts.timestamp() * 1000),
        key=b"doc-1",
        value=value,
        headers=tuple(headers),
    )


# -- times, stages, positions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        ("1h30m", NOW - timedelta(hours=1, minutes=30)),
        ("45S", NOW - timedelta(seconds=45)),
        ("0m", NOW),
        ("2025-04-30T08:15:00Z", datetime(2025, 4, 30, 8, 15, tzinfo=UTC)),
        ("2025-04-30T10:15:00+02:00", datetime(2025, 4, 30, 8, 15, tzinfo=UTC)),
        ("2025-04-30 08:15", datetime(2025, 4, 30, 8, 15, tzinfo=UTC)),  # naive → UTC
        ("2025-04-30", datetime(2025, 4, 30, tzinfo=UTC)),
    ],
)
def test_times_are_iso_8601_or_an_age(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "2x", "h", "yesterday", "-2h", "2025-13-01", "2 h 3"])
def test_a_malformed_time_names_the_option(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"--since .*ISO 8601.*30m, 2h, 7d"):
        parse_time(text, option="--since", now=NOW)


def test_invalid_input_is_a_config_error_so_the_cli_exits_2() -> None:
    assert issubclass(InvalidInput, ConfigError)


def test_stages() -> None:
    assert parse_stage(" Parse ") is Stage.PARSE
    with pytest.raises(InvalidInput, match=r"--stage 'upload': unknown stage; choose one of parse"):
        parse_stage("upload")


@pytest.mark.parametrize(
    ("text", "expected"), [("0:42", (0, 42)), (" 2 : 7 ", (2, 7)), ("11:0", (11, 0))]
)
def test_positions(text: str, expected: tuple[int, int]) -> None:
    assert parse_position(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0:", ":4", "a:1", "0:-1", "0:1:2", "0;1"])
def test_a_malformed_position_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="expected PARTITION:OFFSET"):
        parse_position(text)


def test_position_lists() -> None:
    assert parse_positions("0:5,2:9") == {0: 5, 2: 9}
    with pytest.raises(InvalidInput, match="partition 0 is given twice"):
        parse_positions("0:5,0:9")
    with pytest.raises(InvalidInput, match="--up-to '0:5,'"):
        parse_positions("0:5,")


# -- filters -------------------------------------------------------------------------------------


def test_an_empty_filter_takes_everything() -> None:
    assert DlqFilter().matches(record())
    assert DlqFilter.build(now=NOW) == DlqFilter()


def test_filters_by_stage_error_class_and_tenant() -> None:
    flt = DlqFilter.build(stages=["parse", "EMBED"], error_classes=["permanenterror"])
    assert flt.stages == {"parse", "embed"}
    assert flt.matches(record(stage="embed"))
    assert not flt.matches(record(stage="chunk"))
    assert not flt.matches(record(error_class="RetryableError"))
    by_tenant = DlqFilter.build(tenants=["acme", "globex"])
    assert by_tenant.matches(record(tenant="globex"))
    assert not by_tenant.matches(record(tenant="initech"))
    assert not by_tenant.matches(record(tenant=None))  # a poison pill has no tenant


def test_filters_by_time_since_inclusive_until_exclusive() -> None:
    flt = DlqFilter.build(since="2h", until="1h", now=NOW)
    assert flt.matches(record(ts=NOW - timedelta(hours=2)))
    assert flt.matches(record(ts=NOW - timedelta(minutes=90)))
    assert not flt.matches(record(ts=NOW - timedelta(hours=1)))
    assert not flt.matches(record(ts=NOW - timedelta(hours=3)))


def test_a_filter_refuses_unknown_stages_and_empty_time_windows() -> None:
    with pytest.raises(InvalidInput, match="unknown stage"):
        DlqFilter.build(stages=["nope"])
    with pytest.raises(InvalidInput, match="--until"):
        DlqFilter.build(until="soon")
    with pytest.raises(InvalidInput, match="--since '1h' is not before --until '2h'"):
        DlqFilter.build(since="1h", until="2h", now=NOW)


# -- records -------------------------------------------------------------------------------------


def test_record_fields_come_from_the_error_headers() -> None:
    r = record()
    assert (r.position, r.stage, r.error_class, r.kind, r.attempts) == (
        "1:7",
        "parse",
        "PermanentError",
        "permanent",
        3,
    )
    assert r.message == "bad ünïcode"
    assert r.origin_topic == "p.documents.uploaded"
    assert r.summary()["correlation_id"] == "corr-1"


def test_poison_is_what_was_dead_lettered_as_poison_or_does_not_decode() -> None:
    codec = Codec()
    event = DocumentParsed(
        document_id="d",
        tenant_id="t",
        correlation_id="c",
        uploaded_at=NOW,
        parser="local",
        parser_version="1",
        source_sha256="a" * 64,
        content_sha256="b" * 64,
        page_count=1,
        char_count=10,
    )
    good = record(value=codec.encode(event))
    assert not is_poison(good, codec)
    assert decode_value(good, codec) == (event, None)
    assert is_poison(record(value=codec.encode(event), kind="poison"), codec)
    assert is_poison(record(value=b"\x00garbage"), codec)
    assert is_poison(record(value=None), codec)
    assert decode_value(record(value=b"\xc3\x01"), codec)[1] is not None
