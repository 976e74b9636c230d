"""A secret echoed by an upstream service is found nowhere: not in the tables, the DLQ, the
worker's log or any command's output."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.cli import app
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import H_ERR_CLASS, H_ERR_MESSAGE, H_ERR_STACKTRACE, H_ERR_STAGE, Topology
from tests.integration.pipeline_helpers import (
    WorkerProcess,
    read_topic,
    wait_for_statuses,
    worker_env,
)
from tests.servers.openai_server import OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# No recognisable shape (no sk- prefix): only the configured value can give it away.
KEY = "rs7Q2xZ9w4Lq1mPv8KxW3"


async def _cli(settings: Settings, *args: str) -> str:
    env = {k: v for k, v in worker_env(settings).items() if k.startswith("RAGSTREAM_")}
    env.update(
        {
            "RAGSTREAM_SERVICES__OPENAI__API_KEY": KEY,
            "RAGSTREAM_OBSERVABILITY__LOG_LEVEL": "ERROR",
            "COLUMNS": "250",
        }
    )
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


async def test_an_echoed_api_key_is_stored_published_logged_and_printed_masked(
    settings: Settings, store: Store, tenant: str, tmp_path: Path
) -> None:
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    with OpenAIServer(api_key="the-right-key", echo_credentials=True) as server:
        proc = WorkerProcess(
            settings,
            "all",
            tmp_path / "worker.log",
            env={
                "RAGSTREAM_SERVICES__OPENAI__MODE": "real",
                "RAGSTREAM_SERVICES__OPENAI__BASE_URL": server.base_url,
                "RAGSTREAM_SERVICES__OPENAI__API_KEY": KEY,
            },
        ).start()
        try:
            async with Uploader(settings) as up:
                receipt = await up.upload_bytes(
                    b"# Quarterly numbers\n\nRevenue grew in every region.\n",
                    "numbers.md",
                    tenant_id=tenant,
                )
            doc = receipt.document_id
            await wait_for_statuses(
                store, [doc], 90, statuses=frozenset({"dead-lettered"}), running=[proc]
            )
            dead = await read_topic(settings, topology.dlq, at_least=1)
        finally:
            await proc.stop()
        assert server.refused("auth") >= 1  # the key really went out and came back echoed

    # PostgreSQL: the document row and its journey.
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        rows = [
            str(r[0])
            for r in await conn.fetch(
                "SELECT row_to_json(d)::text FROM documents d WHERE document_id = $1 "
                "UNION ALL SELECT row_to_json(e)::text FROM document_events e "
                "WHERE document_id = $1",
                doc,
            )
        ]
    finally:
        await conn.close()
    stored = "\n".join(rows)
    assert "Incorrect API key provided: ***" in stored, stored  # the echo arrived, masked
    assert KEY not in stored

    # The DLQ: every header of the dead letter.
    (record,) = [d for d in dead if d.document_id == doc]
    headers = record.headers
    assert headers[H_ERR_STAGE] == b"embed"
    assert b"***" in headers[H_ERR_MESSAGE]
    assert not any(KEY.encode() in v for v in headers.values()), headers

    # The worker's log.
    assert KEY not in proc.log_path.read_text()

    # Every command that shows it.
    shown = [
        await _cli(settings, "dlq", "list", "--json"),
        await _cli(settings, "dlq", "show", f"{record.record.partition}:{record.offset}"),
        await _cli(settings, "doc", doc),
    ]
    assert all("***" in out for out in shown), shown
    assert not any(KEY in out for out in shown), shown


async def test_a_dead_letter_written_before_scrubbing_is_printed_masked(
    settings: Settings,
) -> None:
    """An older version (or another system) left a key in a DLQ header: the commands that
    print dead letters mask it all the same."""
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    producer = AIOKafkaProducer(**settings.kafka.client_options())
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            topology.dlq,
            b"not an event",
            key=b"k",
            headers=[
                (H_ERR_STAGE, b"embed"),
                (H_ERR_CLASS, b"PermanentError"),
                (H_ERR_MESSAGE, f"openai: HTTP 401: Incorrect API key provided: {KEY}".encode()),
                (H_ERR_STACKTRACE, f"Traceback ...\nPermanentError: bearer {KEY}".encode()),
            ],
        )
    finally:
        await producer.stop()
    listed = json.loads(await _cli(settings, "dlq", "list", "--json"))
    assert any("***" in json.dumps(r) for r in listed), listed
    shown = await _cli(settings, "dlq", "show", f"{meta.partition}:{meta.offset}")
    for out in (json.dumps(listed), shown):
        assert KEY not in out, out
