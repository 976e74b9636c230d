"""The trace-context carrier over Kafka headers, and the span helpers on their own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ragstream import tracing
from ragstream.settings import ObservabilitySettings
from ragstream.topology import H_ATTEMPT, H_CORRELATION_ID, H_TRACEPARENT, H_TRACESTATE

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()


def record(headers: list[tuple[str, bytes]]) -> SimpleNamespace:
    return SimpleNamespace(topic="t.documents.parsed", partition=3, offset=42, headers=headers)


def test_the_getter_reads_every_value_of_a_key_and_skips_what_is_not_ascii() -> None:
    headers = [("a", b"1"), ("b", b"2"), ("a", b"\xff\xfe"), ("a", b"3")]
    assert tracing.GETTER.get(headers, "a") == ["1", "3"]
    assert tracing.GETTER.get(headers, "c") is None
    assert tracing.GETTER.keys(headers) == ["a", "b", "a", "a"]


def test_the_setter_replaces_what_the_key_held_and_keeps_the_rest() -> None:
    headers = [("traceparent", b"old"), ("ragstream.event-type", b"X"), ("traceparent", b"x")]
    tracing.SETTER.set(headers, "traceparent", "new")
    assert headers == [("ragstream.event-type", b"X"), ("traceparent", b"new")]


def test_a_valid_traceparent_is_the_parent_context() -> None:
    ctx = tracing.extract([(H_TRACEPARENT, TRACEPARENT), (H_TRACESTATE, b"vendor=v1")])
    parent = trace.get_current_span(ctx).get_span_context()
    assert parent.is_valid and parent.is_remote
    assert f"{parent.trace_id:032x}" == TRACE_ID and f"{parent.span_id:016x}" == PARENT_ID
    assert parent.trace_state.get("vendor") == "v1"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(H_TRACEPARENT, b"")],
        [(H_TRACEPARENT, b"garbage")],
        [(H_TRACEPARENT, b"00-" + b"z" * 32 + b"-" + PARENT_ID.encode() + b"-01")],
        [(H_TRACEPARENT, b"00-" + b"0" * 32 + b"-" + PARENT_ID.encode() + b"-01")],  # zero id
        [(H_TRACEPARENT, b"00-" + TRACE_ID.encode() + b"-" + b"0" * 16 + b"-01")],
        [(H_TRACEPARENT, b"ff-" + TRACE_ID.encode() + b"-" + PARENT_ID.encode() + b"-01")],
        [(H_TRACEPARENT, TRACEPARENT + b"-extra")],  # version 00 has nothing after the flags
        [(H_TRACEPARENT, TRACEPARENT.upper())],
        [(H_TRACEPARENT, "00-ä".encode() + TRACEPARENT[4:])],  # not ASCII
        [(H_TRACEPARENT, b"\x00" * 10_000)],
        [(H_TRACEPARENT, TRACEPARENT + b" " * 600)],  # over the 512-character limit
        [(H_TRACEPARENT, TRACEPARENT), (H_TRACEPARENT, TRACEPARENT)],  # two of them
    ],
    ids=[
        "none",
        "empty",
        "garbage",
        "not hex",
        "zero trace id",
        "zero parent id",
        "version ff",
        "trailing data",
        "upper case",
        "not ascii",
        "huge",
        "too long",
        "twice",
    ],
)
def test_a_missing_or_malformed_traceparent_is_no_parent(headers: list[tuple[str, bytes]]) -> None:
    ctx = tracing.extract(headers)
    assert not trace.get_current_span(ctx).get_span_context().is_valid


def test_off_nothing_is_made_and_headers_are_left_as_they_are() -> None:
    assert not tracing.enabled()
    headers = [("ragstream.event-type", b"X"), (H_TRACEPARENT, b"garbage")]
    assert tracing.inject(headers) is headers
    assert tracing.record_span("parse", "g", record(headers)) is None
    with tracing.call("openai embeddings") as span:
        assert span is None
    with tracing.producing("upload") as span:
        assert span is None
    assert tracing.batch_parent([None]) is None
    assert tracing.configure(ObservabilitySettings()) is None
    assert not tracing.enabled()


def test_a_record_span_continues_the_trace_and_outputs_carry_it(
    span_exporter: InMemorySpanExporter,
) -> None:
    incoming = [
        ("ragstream.event-type", b"DocumentParsed"),
        (H_CORRELATION_ID, b"corr-1"),
        (H_ATTEMPT, b"2"),
        (H_TRACEPARENT, TRACEPARENT),
        (H_TRACESTATE, b"vendor=v1"),
    ]
    span = tracing.record_span("chunk", "p-chunk", record(incoming))
    assert span is not None
    tracing.describe(span, SimpleNamespace(document_id="d" * 1000, tenant_id="acme"))
    with tracing.active(span, end=True):
        tracing.outcome("retried", ValueError("secret sk-123 in the message"))
        out = tracing.inject(list(incoming))
    (done,) = span_exporter.get_finished_spans()
    assert done.name == "chunk" and done.kind is SpanKind.CONSUMER
    assert done.parent is not None and f"{done.parent.span_id:016x}" == PARENT_ID
    assert f"{done.context.trace_id:032x}" == TRACE_ID
    attributes = dict(done.attributes or {})
    assert attributes["messaging.destination.name"] == "t.documents.parsed"
    assert attributes["messaging.destination.partition.id"] == "3"
    assert attributes["messaging.kafka.offset"] == 42
    assert attributes["messaging.consumer.group.name"] == "p-chunk"
    assert attributes["ragstream.attempt"] == 2
    assert attributes["ragstream.correlation_id"] == "corr-1"
    assert attributes["ragstream.tenant_id"] == "acme"
    assert attributes["ragstream.document_id"] == "d" * tracing.MAX_VALUE
    assert attributes["ragstream.outcome"] == "retried"
    assert attributes["error.type"] == "ValueError"
    assert done.status.status_code is StatusCode.ERROR
    assert "sk-123" not in repr(done.to_json())  # the class, never the message
    # Out: the same headers but the trace context, which is now this span's.
    assert [k for k, _ in out if k not in tracing.TRACE_HEADERS] == [
        "ragstream.event-type",
        H_CORRELATION_ID,
        H_ATTEMPT,
    ]
    (parent,) = [v for k, v in out if k == H_TRACEPARENT]
    assert parent == f"00-{TRACE_ID}-{done.context.span_id:016x}-01".encode()
    assert [v for k, v in out if k == H_TRACESTATE] == [b"vendor=v1"]


def test_a_garbage_traceparent_starts_a_new_trace_and_is_not_passed_on(
    span_exporter: InMemorySpanExporter,
) -> None:
    incoming = [(H_TRACEPARENT, b"00-not-a-trace"), (H_TRACESTATE, b"x=y")]
    span = tracing.record_span("parse", "p-parse", record(incoming))
    with tracing.active(span, end=True):
        out = tracing.inject(list(incoming))
    (done,) = span_exporter.get_finished_spans()
    assert done.parent is None
    ids = done.context
    expected = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"
    assert out == [(H_TRACEPARENT, expected.encode())]


def test_calls_are_children_of_the_current_span_and_need_one(
    span_exporter: InMemorySpanExporter,
) -> None:
    with tracing.call("openai embeddings") as orphan:
        assert orphan is None  # outside a record's span: no root span of its own
    span = tracing.record_span("embed", "p-embed", record([]))
    with tracing.active(span, end=True), pytest.raises(RuntimeError):
        with tracing.call("openai embeddings", {"ragstream.inputs": 3}):
            raise RuntimeError("HTTP 500: key sk-123")
    call, stage = span_exporter.get_finished_spans()
    assert call.kind is SpanKind.CLIENT and call.parent == stage.context
    assert (call.attributes or {})["error.type"] == "RuntimeError"
    assert "sk-123" not in repr(call.to_json())


def test_a_batch_commit_is_a_child_of_the_first_record_linked_to_the_others(
    span_exporter: InMemorySpanExporter,
) -> None:
    spans = [tracing.record_span("chunk", "g", record([])) for _ in range(3)]
    token = tracing.batch_parent([*spans, None])
    try:
        with tracing.call("postgresql commit", batch=True):
            pass
        with tracing.call("openai embeddings"):
            pass  # not a commit: no links
    finally:
        tracing.detach(token)
    assert not trace.get_current_span().get_span_context().is_valid
    tracing.end(spans)
    commit, other = span_exporter.get_finished_spans()[:2]
    assert spans[0] is not None and commit.parent == spans[0].get_span_context()
    linked = [link.context for link in commit.links]
    assert linked == [s.get_span_context() for s in spans[1:] if s is not None]
    assert not other.links
