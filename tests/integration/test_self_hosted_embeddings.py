"""A self-hosted embedding server behind `services.openai.base_url` (Hugging Face TEI, Ollama,
vLLM speak the OpenAI embeddings API): another model name, no API key, no `dimensions`
parameter, and a price of 0 from a model marked `self_hosted` in the price table, so budgets
never hold it back. The local OpenAI server stands in for it over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.cost.pricing import PriceTable
from ragstream.errors import ConfigError
from ragstream.resources import config_dir
from ragstream.search import search
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Topology
from tests.integration.pipeline_helpers import read_topic, variant, wait_for_statuses, workers
from tests.servers.openai_server import OpenAIServer

pytestmark = [pytest.mark.integration]

MODEL = "BAAI/bge-small-en-v1.5"
DIMS = 384  # the model's own size: the server refuses the dimensions parameter for it
SELF_HOSTED = f"""
[openai."{MODEL}"]
self_hosted = true
unit = "tokens"
"""


def prices_with_self_hosted(directory: Path) -> Path:
    path = directory / "prices.toml"
    path.write_text((config_dir() / "prices.toml").read_text() + SELF_HOSTED)
    return path


async def test_a_self_hosted_server_embeds_for_nothing_and_no_budget_holds_it(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    with OpenAIServer(api_key=None, fixed_dimensions={MODEL: DIMS}) as server:
        hosted = variant(
            settings,
            services={
                "openai": {
                    "mode": "real",
                    "base_url": server.base_url,
                    "model": MODEL,
                    "send_dimensions": False,
                }
            },
            embed={"dimensions": DIMS},
            # Budgets a paid service would cross at its first request.
            budgets={
                "prices": prices_with_self_hosted(tmp_path),
                "daily_usd": "0.000001",
                "hourly_requests": 1,
            },
        )
        await ensure_topics(hosted)
        async with workers(hosted, concurrency=1, accountant=True):
            async with Uploader(hosted) as up:
                ids = [
                    (await up.upload_bytes(
                        f"# Pump {i}\n\nPump {i} needs a new seal every {i + 2} months.".encode(),
                        f"pump-{i}.md", tenant_id="hosted",
                    )).document_id
                    for i in range(4)
                ]  # fmt: skip
            done = await wait_for_statuses(store, ids, 90)
            assert {d.status for d in done.values() if d} == {"embedded"}, done
            found = await search(hosted, "how often does pump 3 need a seal", "hosted", 3, "vector")

        calls = server.calls
        assert len(server.ok_calls()) >= 4  # past the hourly request budget of 1
        assert {(c.model, c.dimensions) for c in server.ok_calls()} == {(MODEL, DIMS)}
        assert not [c for c in calls if c.status != 200], [(c.status, c.reason) for c in calls]
        models = {(m.model, m.dimensions) for m in found.models}
        # (The server's vectors are hashes of the text: search finds chunks, in no meaningful
        # order, having embedded the question with the same model and no budget.)
        assert models == {(MODEL, DIMS)} and len(found.hits) == 3
        assert calls[-1].inputs == ["how often does pump 3 need a seal"]
        # Not a paid call: nothing on the usage topic, so nothing counted against a budget.
        usage = await read_topic(hosted, Topology(hosted.kafka.topic_prefix).cost_usage)
        assert usage == []


def test_a_self_hosted_price_is_zero_and_a_contradiction_is_refused(tmp_path: Path) -> None:
    table = PriceTable.load(prices_with_self_hosted(tmp_path))
    price = table.embedding(MODEL)
    assert (price.unit_price_usd, price.self_hosted, price.cost(10_000)) == (0, True, 0)
    assert not table.embedding("text-embedding-3-small").self_hosted

    both = tmp_path / "both.toml"
    both.write_text(
        (config_dir() / "prices.toml").read_text()
        + f'[openai."{MODEL}"]\nself_hosted = true\nunit = "tokens"\nusd_per_million = "0.02"\n'
    )
    with pytest.raises(ConfigError, match="a self-hosted model has no usd_per_million"):
        PriceTable.load(both)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(
        (config_dir() / "prices.toml").read_text() + f'[openai."{MODEL}"]\nself_hosted = "yes"\n'
    )
    with pytest.raises(ConfigError, match="self_hosted: 'yes' must be true or false"):
        PriceTable.load(wrong)
