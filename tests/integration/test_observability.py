"""config/prometheus and config/grafana against the real tools and the real Metrics.

promtool checks both scrape configs and the alert rules and runs their unit tests; a real
Prometheus (Debian's package) scrapes a HealthServer and answers queries about what it read;
the dashboard and the alerts name only metrics that Metrics exports. The Prometheus binaries
are required: `make test` installs them (`make tools`), and their absence fails these tests.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from ragstream.admin import admin_client
from ragstream.events import utc_now
from ragstream.exporter import GroupExporter
from ragstream.health import HealthServer, database_ready, readiness
from ragstream.metrics import Metrics, observe_lag
from ragstream.settings import Settings, load_settings
from ragstream.status import GroupStatus, PartitionStatus, Status
from ragstream.store import Store
from tests.unit.test_metrics import exercise

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "ragstream.json"
METRIC_NAME = re.compile(r"\bragstream_[a-z0-9_]+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: these tests need Debian's prometheus package "
            "(`make tools`, or `apt-get install -y prometheus`)",
            pytrace=False,
        )
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def exported_sample_names() -> set[str]:
    """Every sample name a Metrics instance exposes once every method has been called, and
    every one `ragstream exporter` exposes once it has read the groups."""
    metrics = Metrics()
    exercise(metrics)
    exporter = GroupExporter(load_settings())
    partition = PartitionStatus("p.documents.uploaded", 0, 0, 5, 3, 2, None, None)
    group = GroupStatus(
        "parse", "p-parse", ("p.documents.uploaded",), "Stable", (), (partition,), None
    )
    exporter.observe(Status(utc_now(), "b:9092", "p", None, (group,), "p.dlq", 1))
    text = (metrics.exposition() + exporter.exposition()).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


# -- promtool ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["prometheus.local.yml", "prometheus.compose.yml"])
def test_scrape_configs_are_valid(config: str) -> None:
    out = promtool("check", "config", str(PROMETHEUS_DIR / config)).stdout
    assert "SUCCESS" in out and "rules found" in out  # the alert rules are loaded too


def test_alert_rules_are_valid() -> None:
    assert (
        "SUCCESS: 16 rules found"
        in promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml")).stdout
    )


def test_every_alert_fires_on_its_case_and_stays_quiet_otherwise() -> None:
    test_file = PROMETHEUS_DIR / "alerts_test.yml"
    promtool("test", "rules", str(test_file))
    # Each alert of alerts.yml has a case where it fires and one where it must not.
    alerts = {
        r["alert"]
        for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(test_file.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == alerts and quiet == alerts


# -- the dashboard and the alerts agree with Metrics ------------------------------------------


def test_dashboard_and_alerts_name_only_exported_metrics() -> None:
    exported = exported_sample_names()
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    for where, exprs in (("dashboard", dashboard_expressions()), ("alerts", alert_expressions())):
        used = {name for e in exprs for name in METRIC_NAME.findall(e)}
        assert used, where
        assert used <= exported, f"{where} names metrics Metrics does not export: {used - exported}"
    shown = {name for e in dashboard_expressions() for name in METRIC_NAME.findall(e)}
    for needed in (
        "ragstream_records_total",
        "ragstream_consumer_lag",
        "ragstream_stage_duration_seconds_bucket",
        "ragstream_upload_to_embedded_seconds_bucket",
        "ragstream_dead_letters_total",
        "ragstream_spend_usd_total",
        "ragstream_budget_usd",
        "ragstream_budget_spent_usd",
    ):
        assert needed in shown, needed


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    grafana = ROOT / "config" / "grafana"
    datasource = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "provisioning/dashboards/ragstream.yml").read_text())
    (dashboards,) = provider["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./config/grafana/dashboards:{dashboards['options']['path']}:ro" in mounts
    variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"])
    assert variable["current"]["value"] == source["uid"]


# -- a real Prometheus scrapes a HealthServer -------------------------------------------------


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class PrometheusProcess:
    def __init__(self, base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.base, self.proc, self.log = base, proc, log

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = http_json(url)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def wait_for(self, expr: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            result = await asyncio.to_thread(self.query, expr)
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus has no result for {expr!r}; log:\n{self.log.read_text()}")
            await asyncio.sleep(0.5)


@pytest.fixture
async def worker() -> AsyncIterator[tuple[Metrics, HealthServer]]:
    metrics = Metrics()
    server = HealthServer(metrics, "127.0.0.1", 0, readiness({"always": lambda: True}))
    await server.start()
    yield metrics, server
    await server.stop()


@contextmanager
def running_prometheus(
    directory: Path, targets: dict[str, list[str]], rules: Path = PROMETHEUS_DIR / "alerts.yml"
) -> Iterator[PrometheusProcess]:
    """Debian's Prometheus scraping `targets` ({job: [host:port]}) every second, evaluating
    `rules` every second, until the block ends."""
    binary = tool("prometheus")
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {"job_name": job, "scrape_timeout": "1s", "static_configs": [{"targets": at}]}
                    for job, at in targets.items()
                ],
            }
        )
    )
    port = free_port()
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not start; log:\n{log.read_text()}", pytrace=False)
            time.sleep(0.2)
        yield PrometheusProcess(base, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def prometheus(worker: tuple[Metrics, HealthServer], tmp_path: Path) -> Iterator[PrometheusProcess]:
    _, server = worker
    with running_prometheus(tmp_path, {"ragstream-workers": [f"127.0.0.1:{server.port}"]}) as p:
        yield p


async def test_prometheus_scrapes_records_lag_and_latency(
    worker: tuple[Metrics, HealthServer], prometheus: PrometheusProcess
) -> None:
    metrics, _ = worker
    exercise(metrics)

    up = await prometheus.wait_for('up{job="ragstream-workers"} == 1')
    assert len(up) == 1
    records = await prometheus.wait_for(
        'ragstream_records_total{job="ragstream-workers",stage="embed",outcome="ok"}'
    )
    assert float(records[0]["value"][1]) == 2
    lag = await prometheus.wait_for('ragstream_consumer_lag{stage="embed"}')
    assert {(r["metric"]["partition"], float(r["value"][1])) for r in lag} == {("0", 17), ("1", 0)}
    latency = await prometheus.wait_for("ragstream_upload_to_embedded_seconds_count")
    assert float(latency[0]["value"][1]) == 2

    # Live: more records show up within a few scrapes.
    for _ in range(5):
        metrics.record_handled("embed", "ok", 0.1)
    await prometheus.wait_for(
        'ragstream_records_total{stage="embed",outcome="ok"} == 7', timeout_s=10
    )
    p99 = await prometheus.wait_for(
        "histogram_quantile(0.99, sum by (le) (ragstream_upload_to_embedded_seconds_bucket))"
    )
    assert 30 <= float(p99[0]["value"][1]) <= 60  # 42 s and 7.5 s observed

    # Every dashboard expression is PromQL this Prometheus accepts (and most have data).
    answered = 0
    for expr in dashboard_expressions():
        promql = expr.replace("$__rate_interval", "1m").replace("$stage", ".*")
        if promql.startswith("label_values("):
            continue
        answered += bool(await asyncio.to_thread(prometheus.query, promql))
    assert answered >= 10

    rules = await asyncio.to_thread(http_json, f"{prometheus.base}/api/v1/rules")
    loaded = [r["name"] for g in rules["data"]["groups"] for r in g["rules"]]
    assert len(loaded) == 16 and {"RagstreamDeadLetters", "RagstreamGroupStuck"} <= set(loaded)
    scraped = await prometheus.wait_for('scrape_samples_scraped{job="ragstream-workers"}')
    print(
        f"scrape: {len(metrics.exposition())} bytes, {scraped[0]['value'][1]} samples",
    )


# -- the helpers against the real broker and database -----------------------------------------


async def test_observe_lag_reads_a_real_consumer(settings: Settings) -> None:
    topic = f"{settings.kafka.topic_prefix}.lag-check"
    async with admin_client(settings) as admin:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    opts = settings.kafka.client_options()
    producer = AIOKafkaProducer(**opts, acks="all")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, b"r%d" % i, key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **opts,
        group_id=f"{settings.kafka.topic_prefix}-lag-check",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    metrics = Metrics()
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=2)
            got = [r for records in batch.values() for r in records]
        assert len(got) == 2
        await consumer.commit()
        await observe_lag(metrics, "parse", consumer)
    finally:
        await consumer.stop()
    lag = metrics.registry.get_sample_value(
        "ragstream_consumer_lag", {"stage": "parse", "topic": topic, "partition": "0"}
    )
    assert lag == 3


async def test_database_ready_against_the_real_database(database_url: str) -> None:
    store = await Store.connect(database_url, min_size=1, max_size=2)
    try:
        assert await database_ready(store) is True
    finally:
        await store.close()
    started = time.monotonic()
    assert await database_ready(store, timeout_s=1.0) is False  # a closed pool
    assert time.monotonic() - started < 2
