"""Traces across stages: OpenTelemetry spans, linked from record to record by W3C trace context.

Off unless `observability.otlp_endpoint` is set. Off, no SDK tracer provider is installed, each
helper below returns at its first line, and ragstream writes no trace headers (a retry or
dead-letter copy keeps the headers its record came with, as it always has).

On (`configure()`, called by the entry point, as logging is configured there), spans go to the
OTLP/HTTP endpoint in batches:

    upload                      PRODUCER: `Uploader` publishing a document; the uploaded record
                                carries its context in `traceparent` (and `tracestate`)
    parse, chunk, embed, cost   CONSUMER: one per record per stage (or consumer), a child of
                                the context in the record's `traceparent`; a new trace when it
                                has none or one that does not parse. The stage's output, its
                                retry copy and its dead letter carry this span's context, so
                                the next stage, the next attempt and a redriven record go on in
                                the same trace, each a child of the span before.
    llamaparse job              CLIENT, children of the stage's span: a LlamaParse job from
    openai embeddings             upload to result, one embeddings request, the commit of a
    postgresql commit             micro-batch (a batch of several records: a child of its first
                                  record's span, linked to the others')

Attributes say where the record was (topic, partition, offset, group), which document, tenant
and correlation id it is about (ids belong in traces, unlike metric labels), the attempt and
the outcome; a call's ids and sizes. A failure is named by its class (`error.type`), never by
its message: error text may quote an upstream's secrets. Values from records are cut to
`MAX_VALUE` characters, and a `traceparent` that does not parse is ignored, never passed on.

Like the OpenTelemetry API's own global provider, the installed tracer is process-wide;
`install()` swaps it (tests install an SDK provider with an in-memory exporter).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import Token
from typing import TYPE_CHECKING, Any, Final, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ragstream.topology import H_ATTEMPT, H_CORRELATION_ID, H_TRACEPARENT, H_TRACESTATE

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from ragstream.settings import ObservabilitySettings

Headers = list[tuple[str, bytes]]
Attributes = Mapping[str, str | int | float | bool]

SERVICE_NAME: Final = "ragstream"
MAX_VALUE: Final = 256  # characters of a value taken from a record (ids, a correlation id)
FAILED: Final = frozenset({"retried", "dead-lettered", "poison"})
TRACE_HEADERS: Final = (H_TRACEPARENT, H_TRACESTATE)

_tracer: Tracer | None = None  # None: tracing is off
_propagator: Final = TraceContextTextMapPropagator()
_BATCH_LINKS: Final = otel_context.create_key("ragstream.batch-links")
_NOTHING: Final = nullcontext()


# -- setting up -----------------------------------------------------------------------------------


def configure(settings: ObservabilitySettings) -> TracerProvider | None:
    """Install an SDK tracer provider that exports to `settings.otlp_endpoint` (OTLP over
    HTTP, spans sent in batches from a thread of their own and flushed at exit); None, and
    nothing installed, when it is not set."""
    if not settings.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(settings.otlp_endpoint)))
    install(provider)
    return provider


def install(provider: trace.TracerProvider | None) -> None:
    """Trace with `provider` from now on; None turns tracing off."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer(SERVICE_NAME)


def enabled() -> bool:
    return _tracer is not None


# -- the carrier: Kafka headers, a list of (str, bytes) --------------------------------------------


class _Readable(Protocol):
    def __iter__(self) -> Iterator[tuple[str, bytes]]: ...


class HeaderGetter(Getter[_Readable]):
    """Reads trace context from Kafka headers. A value that is not ASCII is no value."""

    def get(self, carrier: _Readable, key: str) -> list[str] | None:
        values = []
        for k, v in carrier:
            if k == key:
                try:
                    values.append(bytes(v).decode("ascii"))
                except (UnicodeDecodeError, TypeError):
                    continue
        return values or None

    def keys(self, carrier: _Readable) -> list[str]:
        return [k for k, _ in carrier]


class HeaderSetter(Setter[Headers]):
    """Writes trace context to Kafka headers, replacing what the key held."""

    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value.encode("ascii")))


GETTER: Final = HeaderGetter()
SETTER: Final = HeaderSetter()


def extract(headers: Iterable[tuple[str, bytes]] | None) -> otel_context.Context:
    """The context a record's headers carry: its `traceparent` (and `tracestate`), or an empty
    context (a new trace) when it has none, more than one, or one that does not parse."""
    carrier = list(headers or ())
    if len(GETTER.get(carrier, H_TRACEPARENT) or ()) != 1:
        return otel_context.Context()
    return _propagator.extract(carrier, otel_context.Context(), GETTER)


