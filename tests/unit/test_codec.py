"""The codec: Avro single-object encoding, fingerprints, evolution, poison pills, encode errors."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

from ragstream.codec import HEADER_LEN, MAGIC, Codec, single_object_header
from ragstream.errors import ConfigError, DecodeError, PermanentError
from ragstream.events import (
    EVENT_TYPES,
    CircuitState,
    CircuitStateChanged,
    CostUsage,
    DocumentChunked,
    DocumentEmbedded,
    DocumentParsed,
    DocumentRef,
    DocumentUploaded,
    Event,
    ServiceMode,
    ServiceModeChanged,
    ThrottleEvent,
    ThrottleState,
    utc_now,
)
from ragstream.resources import schemas_dir
from ragstream.topology import H_CORRELATION_ID, H_EVENT_TYPE


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


# -- CRC-64-AVRO -------------------------------------------------------------------------------

# (schema, published canonical form, published fingerprint as Java's signed long), from
# apache/avro share/test/data/schema-tests.txt (cases 000, 002, 004, 006, 012, 014, 018, 020,
# 026, 027, 032, 033).
AVRO_TEST_VECTORS = [
    ('"null"', '"null"', 7195948357588979594),
    ('"boolean"', '"boolean"', -6970731678124411036),
    ('"int"', '"int"', 8247732601305521295),
    ('"long"', '"long"', -3434872931120570953),
    ('"bytes"', '"bytes"', 5746618253357095269),
    ('"string"', '"string"', -8142146995180207161),
    ('[ "int" , {"type":"boolean"} ]', '["int","boolean"]', 5392556393470105090),
    (
        '{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}',
        '{"name":"x.y.foo","type":"record","fields":[]}',
        5916914534497305771,
    ),
    (
        '{ "fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":true},'
        ' {"order":"descending","name":"f2","doc":"Hello","type":"int"}],'
        ' "type":"record", "name":"foo" }',
        '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},'
        '{"name":"f2","type":"int"}]}',
        -4860222112080293046,
    ),
    (
        '{"type":"enum", "name":"foo", "symbols":["A1"]}',
        '{"name":"foo","type":"enum","symbols":["A1"]}',
        -6342190197741309591,
    ),
    (
        '{ "values":"string", "type":"map"}',
        '{"type":"map","values":"string"}',
        -8732877298790414990,
    ),
    (
        '{"name":"PigValue","type":"record",'
        ' "fields":[{"name":"value", "type":["null", "int", "long", "PigValue"]}]}',
        '{"name":"PigValue","type":"record","fields":[{"name":"value",'
        '"type":["null","int","long","PigValue"]}]}',
        -1759257747318642341,
    ),
]

_EMPTY64 = 0xC15D213AA4D7A795
_MASK64 = (1 << 64) - 1


def _reference_crc64_avro(data: bytes) -> int:
    """The Avro specification's reference fingerprint64 ("Schema Fingerprints"), unsigned."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1) & _MASK64)
        table.append(fp)
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


@pytest.mark.parametrize(("schema", "canonical", "published"), AVRO_TEST_VECTORS)
def test_crc64_avro_matches_avro_test_vectors(schema: str, canonical: str, published: int) -> None:
    parsed = json.loads(schema)
    assert to_parsing_canonical_form(parsed) == canonical
    wire = published.to_bytes(8, "little", signed=True)  # Java: putLong on a LITTLE_ENDIAN buffer
    # fastavro spells the fingerprint as hex of its little-endian bytes, i.e. the wire order.
    assert fingerprint(canonical, "CRC-64-AVRO") == wire.hex()
    assert _reference_crc64_avro(canonical.encode()) == published & _MASK64
    assert single_object_header(parsed) == MAGIC + wire


def test_our_headers_match_the_reference_fingerprint(codec: Codec) -> None:
    for info in codec.schemas:
        expected = _reference_crc64_avro(info.canonical.encode())
        assert info.fingerprint == expected
        assert info.header == b"\xc3\x01" + expected.to_bytes(8, "little")


# -- round trips -------------------------------------------------------------------------------

T0 = datetime(2025, 3, 1, 12, 30, 45, 123000, tzinfo=UTC)
REF = DocumentRef(document_id="doc-1", tenant_id="acme", correlation_id="corr-1")


