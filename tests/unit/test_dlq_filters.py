"""The DLQ tools' pure parts: operator input, filters, header handling, poison detection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ragstream.codec import Codec
from ragstream.dlq import (
    DlqFilter,
    DlqRecord,
    decode_value,
    is_poison,
)
from ragstream.events import DocumentParsed
from ragstream.operator_input import InvalidInput
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
