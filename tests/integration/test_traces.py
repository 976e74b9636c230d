"""Traces across stages: one trace from upload to embedded, through a retry, with the real
LlamaParse and OpenAI clients (against the local servers that speak their APIs), the real
broker and PostgreSQL, spans kept in memory; and a hostile `traceparent` ignored."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from producers.upload import Uploader
from ragstream import tracing
from ragstream.admin import ensure_topics
from ragstream.codec import Codec
from ragstream.events import DocumentUploaded
from ragstream.settings import ObservabilitySettings, Settings
from ragstream.store import Store
from ragstream.topology import H_TRACEPARENT, H_TRACESTATE, Stage, Topology
from tests.integration.pipeline_helpers import read_topic, wait_until, workers
from tests.integration.test_failures import fast_retries, wait_status
from tests.integration.test_llamaparse_provider import llamaparse_settings
from tests.integration.test_services_pipeline import real_openai
from tests.servers import BackgroundServer
from tests.servers.llamaparse_server import LlamaParseServer
from tests.servers.openai_server import Fault, OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ("parse", "chunk", "embed")


def real_services(settings: Settings, parser: LlamaParseServer, embedder: OpenAIServer) -> Settings:
    settings = fast_retries(real_openai(settings, embedder))
    llamaparse = llamaparse_settings(parser, poll_interval_s=0.05)
    services = settings.services.model_copy(update={"llamaparse": llamaparse})
    return settings.model_copy(update={"services": services})


def about(spans: tuple[ReadableSpan, ...], document_id: str) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get("ragstream.document_id") == document_id]


def stage_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name in STAGES), key=lambda s: s.start_time or 0)


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def traceparent_of(span: ReadableSpan) -> bytes:
    c = span.context
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{c.trace_flags:02x}".encode()


async def test_one_trace_from_upload_to_embedded_through_a_retry(
    settings: Settings, span_exporter: InMemorySpanExporter
) -> None:
    with LlamaParseServer(job_duration_s=0.2) as parser, OpenAIServer() as embedder:
        settings = real_services(settings, parser, embedder)
        embedder.inject(Fault.http(500))  # the first embeddings request fails: one retry
        await ensure_topics(settings)
        async with (
            workers(settings, list(Stage), concurrency=1, accountant=True),  # micro-batches
            Uploader(settings) as up,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            receipt = await up.upload_bytes(
                b"# Traced\n\nA document followed from upload to embedded.\n\n## Part two\n\n"
                b"Its second section, with a few more words.",
                "traced.md",
                tenant_id="traces",
            )
            doc = receipt.document_id
            assert await wait_status(store, doc, {"embedded", "dead-lettered"}) == "embedded"

            def embedded_twice() -> bool:
                done = [
                    s for s in about(span_exporter.get_finished_spans(), doc) if s.name == "embed"
                ]
                return len(done) == 2 and any(
                    (s.attributes or {}).get("ragstream.outcome") == "ok" for s in done
                )

            await wait_until(embedded_twice, 20, "the second embed span to end")
            await wait_until(
                lambda: sum(s.name == "cost" for s in span_exporter.get_finished_spans()) >= 2,
                20,
                "the cost accountant's spans of the two paid calls",
            )
            embedded = [
                d
                for d in await read_topic(settings, Topology(settings.kafka.topic_prefix).embedded)
                if d.document_id == doc
            ]
    spans = span_exporter.get_finished_spans()
    (upload,) = [s for s in spans if s.name == "upload"]
    assert upload.kind is SpanKind.PRODUCER and upload.parent is None
    trace_id = upload.context.trace_id

    # Every span about the document, and every span under them, is in the upload's trace.
    mine = about(spans, doc)
    assert {s.name for s in mine} == {"upload", *STAGES}
    assert {s.context.trace_id for s in mine} == {trace_id}
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    assert {s.name for s in in_trace} >= {
        "upload",
        *STAGES,
        "llamaparse job",
        "openai embeddings",
        "postgresql commit",
        "cost",
    }

    # The stages chain parent -> child in order; the retried attempt is a child of the first.
    parse, chunk, embed1, embed2 = stage_spans(mine)
    assert [s.name for s in (parse, chunk, embed1, embed2)] == ["parse", "chunk", "embed", "embed"]
    assert parse.parent is not None and parse.parent.span_id == upload.context.span_id
    assert chunk.parent is not None and chunk.parent.span_id == parse.context.span_id
    assert embed1.parent is not None and embed1.parent.span_id == chunk.context.span_id
    assert embed2.parent is not None and embed2.parent.span_id == embed1.context.span_id
    for span in (parse, chunk, embed1, embed2):
        assert span.kind is SpanKind.CONSUMER
        assert (span.attributes or {})["ragstream.tenant_id"] == "traces"
        assert (span.attributes or {})["ragstream.correlation_id"] == receipt.correlation_id
    first, second = dict(embed1.attributes or {}), dict(embed2.attributes or {})
    assert (first["ragstream.attempt"], first["ragstream.outcome"]) == (1, "retried")
    assert first["error.type"] == "RetryableError" and embed1.status.status_code is StatusCode.ERROR
    assert (second["ragstream.attempt"], second["ragstream.outcome"]) == (2, "ok")
    assert first["messaging.destination.name"] == Topology(settings.kafka.topic_prefix).chunked
    assert second["messaging.destination.name"] == Topology(settings.kafka.topic_prefix).retry(
        "embed"
    )

    # External calls are children of their stage's span.
    assert [s.name for s in children(spans, parse) if s.name == "llamaparse job"] == [
        "llamaparse job"
    ]
    (job,) = [s for s in children(spans, parse) if s.name == "llamaparse job"]
    assert job.kind is SpanKind.CLIENT and (job.attributes or {})["llamaparse.job_id"]
    (failed,) = [s for s in children(spans, embed1) if s.name == "openai embeddings"]
    assert (failed.attributes or {})["error.type"] == "RetryableError"
    (request,) = [s for s in children(spans, embed2) if s.name == "openai embeddings"]
    assert "error.type" not in (request.attributes or {})
    for stage in (parse, chunk):  # a micro-batch of one: its commit under its record's span
        assert "postgresql commit" in [s.name for s in children(spans, stage)]
    # The cost accountant's span of each paid call is a child of the stage that paid.
    payers = {s.parent.span_id for s in in_trace if s.name == "cost" and s.parent is not None}
    assert payers == {parse.context.span_id, embed2.context.span_id}

    # The embedded record carries the last span's context, for whoever reads it next.
    (out,) = embedded
    assert out.headers[H_TRACEPARENT] == traceparent_of(embed2)


async def test_a_hostile_traceparent_is_ignored_and_a_new_trace_begins(
    settings: Settings, span_exporter: InMemorySpanExporter
) -> None:
    codec = Codec()
    content = b"# Hostile\n\nAn outside publisher set a traceparent that is not one."
    event = DocumentUploaded(
        document_id=str(uuid.uuid4()),
        tenant_id="traces",
        correlation_id=str(uuid.uuid4()),
        filename="hostile.md",
        content_type="text/markdown",
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        content=content,
        source_system="elsewhere",
    )
    garbage = b"00-" + b"\xff" * 32 + b"-zzzz-01; DROP TABLE documents" + b"x" * 4000
    headers = [*codec.headers_for(event), (H_TRACEPARENT, garbage), (H_TRACESTATE, b"\x00" * 600)]
    topology = Topology(settings.kafka.topic_prefix)
    await ensure_topics(settings)
    async with (
        workers(settings, list(Stage), concurrency=1),
        await Store.connect(settings.postgres.dsn()) as store,
    ):
        producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                topology.uploaded,
                codec.encode(event),
                key=event.document_id.encode(),
                headers=headers,
            )
        finally:
            await producer.stop()
        assert await wait_status(store, event.document_id, {"embedded"}) == "embedded"
        await wait_until(
            lambda: (
                len(stage_spans(about(span_exporter.get_finished_spans(), event.document_id))) == 3
            ),
            20,
            "the three stage spans",
        )
        parsed = [
            d
            for d in await read_topic(settings, topology.parsed)
            if d.document_id == event.document_id
        ]
    parse, chunk, embed = stage_spans(about(span_exporter.get_finished_spans(), event.document_id))
    assert parse.parent is None  # a new trace: nothing of the garbage was taken
    assert {s.context.trace_id for s in (parse, chunk, embed)} == {parse.context.trace_id}
    assert chunk.parent is not None and chunk.parent.span_id == parse.context.span_id
    assert embed.parent is not None and embed.parent.span_id == chunk.context.span_id
    (out,) = parsed  # the garbage is not passed on: the output carries the parse span's context
    assert out.headers[H_TRACEPARENT] == traceparent_of(parse)
    assert H_TRACESTATE not in out.headers


class Collector(BackgroundServer):
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf, spans kept by name."""

    def __init__(self) -> None:
        super().__init__(Starlette(routes=[Route("/v1/traces", self._receive, methods=["POST"])]))
        self.received: list[tuple[str, dict[str, str]]] = []  # (span name, resource attributes)

    async def _receive(self, request: Request) -> Response:
        export = ExportTraceServiceRequest.FromString(await request.body())
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.received += [(span.name, resource) for span in scope.spans]
        return Response(ExportTraceServiceResponse().SerializeToString())


def test_configured_spans_are_exported_by_otlp_over_http() -> None:
    with Collector() as collector:
        observability = ObservabilitySettings(otlp_endpoint=f"{collector.url}/v1/traces")
        provider = tracing.configure(observability)
        assert provider is not None and tracing.enabled()
        try:
            with tracing.producing("upload"):
                pass
        finally:
            tracing.install(None)
            provider.shutdown()  # flushes the batch
        assert collector.received == [("upload", collector.received[0][1])]
        assert collector.received[0][1]["service.name"] == "ragstream"
