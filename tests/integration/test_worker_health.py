"""A live worker: readiness follows the database, and the dashboard and alerts name only
metrics its /metrics exports."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumers.worker import run_workers
from ragstream.admin import ensure_topics
from ragstream.devstack.postgres import LocalPostgres
from ragstream.exporter import GroupExporter
from ragstream.settings import Settings
from ragstream.topology import Stage
from tests.conftest import free_port
from tests.integration.pipeline_helpers import wait_until
from tests.integration.test_observability import (
    METRIC_NAME,
    alert_expressions,
    dashboard_expressions,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:  # not listening yet
        return 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as page:
        return str(page.read().decode())


def _home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="ragstream-ready-test-"))
    home.chmod(0o711)  # PostgreSQL's system user passes through
    return home


async def _until(url: str, status: int, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(_status, url)
        if last == status:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{url} answered {last}, not {status}, for {within_s} s")


async def test_readiness_follows_the_database_and_live_metrics_cover_the_dashboard(
    settings: Settings,
) -> None:
    # A database of this test's own, so it can be stopped without touching the others.
    home = _home()
    postgres = LocalPostgres(
        home, port=free_port(), system_user=settings.devstack.postgres_system_user
    )
    postgres.start()
    try:
        dsn = postgres.ensure_database("ready")
        port = free_port()
        settings = settings.model_copy(
            update={
                "postgres": settings.postgres.model_copy(update={"url": dsn}),
                "observability": settings.observability.model_copy(update={"metrics_port": port}),
            }
        )
        await ensure_topics(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(run_workers(settings, list(Stage), stop=stop))
        exporter = GroupExporter(
            settings.model_copy(
                update={
                    "observability": settings.observability.model_copy(update={"exporter_port": 0})
                }
            )
        )
        exporting = asyncio.create_task(exporter.run(stop, interval_s=0.5))
        try:
            ready = f"http://127.0.0.1:{port}/ready"
            await _until(ready, 200)
            assert await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/healthz") == 200

            await asyncio.to_thread(postgres.stop)
            await _until(ready, 503)
            await asyncio.to_thread(postgres.start)
            await _until(ready, 200)

            text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            await wait_until(lambda: exporter.reading, 30, "the exporter's first read")
            text += await asyncio.to_thread(_get, f"http://127.0.0.1:{exporter.port}/metrics")
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            await asyncio.wait_for(exporting, 30)
    finally:
        postgres.stop()

    families = {f.name for f in text_string_to_metric_families(text)}
    exported = families | {f"{name}_total" for name in families}
    for where, exprs in (("dashboard", dashboard_expressions()), ("alerts", alert_expressions())):
        for name in {n for e in exprs for n in METRIC_NAME.findall(e)}:
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in exported or family in exported, (
                f"{where}: {name} is not on a live /metrics"
            )
    # Before any call, each service's calls already show at 0 (rate() sees the first ones),
    # as every outcome of every stage does.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    for service, operation in (("openai", "embeddings"), ("llamaparse", "parse")):
        labels = (("operation", operation), ("service", service), ("status", "ok"))
        assert samples.get(("ragstream_external_calls_total", labels)) == 0, (service, samples)
    for outcome in ("ok", "retried", "waiting", "dead-lettered", "poison"):
        key = ("ragstream_records_total", (("outcome", outcome), ("stage", "embed")))
        assert samples.get(key) == 0, outcome