def sample_events() -> list[Event]:
    """One of every event type, every field set away from its default."""
    events: list[Event] = [
        DocumentUploaded(
            **REF,
            filename="report.pdf",
            content_type="application/pdf",
            size_bytes=1234,
            sha256="ab" * 32,
            source_uri="file:///blobs/ab/abab",
            content=b"%PDF-1.7\x00\xff",
            metadata={"source": "crm", "lang": "en"},
            force=True,
            source_system="crm",
        ),
        DocumentParsed(
            **REF,
            uploaded_at=T0,
            parser="local",
            parser_version="1.2.0",
            source_sha256="ab" * 32,
            content_sha256="cd" * 32,
            page_count=3,
            char_count=2**40,
            title="Quarterly report",
        ),
        DocumentChunked(
            **REF,
            uploaded_at=T0,
            chunker_version="md-1",
            content_sha256="cd" * 32,
            chunk_count=12,
            token_count=3456,
        ),
        DocumentEmbedded(
            **REF,
            uploaded_at=T0,
            chunker_version="md-1",
            embedder="openai",
            model="text-embedding-3-small",
            dimensions=1536,
            chunk_count=12,
            new_embeddings=7,
            cached_embeddings=5,
            token_count=3456,
        ),
        CircuitStateChanged(
            service="openai",
            worker_id="host-1:4242",
            host="host-1",
            pid=4242,
            client_id="embed-1",
            state=CircuitState.HALF_OPEN,
            since=T0,
        ),
        CostUsage(
            service="openai",
            operation="embeddings",
            model="text-embedding-3-small",
            unit="tokens",
            units=3456,
            unit_price_usd=Decimal("0.00000002"),
            cost_usd=Decimal("0.00006912"),
            tenant_id="acme",
            document_ids=["doc-1", "doc-2"],
            stage="embed",
            correlation_id="corr-1",
            request_id="req_123",
        ),
        ThrottleEvent(
            service="openai",
            tenant_id="acme",
            state=ThrottleState.THROTTLED,
            reason="daily spend $5.01 of $5.00",
            window="day",
            window_ends_at=T0 + timedelta(hours=11),
            spent_usd=Decimal("5.010000001"),
            budget_usd=Decimal("5"),
            requests=42,
            request_budget=100,
        ),
        ServiceModeChanged(
            service="llamaparse", mode=ServiceMode.HYBRID, reason="maintenance", requested_by="ops"
        ),
    ]
    assert {type(e) for e in events} == set(EVENT_TYPES.values())
    return events


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
def test_every_event_round_trips(codec: Codec, event: Event) -> None:
    data = codec.encode(event)
    newest = codec.newest(event.EVENT_TYPE)
    assert data[:HEADER_LEN] == b"\xc3\x01" + newest.fingerprint.to_bytes(8, "little")
    decoded = codec.decode(data)
    assert decoded == event
    assert type(decoded) is type(event)
    assert codec.event_type_of(data) == event.EVENT_TYPE
    assert codec.decode_record(data)[0] == event.EVENT_TYPE


def test_decoded_values_have_the_python_types(codec: Codec) -> None:
    throttle = next(e for e in sample_events() if isinstance(e, ThrottleEvent))
    decoded = codec.decode(codec.encode(throttle))
    assert isinstance(decoded, ThrottleEvent)
    assert isinstance(decoded.event_id, uuid.UUID)
    assert decoded.occurred_at.tzinfo is not None and decoded.occurred_at.utcoffset() == timedelta(
        0
    )
    assert type(decoded.state) is ThrottleState
    assert isinstance(decoded.spent_usd, Decimal) and decoded.spent_usd == Decimal("5.010000001")


def test_defaults_round_trip(codec: Codec) -> None:
    event = DocumentUploaded(
        **REF, filename="a.txt", content_type="text/plain", size_bytes=1, sha256="00", content=b"a"
    )
    assert codec.decode(codec.encode(event)) == event


def test_occurred_at_defaults_to_now_in_whole_milliseconds() -> None:
    before = datetime.now(UTC)
    event = ServiceModeChanged(service="openai", mode=ServiceMode.LOCAL)
    assert event.occurred_at.tzinfo is UTC
    assert event.occurred_at.microsecond % 1000 == 0
    assert before - timedelta(milliseconds=1) <= event.occurred_at <= datetime.now(UTC)
    assert utc_now().microsecond % 1000 == 0
    assert isinstance(event.event_id, uuid.UUID) and event.event_id.version == 4


def test_sub_millisecond_precision_is_dropped_on_the_wire(codec: Codec) -> None:
    event = ServiceModeChanged(service="openai", mode=ServiceMode.REAL, occurred_at=T0)
    precise = replace(event, occurred_at=T0 + timedelta(microseconds=999))
    assert codec.decode(codec.encode(precise)) == event


def test_headers(codec: Codec) -> None:
    uploaded, *_, cost, throttle, mode = sample_events()
    assert codec.headers_for(uploaded) == [
        (H_EVENT_TYPE, b"DocumentUploaded"),
        (H_CORRELATION_ID, b"corr-1"),
    ]
    assert codec.headers_for(cost) == [(H_EVENT_TYPE, b"CostUsage"), (H_CORRELATION_ID, b"corr-1")]
    assert isinstance(cost, CostUsage)
    assert codec.headers_for(replace(cost, correlation_id=None)) == [(H_EVENT_TYPE, b"CostUsage")]
    assert codec.headers_for(throttle) == [(H_EVENT_TYPE, b"ThrottleEvent")]
    assert codec.headers_for(mode) == [(H_EVENT_TYPE, b"ServiceModeChanged")]