def inject(headers: Headers) -> Headers:
    """`headers` with the current span's context in place of any trace headers they had (the
    same list, untouched, while tracing is off)."""
    if _tracer is None:
        return headers
    out = [(k, v) for k, v in headers if k not in TRACE_HEADERS]
    _propagator.inject(out, setter=SETTER)
    return out


# -- spans ------------------------------------------------------------------------------------------


def record_span(stage: str, group: str, record: Any) -> Span | None:
    """Start the span of one record's handling by `stage`, a child of the context its headers
    carry (None while tracing is off). End it with `active(span, end=True)` or `end()`."""
    if _tracer is None:
        return None
    headers = list(record.headers or ())
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": record.topic,
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
        "messaging.consumer.group.name": group,
        "ragstream.stage": stage,
    }
    attempt = (GETTER.get(headers, H_ATTEMPT) or ["1"])[0]
    attributes["ragstream.attempt"] = int(attempt) if attempt.isdigit() else 1
    if correlation := GETTER.get(headers, H_CORRELATION_ID):
        attributes["ragstream.correlation_id"] = correlation[0][:MAX_VALUE]
    return _tracer.start_span(
        stage, extract(headers), kind=SpanKind.CONSUMER, attributes=attributes
    )


def describe(span: Span | None, event: object) -> None:
    """Name the document a record's span is about, once its value has decoded."""
    if span is None:
        return
    for key in ("document_id", "tenant_id", "correlation_id"):
        value = getattr(event, key, None)
        if isinstance(value, str):
            span.set_attribute(f"ragstream.{key}", value[:MAX_VALUE])


def active(span: Span | None, *, end: bool = False) -> AbstractContextManager[Any]:
    """Make `span` the current span for the block (ending it after, with `end`); nothing for
    None."""
    if span is None:
        return _NOTHING
    return trace.use_span(
        span, end_on_exit=end, record_exception=False, set_status_on_exception=False
    )


def end(spans: Iterable[Span | None]) -> None:
    for span in spans:
        if span is not None:
            span.end()


def outcome(status: str, error: BaseException | None = None) -> None:
    """What became of the current record: `ok`, `retried`, `dead-lettered`, ... (the runtime's
    outcomes); with the error's class when it failed."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    span.set_attribute("ragstream.outcome", status)
    _failed(span, error, error_status=status in FAILED)


@contextmanager
def call(
    name: str, attributes: Attributes | None = None, *, batch: bool = False
) -> Iterator[Span | None]:
    """A CLIENT span around an external call, a child of the current span; none while tracing
    is off or outside a span. `batch`: the commit of a micro-batch (see `batch_parent`)."""
    if _tracer is None or not trace.get_current_span().get_span_context().is_valid:
        yield None
        return
    links = otel_context.get_value(_BATCH_LINKS) if batch else None
    links = links if isinstance(links, list) else None
    with _running(
        _tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes, links=links)
    ) as span:
        yield span


@contextmanager
def producing(name: str, attributes: Attributes | None = None) -> Iterator[Span | None]:
    """A PRODUCER span for a record ragstream publishes first (an upload): a child of the
    caller's current span if it has one, else a new trace."""
    if _tracer is None:
        yield None
        return
    with _running(_tracer.start_span(name, kind=SpanKind.PRODUCER, attributes=attributes)) as span:
        yield span


def batch_parent(spans: Sequence[Span | None]) -> Token[otel_context.Context] | None:
    """Make the first of a micro-batch's record spans current, with links to the others for
    the commit's span (`call(..., batch=True)`); a token for `detach`, None while off."""
    present = [s for s in spans if s is not None]
    if _tracer is None or not present:
        return None
    ctx = trace.set_span_in_context(present[0])
    others = [Link(s.get_span_context()) for s in present[1:]]
    return otel_context.attach(otel_context.set_value(_BATCH_LINKS, others, ctx))


def detach(token: Token[otel_context.Context] | None) -> None:
    if token is not None:
        otel_context.detach(token)


@contextmanager
def _running(span: Span) -> Iterator[Span]:
    """`span` current for the block and ended after it; an error escaping names its class."""
    with active(span, end=True):
        try:
            yield span
        except BaseException as exc:
            _failed(span, exc, error_status=isinstance(exc, Exception))
            raise


def _failed(span: Span, error: BaseException | None, *, error_status: bool) -> None:
    if error is None:
        return
    span.set_attribute("error.type", type(error).__name__)
    if error_status:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
