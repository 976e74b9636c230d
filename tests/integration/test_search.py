"""`ragstream search` over the store: the question embedded as the documents were.

Documents are written as the stage workers write them; OpenAI vectors come from
`tests/servers/openai_server.py` over real HTTP, and search calls the same server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import SecretStr
from typer.testing import CliRunner, Result

from ragstream.admin import ensure_topics
from ragstream.cli import app
from ragstream.codec import Codec
from ragstream.control import publish_control, throttle_key
from ragstream.errors import BudgetExceeded
from ragstream.events import CostUsage, ThrottleEvent, ThrottleState
from ragstream.providers.embed.local import LOCAL_MODEL, LocalEmbedder
from ragstream.search import search
from ragstream.settings import Mode, Settings
from ragstream.store import Store
from ragstream.topology import Topology
from tests.integration.test_store import ingest
from tests.servers.openai_server import OpenAIServer, vector_for

ROOT = Path(__file__).resolve().parents[2]
DIMS = 64
OPENAI_MODEL = "text-embedding-3-small"


async def ingest_openai(store: Store, tenant: str, doc: str, texts: Sequence[str]) -> None:
    vectors = [vector_for(OPENAI_MODEL, t, DIMS) for t in texts]
    await ingest(store, doc, tenant, texts, vectors, model=OPENAI_MODEL, dims=DIMS)


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as running:
        yield running


@pytest.fixture
async def topics(settings: Settings) -> None:
    """The prefix's topics, as `stack up` or `topics create` leave them: search reads the
    control topic (budget state) and publishes usage."""
    await ensure_topics(settings)


def real_mode(settings: Settings, server: OpenAIServer) -> Settings:
    openai = settings.services.openai.model_copy(
        update={
            "mode": Mode.REAL,
            "base_url": server.base_url,
            "api_key": SecretStr(server.api_key),
        }
    )
    services = settings.services.model_copy(update={"openai": openai})
    return settings.model_copy(update={"services": services})


SENTENCES = [
    "The fern wants indirect light and damp soil.",
    "Kafka partitions keep one key's records in order.",
    "HNSW graphs trade recall for speed through ef_search.",
    "A circuit breaker opens after five failures in a minute.",
]


async def test_search_embeds_the_question_with_the_documents_own_model(
    store: Store, settings: Settings, server: OpenAIServer, topics: None
) -> None:
    tenant = f"t-search-{uuid.uuid4().hex[:10]}"
    doc = f"d-openai-{uuid.uuid4().hex[:10]}"
    await ingest_openai(store, tenant, doc, SENTENCES)

    result = await search(real_mode(settings, server), SENTENCES[2], tenant, k=3, mode="vector")

    assert [(m.model, m.dimensions) for m in result.models] == [(OPENAI_MODEL, DIMS)]
    assert result.hits[0].document_id == doc
    assert result.hits[0].text == SENTENCES[2]
    assert result.hits[0].score == pytest.approx(1.0, abs=1e-5)
    asked = server.ok_calls()
    assert [(c.model, c.dimensions, c.inputs) for c in asked] == [
        (OPENAI_MODEL, DIMS, [SENTENCES[2]])
    ]


async def test_a_tenant_of_two_models_is_searched_per_model_and_merged_by_rank(
    store: Store, settings: Settings, server: OpenAIServer, topics: None
) -> None:
    tenant = f"t-search-{uuid.uuid4().hex[:10]}"
    remote, local = f"d-openai-{uuid.uuid4().hex[:10]}", f"d-local-{uuid.uuid4().hex[:10]}"
    await ingest_openai(store, tenant, remote, SENTENCES[:2])
    local_vectors = (await LocalEmbedder(DIMS).embed(SENTENCES[2:])).vectors
    await ingest(store, local, tenant, SENTENCES[2:], local_vectors, model=LOCAL_MODEL, dims=DIMS)

    remote_first = await search(
        real_mode(settings, server), SENTENCES[0], tenant, k=4, mode="vector"
    )
    assert {(m.model, m.documents) for m in remote_first.models} == {
        (OPENAI_MODEL, 1),
        (LOCAL_MODEL, 1),
    }
    assert len(remote_first.hits) == 4
    assert remote_first.hits[0].text == SENTENCES[0]
    # Ranks alternate between the models: each model's best comes before any second.
    assert {h.document_id for h in remote_first.hits[:2]} == {remote, local}

    local_first = await search(
        real_mode(settings, server), SENTENCES[3], tenant, k=2, mode="vector"
    )
    assert local_first.hits[0].text == SENTENCES[3]
    assert local_first.hits[0].document_id == local


async def test_a_tenant_with_nothing_embedded_finds_nothing_and_calls_no_one(
    store: Store, settings: Settings, server: OpenAIServer, topics: None
) -> None:
    result = await search(real_mode(settings, server), "anything", f"t-empty-{uuid.uuid4().hex}")
    assert result.hits == [] and result.models == []
    assert server.calls == []


def cli_env(settings: Settings, server: OpenAIServer) -> dict[str, str]:
    return {
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "RAGSTREAM_POSTGRES__URL": settings.postgres.dsn(),
        "RAGSTREAM_SERVICES__OPENAI__MODE": "real",
        "RAGSTREAM_SERVICES__OPENAI__BASE_URL": server.base_url,
        "RAGSTREAM_SERVICES__OPENAI__API_KEY": server.api_key,
        "COLUMNS": "250",
    }


async def test_search_command_prints_json_with_full_ids_and_a_table_with_short_ones(
    store: Store, settings: Settings, server: OpenAIServer, topics: None
) -> None:
    tenant = f"t-search-{uuid.uuid4().hex[:10]}"
    doc = f"{uuid.uuid4()}"
    await ingest_openai(store, tenant, doc, SENTENCES)
    env = cli_env(settings, server)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=env)

    as_json = await asyncio.to_thread(invoke, "search", SENTENCES[1], "-t", tenant, "--json")
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["models"] == [
        {"provider": "openai", "model": OPENAI_MODEL, "dimensions": DIMS, "documents": 1}
    ]
    first = payload["hits"][0]
    assert (first["document_id"], first["text"], first["rank"]) == (doc, SENTENCES[1], 1)
    assert first["heading_path"] == ["Doc", "Intro", "§1"] and first["page"] == 1
    assert first["filename"] == f"{doc}.md"

    table = await asyncio.to_thread(invoke, "search", SENTENCES[1], "-t", tenant)
    assert table.exit_code == 0, table.output
    assert f"openai {OPENAI_MODEL} ({DIMS}d, 1 documents)" in table.output
    short = doc[:8]
    assert short in table.output and doc not in table.output.replace(f"{doc}.md", "")
    journey = await asyncio.to_thread(invoke, "doc", short)
    assert journey.exit_code == 0 and f"document {doc}" in journey.output, journey.output


async def test_search_settings_choose_between_exact_scan_and_the_index(
    store: Store, settings: Settings
) -> None:
    tenant = f"t-search-{uuid.uuid4().hex[:10]}"
    texts = [f"chunk {i} about partitions and offsets number {i}" for i in range(30)]
    vectors = (await LocalEmbedder(512).embed(texts)).vectors
    await ingest(store, f"d-{tenant}", tenant, texts, vectors, model=LOCAL_MODEL, dims=512)
    query = vectors[7]

    exact_plan = await store.explain_search(tenant, query, LOCAL_MODEL, 512, k=5)
    assert "embeddings_hnsw" not in exact_plan, exact_plan
    index_plan = await store.explain_search(
        tenant, query, LOCAL_MODEL, 512, k=5, exact_limit=10, ef_search=100
    )
    assert "Index Scan using embeddings_hnsw_512" in index_plan, index_plan
    tuned = settings.model_copy(
        update={"search": settings.search.model_copy(update={"exact_limit": 10, "ef_search": 100})}
    )
    hits = (await search(tuned, texts[7], tenant, k=5)).hits
    assert hits[0].text == texts[7]


async def test_bench_search_reports_recall_and_latency_for_each_setting(
    database_url: str, tmp_path: Path
) -> None:
    """benchmarks/bench_search.py end to end on a tiny corpus; no speed is asserted."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_search.py"),
        "--chunks", "300", "--other-chunks", "100", "--queries", "10",
        "--ef-search", "40", "100", "--exact-limit", "1000000",
        "--database-url", database_url, "--json", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    done = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (report["tenant_chunks"], report["queries"]) == (300, 10)
    settings_seen = [row["setting"] for row in report["rows"]]
    assert settings_seen == [
        "300 chunks, hnsw ef=40",
        "300 chunks, hnsw ef=100",
        "300 chunks, exact scan",
        "100 chunks, hnsw ef=40",
        "100 chunks, hnsw ef=100",
        "100 chunks, exact scan",
    ]
    for row in report["rows"]:
        assert 0 <= row["recall_at_10"] <= 1 and 0 < row["p50_ms"] <= row["p95_ms"]
        if "exact" in row["setting"]:
            assert row["recall_at_10"] == 1.0