# -- evolution ---------------------------------------------------------------------------------


def _uploaded_v1_record() -> dict[str, Any]:
    return {
        **REF,
        "event_id": uuid.uuid4(),
        "occurred_at": T0,
        "filename": "a.md",
        "content_type": "text/markdown",
        "size_bytes": 2,
        "sha256": "ef" * 32,
        "source_uri": None,
        "content": b"# A",
        "metadata": {"k": "v"},
    }


def test_v1_upload_decodes_as_the_newest_event(codec: Codec) -> None:
    record = _uploaded_v1_record()
    data = codec.encode_record("DocumentUploaded", record, version=1)
    assert codec.writer_schema_of(data).version == 1
    assert data[:HEADER_LEN] == codec.schema("DocumentUploaded", 1).header
    event = codec.decode(data)
    assert event == DocumentUploaded(**record, force=False, source_system=None)


def test_v2_upload_is_readable_by_a_v1_reader(codec: Codec) -> None:
    uploaded = sample_events()[0]
    name, record = codec.decode_record(codec.encode(uploaded), reader_version=1)
    assert name == "DocumentUploaded"
    assert set(record) == set(codec.schema("DocumentUploaded", 1).fields)
    assert record["filename"] == "report.pdf" and record["metadata"] == {
        "source": "crm",
        "lang": "en",
    }


def test_mutable_defaults_filled_by_resolution_are_not_shared(codec: Codec, tmp_path: Path) -> None:
    # A v2 that adds a map with a default {}: fastavro hands out the schema's own default object.
    for version, extra in (
        (1, []),
        (2, [{"name": "tags", "type": {"type": "map", "values": "string"}, "default": {}}]),
    ):
        schema = {
            "type": "record",
            "name": "Probe",
            "namespace": "ragstream.events",
            "doc": "probe",
            "fields": [{"name": "a", "type": "string"}, *extra],
        }
        (tmp_path / f"Probe.v{version}.avsc").write_text(json.dumps(schema))
    probe = Codec(tmp_path, event_types={})
    data = probe.encode_record("Probe", {"a": "x"}, version=1)
    first, second = probe.decode_record(data)[1], probe.decode_record(data)[1]
    first["tags"]["mutated"] = "yes"
    assert second["tags"] == {} and probe.decode_record(data)[1]["tags"] == {}
    assert probe.newest("Probe").raw["fields"][1]["default"] == {}


# -- poison pills ------------------------------------------------------------------------------


def _valid(codec: Codec) -> bytes:
    return codec.encode(sample_events()[0])


POISON: dict[str, tuple[Callable[[Codec], bytes], str]] = {
    "empty": (lambda c: b"", "empty"),
    "one byte": (lambda c: b"\xc3", "too short"),
    "header only, short": (lambda c: _valid(c)[:9], "too short"),
    "json": (lambda c: b'{"document_id": "x", "tenant_id": "y"}', "magic C3 01, got 7B 22"),
    "confluent framing": (lambda c: b"\x00\x00\x00\x00\x01" + _valid(c)[10:], "got 00 00"),
    "unknown fingerprint": (
        lambda c: MAGIC + bytes.fromhex("0102030405060708") + _valid(c)[10:],
        "unknown schema fingerprint 0x0807060504030201 (not one of ",
    ),
    "header, no body": (
        lambda c: _valid(c)[:HEADER_LEN],
        "corrupt DocumentUploaded v2 body (0 bytes)",
    ),
    "truncated body": (lambda c: _valid(c)[:-3], "corrupt DocumentUploaded v2 body"),
    "trailing garbage": (lambda c: _valid(c) + b"\x00junk", "5 trailing bytes"),
    "magic + garbage body": (
        lambda c: _valid(c)[:HEADER_LEN] + b"\xff" * 40,
        "corrupt DocumentUploaded v2 body",
    ),
}


@pytest.mark.parametrize("case", list(POISON))
def test_poison_pills_raise_decode_error(codec: Codec, case: str) -> None:
    make, message = POISON[case]
    data = make(codec)
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert message in str(info.value)
    with pytest.raises(DecodeError):
        codec.decode_record(data)


def test_random_bytes_and_mutations_only_ever_raise_decode_error(codec: Codec) -> None:
    rng = random.Random(20250301)
    good = [codec.encode(e) for e in sample_events()]
    for _ in range(3000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        with pytest.raises(DecodeError):
            codec.decode(data)
    decoded = 0
    for _ in range(3000):
        buf = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(HEADER_LEN, len(buf))] = rng.randrange(256)
        try:
            assert isinstance(codec.decode(bytes(buf)), Event)
            decoded += 1  # a byte flipped inside a string can still be a valid record
        except DecodeError:
            pass
    assert decoded < 3000
    for data in good:
        for n in range(len(data)):
            with pytest.raises(DecodeError):
                codec.decode(data[:n])


