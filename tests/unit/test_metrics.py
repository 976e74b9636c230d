"""Metrics, the health server and log redaction, without a broker or database."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

import prometheus_client
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from ragstream.errors import InfrastructureError
from ragstream.events import DocumentEmbedded, ThrottleState, utc_now
from ragstream.health import HealthServer, database_ready, readiness
from ragstream.logs import configure_logging
from ragstream.metrics import CONTENT_TYPE, Metrics, observe_lag
from ragstream.scrub import secret_values
from ragstream.settings import load_settings

# family → (type, label names); counters are named without `_total` by the parser.
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "ragstream_build_info": ("gauge", {"version"}),
    "ragstream_records": ("counter", {"stage", "outcome"}),
    "ragstream_stage_duration_seconds": ("histogram", {"stage"}),
    "ragstream_upload_to_embedded_seconds": ("histogram", set()),
    "ragstream_inflight_records": ("gauge", {"stage"}),
    "ragstream_consumer_lag": ("gauge", {"stage", "topic", "partition"}),
    "ragstream_retries": ("counter", {"stage", "error_class"}),
    "ragstream_dead_letters": ("counter", {"stage", "error_class"}),
    "ragstream_external_calls": ("counter", {"service", "operation", "status"}),
    "ragstream_external_call_duration_seconds": ("histogram", {"service", "operation"}),
    "ragstream_circuit_state": ("gauge", {"service"}),
    "ragstream_usage_units": ("counter", {"service", "unit"}),
    "ragstream_spend_usd": ("counter", {"service"}),
    "ragstream_throttle_state": ("gauge", {"service"}),
    "ragstream_service_mode": ("gauge", {"service", "mode"}),
    "ragstream_budget_usd": ("gauge", {"service", "window"}),
    "ragstream_budget_spent_usd": ("gauge", {"service", "window"}),
    "ragstream_assigned_partitions": ("gauge", {"stage"}),
    "ragstream_worker_up": ("gauge", {"stage"}),
    "ragstream_dependency_up": ("gauge", {"dependency"}),
    "ragstream_consumer_restarts": ("counter", {"stage"}),
    "ragstream_stage_paused": ("gauge", {"stage"}),
    "ragstream_batch_records": ("histogram", {"stage"}),
}


def exercise(metrics: Metrics) -> None:
    """Call every method once or more, as the runtime would."""
    metrics.set_member("embed", 2)
    metrics.set_stage_paused("embed", True)
    metrics.set_dependency_up("postgres", False)
    metrics.record_restart("embed")
    metrics.record_handled("embed", "ok", 0.25)
    metrics.record_batch("embed", 7)
    metrics.record_handled("embed", "ok", 0.5)
    metrics.record_handled("parse", "dead-lettered", 3.0)
    uploaded = utc_now()
    metrics.record_embedded(embedded_event(uploaded, uploaded + timedelta(seconds=42)))
    metrics.record_pipeline_latency(7.5)
    metrics.set_lag("embed", "ragstream.documents.chunked", 0, 17)
    metrics.set_lag("embed", "ragstream.documents.chunked", 1, 0)
    with metrics.inflight("embed"):
        pass
    metrics.record_retry("embed", "RetryableError")
    metrics.record_dead_letter("parse", "PermanentError")
    metrics.record_external_call("openai", "embeddings", "ok", 0.3)
    with pytest.raises(TimeoutError), metrics.external_call("openai", "embeddings"):
        raise TimeoutError
    metrics.set_circuit_state("openai", "half_open")
    metrics.record_usage("openai", "tokens", 1200, Decimal("0.000024"))
    metrics.set_throttle("openai", ThrottleState.WARNING)
    metrics.set_mode("openai", "hybrid")
    metrics.set_budget("openai", "daily", Decimal("5.00"), Decimal("4.10"))


def embedded_event(uploaded_at: Any, occurred_at: Any) -> DocumentEmbedded:
    return DocumentEmbedded(
        document_id="doc-1",
        tenant_id="acme",
        correlation_id="corr-1",
        occurred_at=occurred_at,
        uploaded_at=uploaded_at,
        chunker_version="v1",
        embedder="local",
        model="local-hash",
        dimensions=8,
        chunk_count=1,
        new_embeddings=1,
        cached_embeddings=0,
        token_count=3,
    )


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


# -- metrics ----------------------------------------------------------------------------------


def test_nothing_is_registered_at_import_and_instances_are_independent() -> None:
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not [n for n in names if n.startswith("ragstream")]
    first, second = Metrics(), Metrics()  # a shared registry would raise "Duplicated timeseries"
    first.record_handled("parse", "ok", 0.1)
    assert value(first, "ragstream_records_total", stage="parse", outcome="ok") == 1
    assert value(second, "ragstream_records_total", stage="parse", outcome="ok") is None


def test_every_method_exposes_its_family_with_type_and_labels() -> None:
    metrics = Metrics()
    exercise(metrics)
    text = metrics.exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name: f for name, f in families.items() if name.startswith("ragstream_")}
    assert set(ours) == set(EXPECTED)
    for name, (kind, labels) in EXPECTED.items():
        family = ours[name]
        assert family.type == kind, name
        assert family.samples, f"{name} exposes no sample after every method was called"
        seen = {k for s in family.samples for k in s.labels if k != "le"}
        assert seen == labels, name
    assert "_created" not in text  # creation-time series are left out
    assert "process_resident_memory_bytes" in families or "python_info" in families


def test_values_after_every_method() -> None:
    metrics = Metrics()
    exercise(metrics)
    v = samples(metrics)

    def get(name: str, **labels: str) -> float:
        return v[(name, frozenset(labels.items()))]

    assert get("ragstream_records_total", stage="embed", outcome="ok") == 2
    for outcome in ("dead-lettered", "retried", "waiting", "poison"):  # shown from the start
        assert get("ragstream_records_total", stage="embed", outcome=outcome) == 0
    assert (
        "ragstream_records_total",
        frozenset({("stage", "embed"), ("outcome", "failed")}),
    ) not in v
    assert get("ragstream_stage_duration_seconds_count", stage="embed") == 2
    assert get("ragstream_stage_duration_seconds_sum", stage="embed") == 0.75
    assert get("ragstream_upload_to_embedded_seconds_count") == 2
    assert get("ragstream_upload_to_embedded_seconds_sum") == pytest.approx(49.5)
    assert get("ragstream_upload_to_embedded_seconds_bucket", le="60.0") == 2
    assert get("ragstream_upload_to_embedded_seconds_bucket", le="30.0") == 1
    assert get(
        "ragstream_consumer_lag", stage="embed", topic="ragstream.documents.chunked", partition="0"
    ) == (17)
    assert get("ragstream_inflight_records", stage="embed") == 0
    assert get("ragstream_retries_total", stage="embed", error_class="RetryableError") == 1
    assert get("ragstream_dead_letters_total", stage="parse", error_class="PermanentError") == 1
    calls = {"service": "openai", "operation": "embeddings"}
    assert get("ragstream_external_calls_total", **calls, status="ok") == 1
    assert get("ragstream_external_calls_total", **calls, status="TimeoutError") == 1
    assert get("ragstream_external_call_duration_seconds_count", **calls) == 2
    assert get("ragstream_circuit_state", service="openai") == 1
    assert get("ragstream_usage_units_total", service="openai", unit="tokens") == 1200
    assert get("ragstream_spend_usd_total", service="openai") == pytest.approx(0.000024)
    assert get("ragstream_throttle_state", service="openai") == 1
    assert get("ragstream_budget_usd", service="openai", window="daily") == 5
    assert get("ragstream_budget_spent_usd", service="openai", window="daily") == pytest.approx(4.1)
    assert get("ragstream_assigned_partitions", stage="embed") == 2
    assert get("ragstream_worker_up", stage="embed") == 1
    assert get("ragstream_batch_records_bucket", stage="embed", le="10.0") == 1
    assert get("ragstream_batch_records_bucket", stage="embed", le="5.0") == 0


def test_inflight_counts_while_inside_even_when_it_raises() -> None:
    metrics = Metrics()
    with metrics.inflight("chunk"), metrics.inflight("chunk"):
        assert value(metrics, "ragstream_inflight_records", stage="chunk") == 2
    with pytest.raises(RuntimeError), metrics.inflight("chunk"):
        raise RuntimeError
    assert value(metrics, "ragstream_inflight_records", stage="chunk") == 0


def test_lag_is_dropped_for_revoked_partitions_and_when_the_stage_stops() -> None:
    metrics = Metrics()

    @dataclass(frozen=True)
    class TP:
        topic: str
        partition: int

    for p in range(3):
        metrics.set_lag("embed", "t.chunked", p, 10 * p)
    metrics.set_lag("parse", "t.uploaded", 0, 5)
    metrics.set_lag("embed", "t.chunked", 0, -3)  # never below zero
    assert (
        value(metrics, "ragstream_consumer_lag", stage="embed", topic="t.chunked", partition="0")
        == 0
    )
    metrics.drop_lag("embed", [TP("t.chunked", 1)])
    lag = {dict(k[1])["partition"] for k in samples(metrics) if k[0] == "ragstream_consumer_lag"}
    assert lag == {"0", "2"}  # embed 0 and 2, parse 0
    metrics.stage_stopped("embed")
    left = [dict(k[1]) for k in samples(metrics) if k[0] == "ragstream_consumer_lag"]
    assert left == [{"stage": "parse", "topic": "t.uploaded", "partition": "0"}]
    assert value(metrics, "ragstream_worker_up", stage="embed") == 0
    assert value(metrics, "ragstream_assigned_partitions", stage="embed") == 0


def test_states_map_to_numbers_and_unknown_states_are_refused() -> None:
    metrics = Metrics()
    for state, number in (("closed", 0), ("half_open", 1), ("open", 2)):
        metrics.on_circuit_change("llamaparse", "closed", state)  # a CircuitBreaker listener
        assert value(metrics, "ragstream_circuit_state", service="llamaparse") == number
    for throttle, number in ((ThrottleState.OPEN, 0), ("WARNING", 1), (ThrottleState.THROTTLED, 2)):
        metrics.set_throttle("openai", throttle)
        assert value(metrics, "ragstream_throttle_state", service="openai") == number
    with pytest.raises(ValueError, match="circuit"):
        metrics.set_circuit_state("openai", "ajar")
    with pytest.raises(ValueError, match="throttle"):
        metrics.set_throttle("openai", "maybe")


def test_labels_never_carry_document_tenant_or_correlation_ids() -> None:
    metrics = Metrics()
    exercise(metrics)
    text = metrics.exposition().decode()
    for forbidden in ("doc-1", "acme", "corr-1", "document_id", "tenant", "correlation"):
        assert forbidden not in text


@dataclass(frozen=True)
class _TP:
    topic: str
    partition: int


@dataclass
class FakeConsumer:
    highwaters: dict[_TP, int | None]
    positions: dict[_TP, int]
    fail: set[_TP] = field(default_factory=set)

    def assignment(self) -> set[_TP]:
        return set(self.highwaters)

    def highwater(self, partition: _TP) -> int | None:
        return self.highwaters[partition]

    async def position(self, partition: _TP) -> int:
        if partition in self.fail:
            raise RuntimeError("partition moved in a rebalance")
        return self.positions[partition]


async def test_observe_lag_is_highwater_minus_position_and_never_raises() -> None:
    metrics = Metrics()
    a, b, c = _TP("t.in", 0), _TP("t.in", 1), _TP("t.in", 2)
    consumer = FakeConsumer({a: 100, b: None, c: 50}, {a: 60, b: 0, c: 50})
    await observe_lag(metrics, "chunk", consumer)
    lag = {
        dict(k[1])["partition"]: v
        for k, v in samples(metrics).items()
        if k[0] == "ragstream_consumer_lag"
    }
    assert lag == {"0": 40, "2": 0}  # partition 1 has no highwater yet
    consumer.fail = {a, b, c}
    await observe_lag(metrics, "chunk", consumer)  # swallowed, values kept


# -- the health server ------------------------------------------------------------------------


@dataclass
class Flag:
    ok: bool = False
    hang: bool = False
    boom: bool = False

    async def __call__(self) -> tuple[bool, dict[str, Any]]:
        if self.hang:
            await asyncio.sleep(60)
        if self.boom:
            raise RuntimeError("db gone")
        return self.ok, {"database": self.ok, "parse": True}


@asynccontextmanager
async def serving(flag: Flag, **kwargs: Any) -> AsyncIterator[tuple[HealthServer, str]]:
    metrics = Metrics()
    exercise(metrics)
    server = HealthServer(metrics, "127.0.0.1", 0, flag, **kwargs)
    port = await server.start()
    assert port == server.port and port > 0
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    def call() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(call)


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return response


async def test_metrics_healthz_and_ready_over_http() -> None:
    flag = Flag()
    async with serving(flag) as (_, base):
        status, headers, body = await get(base + "/metrics")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert set(EXPECTED) <= names

        status, _, body = await get(base + "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})

        status, headers, body = await get(base + "/ready")
        assert status == 503
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"ready": False, "checks": {"database": False, "parse": True}}
        flag.ok = True
        status, _, body = await get(base + "/ready?verbose=1")
        assert (status, json.loads(body)["ready"]) == (200, True)
        flag.ok = False
        assert (await get(base + "/ready"))[0] == 503


async def test_ready_is_503_when_the_check_hangs_or_raises() -> None:
    flag = Flag(ok=True, hang=True)
    async with serving(flag, ready_timeout_s=0.2) as (_, base):
        status, _, body = await get(base + "/ready")
        assert status == 503 and "timed out" in json.loads(body)["error"]
        flag.hang, flag.boom = False, True
        status, _, body = await get(base + "/ready")
        assert (status, json.loads(body)) == (503, {"ready": False, "error": "RuntimeError"})
        assert (await get(base + "/healthz"))[0] == 200  # liveness does not depend on it


async def test_bad_requests_get_plain_answers() -> None:
    async with serving(Flag()) as (server, base):
        assert (await get(base + "/nope"))[0] == 404
        status, headers, _ = await get(base + "/metrics", method="POST")
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
        status, headers, body = await get(base + "/metrics", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
        assert (await raw(server.port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"x" * 20_000 + b"\r\n\r\n"
        assert (await raw(server.port, huge)).startswith(b"HTTP/1.1 431 ")
        bare_lf = await raw(server.port, b"GET /healthz HTTP/1.0\n\n")  # tolerated
        assert bare_lf.startswith(b"HTTP/1.1 200 ")


async def test_a_silent_client_neither_blocks_others_nor_stop() -> None:
    async with serving(Flag(), request_timeout_s=30) as (server, base):
        _, silent = await asyncio.open_connection("127.0.0.1", server.port)
        assert (await get(base + "/healthz"))[0] == 200
        await asyncio.wait_for(server.stop(), 2)  # cancels the silent connection's handler
        silent.close()


async def test_a_taken_port_is_an_infrastructure_error() -> None:
    async with serving(Flag()) as (server, _):
        other = HealthServer(Metrics(), "127.0.0.1", server.port, Flag())
        with pytest.raises(InfrastructureError, match=f"127.0.0.1:{server.port}"):
            await other.start()


async def test_readiness_runs_named_checks_plain_or_async() -> None:
    async def db_up() -> bool:
        return True

    def broken() -> bool:
        raise RuntimeError

    ready = readiness({"database": db_up, "parse": lambda: True})
    assert await ready() == (True, {"database": True, "parse": True})
    ready = readiness({"database": db_up, "chunk": lambda: False, "embed": broken})
    assert await ready() == (False, {"database": True, "chunk": False, "embed": False})


class FakePool:
    def __init__(self, answer: Any = 1, delay: float = 0.0, error: Exception | None = None):
        self.answer, self.delay, self.error = answer, delay, error

    async def fetchval(self, query: str, *args: Any) -> Any:
        assert query == "SELECT 1"
        await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return self.answer


class FakeStore:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[FakePool]:
        yield self.pool


async def test_database_ready_answers_within_its_timeout() -> None:
    assert await database_ready(FakePool()) is True
    assert await database_ready(FakeStore(FakePool())) is True
    assert await database_ready(FakePool(error=ConnectionResetError())) is False
    assert await database_ready(FakeStore(FakePool(delay=5)), timeout_s=0.05) is False


# -- log redaction ----------------------------------------------------------------------------

SECRETS = {
    "RAGSTREAM_SERVICES__OPENAI__API_KEY": "sk-proj-T3stKey0123456789abcdef",
    "RAGSTREAM_SERVICES__LLAMAPARSE__API_KEY": "llx-Zz9876543210fedcba",
    "RAGSTREAM_KAFKA__SASL_PASSWORD": 'sasl-"pa$$/w0rd\\ü',
    "RAGSTREAM_POSTGRES__PASSWORD": "pg-Field-Secret-42",
}
URL_PASSWORD = "url-P@ss:w/rd-7"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_reaches_a_log_line(
    fmt: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    from urllib.parse import quote

    for key, secret in SECRETS.items():
        monkeypatch.setenv(key, secret)
    url = f"postgresql://app:{quote(URL_PASSWORD, safe='')}@db:5432/ragstream"
    monkeypatch.setenv("RAGSTREAM_DATABASE_URL", url)
    settings = load_settings(kafka={"sasl_mechanism": "PLAIN", "sasl_username": "svc"})
    assert len(secret_values(settings)) == 5
    configure_logging("DEBUG", fmt, secrets=secret_values(settings))
    log = structlog.get_logger("ragstream.test")
    log.info("settings", settings=settings.model_dump(), json=settings.model_dump(mode="json"))
    log.info("dsn", dsn=settings.postgres.dsn(), url=settings.postgres.url)
    log.warning("calling", headers={"Authorization": f"Bearer {SECRETS[next(iter(SECRETS))]}"})
    log.info("embedded " + "; ".join(SECRETS.values()))
    logging.getLogger("aiokafka").warning("sasl %s", settings.kafka.client_options())
    api_key = settings.services.openai.api_key

    def connect(dsn: str, api_key: str) -> None:  # its arguments: what a frame dump would show
        raise ConnectionError(f"cannot reach {dsn} with {api_key}")

    try:
        connect(settings.postgres.dsn(), api_key.get_secret_value() if api_key else "")
    except ConnectionError:
        log.exception("connect failed")
    logging.getLogger("other").warning("unrelated https://user:hunter2hunter2@example.com/x")
    out = capsys.readouterr().err
    assert "connect failed" in out and "settings" in out and "ConnectionError" in out
    for secret in [*SECRETS.values(), URL_PASSWORD]:
        for form in {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}:
            assert form not in out, f"{form!r} leaked in {fmt} logs"
    assert "hunter2hunter2" not in out
    assert "locals" not in out  # a truncated local could show part of a secret
    assert "***" in out
    if fmt == "json":
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(lines) == 7  # every line is still valid JSON after masking


def test_the_service_mode_gauge_follows_the_control_topic() -> None:
    from consumers.compose import observe_control
    from ragstream.events import ServiceMode, ServiceModeChanged

    metrics = Metrics(process_metrics=False)
    metrics.set_mode("openai", "local")
    observe_control(metrics, ServiceModeChanged(service="openai", mode=ServiceMode.HYBRID))
    got = samples(metrics)
    modes = {
        dict(labels)["mode"]: v
        for (name, labels), v in got.items()
        if name == "ragstream_service_mode" and dict(labels)["service"] == "openai"
    }
    assert modes == {"local": 0, "real": 0, "hybrid": 1}