async def test_upload_json_names_full_ids_and_refusals(
    settings: Settings, server: OpenAIServer, topics: None, tmp_path: Path
) -> None:
    good, empty = tmp_path / "notes.md", tmp_path / "empty.txt"
    good.write_text("# Notes\n\nPartitions keep one key's records in order.\n")
    empty.write_text("")
    env = cli_env(settings, server) | {
        "RAGSTREAM_DEVSTACK__DATA_DIR": str(settings.devstack.data_dir)
    }
    tenant = f"t-upload-{uuid.uuid4().hex[:10]}"
    args = ["upload", str(good), str(empty), "--tenant", tenant, "--json"]
    result = await asyncio.to_thread(CliRunner().invoke, app, args, env=env)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tenant"] == tenant
    [published] = payload["published"]
    assert published["filename"] == "notes.md"
    assert uuid.UUID(published["document_id"])  # the whole id, not its start
    assert payload["refused"] == [{"path": str(empty), "reason": "empty.txt: file is empty"}]


async def test_search_is_metered_and_refused_while_the_service_is_throttled(
    store: Store, settings: Settings, server: OpenAIServer, topics: None
) -> None:
    tenant = f"t-search-{uuid.uuid4().hex[:10]}"
    await ingest_openai(store, tenant, f"d-{tenant}", SENTENCES)
    real = real_mode(settings, server)

    await search(real, SENTENCES[0], tenant)
    usage = await read_usage(real, count=1)
    assert (usage[0].stage, usage[0].tenant_id, usage[0].document_ids) == ("search", tenant, [])
    assert usage[0].units == server.ok_calls()[0].tokens and usage[0].model == OPENAI_MODEL

    # The accountant's word that the hourly request budget is used up (no end given: in force).
    throttle = ThrottleEvent(
        service="openai", state=ThrottleState.THROTTLED, reason="openai: 100 requests this hour",
        window="hour", spent_usd=Decimal("0.01"), budget_usd=Decimal("5"), requests=100,
        request_budget=100,
    )  # fmt: skip
    await publish_control(real, throttle_key("openai"), throttle)
    with pytest.raises(BudgetExceeded):
        await search(real, SENTENCES[1], tenant, mode="vector")
    assert len(server.ok_calls()) == 1  # the refused search sent nothing
    # Hybrid answers from the full text meanwhile, and says why.
    hybrid = await search(real, SENTENCES[1], tenant)
    assert hybrid.degraded and "throttled" in hybrid.degraded, hybrid.degraded
    assert hybrid.hits[0].text == SENTENCES[1]
    assert len(server.ok_calls()) == 1


async def read_usage(settings: Settings, count: int) -> list[CostUsage]:
    """The first `count` usage events on the prefix's cost topic."""
    codec = Codec()
    consumer = AIOKafkaConsumer(
        Topology(settings.kafka.topic_prefix).cost_usage,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        out: list[CostUsage] = []
        async with asyncio.timeout(30):
            while len(out) < count:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        event = codec.decode(record.value)
                        assert isinstance(event, CostUsage)
                        out.append(event)
        return out
    finally:
        await consumer.stop()