def test_event_type_of_reads_only_the_header(codec: Codec) -> None:
    data = _valid(codec)
    assert codec.event_type_of(data[:HEADER_LEN]) == "DocumentUploaded"
    with pytest.raises(DecodeError, match="magic"):
        codec.event_type_of(b"\x00" * 20)


# -- encode errors -----------------------------------------------------------------------------


def _bad(codec: Codec, **changes: Any) -> str:
    record = {**_uploaded_v1_record(), "force": False, "source_system": None, **changes}
    with pytest.raises(PermanentError) as info:
        codec.encode_record("DocumentUploaded", record)
    assert not isinstance(info.value, DecodeError)
    return str(info.value)


def test_encoding_a_record_that_does_not_fit_names_the_field(codec: Codec) -> None:
    assert "size_bytes" in _bad(codec, size_bytes="big")
    assert "metadata" in _bad(codec, metadata={"k": 1})
    assert "filename" in _bad(codec, filename=None)
    assert "event_id" in _bad(codec, event_id="not-a-uuid")
    assert "occurred_at" in _bad(codec, occurred_at=datetime(2025, 1, 1))  # naive
    assert "no field colour" in _bad(codec, colour="red")
    record = _uploaded_v1_record()
    del record["sha256"]
    with pytest.raises(PermanentError, match="missing required field sha256"):
        codec.encode_record("DocumentUploaded", record)


def test_encoding_a_decimal_that_does_not_fit(codec: Codec) -> None:
    cost = next(e for e in sample_events() if isinstance(e, CostUsage))
    with pytest.raises(PermanentError, match=r"cost_usd.*more than 9 decimal places"):
        codec.encode(replace(cost, cost_usd=Decimal("0.0000000001")))
    with pytest.raises(PermanentError, match=r"unit_price_usd.*out of range"):
        codec.encode(replace(cost, unit_price_usd=Decimal("1e9")))
    with pytest.raises(PermanentError, match="cost_usd"):
        codec.encode(replace(cost, cost_usd=Decimal("NaN")))


def test_encoding_a_wrong_enum_names_the_field(codec: Codec) -> None:
    mode = ServiceModeChanged(service="openai", mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(PermanentError, match="mode"):
        codec.encode(mode)


def test_unknown_record_or_version(codec: Codec) -> None:
    with pytest.raises(PermanentError, match="no schema for record 'Nope'"):
        codec.encode_record("Nope", {})
    with pytest.raises(PermanentError, match=r"versions 1\.\.2, not 3"):
        codec.encode_record("DocumentUploaded", _uploaded_v1_record(), version=3)


# -- loading -----------------------------------------------------------------------------------


def _copy_schemas(tmp_path: Path) -> Path:
    for path in schemas_dir().glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    return tmp_path


def test_codec_refuses_a_misnamed_file(tmp_path: Path) -> None:
    directory = _copy_schemas(tmp_path)
    (directory / "DocumentParsed.v1.avsc").rename(directory / "document-parsed.avsc")
    with pytest.raises(ConfigError, match=r"<RecordName>\.v<N>\.avsc"):
        Codec(directory)


def test_codec_refuses_a_version_gap_and_a_missing_event_schema(tmp_path: Path) -> None:
    directory = _copy_schemas(tmp_path)
    (directory / "DocumentUploaded.v2.avsc").rename(directory / "DocumentUploaded.v3.avsc")
    with pytest.raises(ConfigError, match="without gaps"):
        Codec(directory)
    (directory / "DocumentUploaded.v3.avsc").unlink()
    (directory / "DocumentUploaded.v1.avsc").unlink()
    with pytest.raises(ConfigError, match="DocumentUploaded has no schema"):
        Codec(directory)


def test_codec_refuses_a_dataclass_that_drifted_from_its_schema(tmp_path: Path) -> None:
    directory = _copy_schemas(tmp_path)
    path = directory / "DocumentUploaded.v2.avsc"
    schema = json.loads(path.read_text())
    schema["fields"].append({"name": "priority", "type": "int", "default": 0})
    path.write_text(json.dumps(schema))
    with pytest.raises(ConfigError, match="DocumentUploaded fields"):
        Codec(directory)


def test_codec_refuses_a_record_named_unlike_its_file(tmp_path: Path) -> None:
    directory = _copy_schemas(tmp_path)
    path = directory / "DocumentChunked.v1.avsc"
    path.write_text(path.read_text().replace('"ragstream.events"', '"other.events"'))
    with pytest.raises(ConfigError, match="namespace"):
        Codec(directory)
