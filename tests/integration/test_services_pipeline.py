"""The pipeline with a real OpenAI client over HTTP (against the local server that speaks its
API), and an operator switching the service's mode while the workers run."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import SecretStr

from ragstream.control import publish_mode
from ragstream.settings import Mode, Settings
from ragstream.store import CacheLookup, Store
from tests.integration.pipeline_helpers import wait_until
from tests.integration.test_failures import pipeline, wait_status
from tests.servers.openai_server import OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

from producers.upload import Uploader  # noqa: E402


def real_openai(settings: Settings, server: OpenAIServer) -> Settings:
    openai = settings.services.openai.model_copy(
        update={"mode": Mode.REAL, "base_url": server.base_url, "api_key": SecretStr("test-key")}
    )
    services = settings.services.model_copy(update={"openai": openai})
    return settings.model_copy(update={"services": services})


async def embed_step(store: Store, document_id: str, within_s: float = 15.0) -> dict[str, object]:
    """The document's embed step (written just after its status says embedded)."""
    deadline = time.monotonic() + within_s
    while True:
        journey = await store.journey(document_id)
        assert journey is not None
        steps = [s for s in journey.steps if s.stage == "embed" and s.outcome == "ok"]
        if steps or time.monotonic() > deadline:
            (step,) = steps
            return step.detail
        await asyncio.sleep(0.1)


async def test_real_mode_stores_what_the_api_returned_then_switches_to_local(
    settings: Settings,
) -> None:
    with OpenAIServer() as server:
        settings = real_openai(settings, server)
        async with pipeline(settings), Uploader(settings) as up:
            texts = [
                f"# Real {i}\n\nParagraph {i} about stream processing and embeddings."
                for i in range(3)
            ]
            receipts = [
                await up.upload_bytes(t.encode(), f"real{i}.md", tenant_id="svc")
                for i, t in enumerate(texts)
            ]
            async with await Store.connect(settings.postgres.dsn()) as store:
                for r in receipts:
                    assert await wait_status(store, r.document_id, {"embedded"}) == "embedded"
                returned = server.returned()
                tokens_reported = sum(c.tokens for c in server.ok_calls())
                tokens_recorded = 0
                for r in receipts:
                    detail = await embed_step(store, r.document_id)
                    assert detail["provider"] == "openai"
                    tokens_recorded += int(str(detail["tokens"]))
                    doc = await store.get_document(r.document_id)
                    assert (
                        doc is not None and doc.current_embedding_model == "text-embedding-3-small"
                    )
                    chunks = await store.load_chunks(
                        r.document_id, doc.current_chunker_version or ""
                    )
                    stored = await store.cached_embeddings(
                        CacheLookup(
                            "text-embedding-3-small",
                            settings.embed.dimensions,
                            [c.text_sha256 for c in chunks],
                            cache_scope="svc",
                        )
                    )
                    for c in chunks:  # exactly the vectors the server sent
                        assert stored[c.text_sha256] == pytest.approx(returned[c.text], abs=1e-6)
                assert tokens_recorded == tokens_reported

                # The operator switches OpenAI to local; the running workers follow, no restart:
                # soon a document uploaded after the switch is embedded locally.
                switched_at = time.monotonic()
                await publish_mode(settings, "openai", "local", requested_by="test")
                probes = 0

                async def embedded_locally() -> bool:
                    nonlocal probes
                    probes += 1
                    probe = await up.upload_bytes(
                        f"# Probe {probes}\n\nWritten after the switch.".encode(),
                        f"probe{probes}.md",
                        tenant_id="svc",
                    )
                    assert await wait_status(store, probe.document_id, {"embedded"}) == "embedded"
                    return (await embed_step(store, probe.document_id))["provider"] == "local"

                await wait_until(embedded_locally, 10, "a document embedded locally")
                calls_before = len(server.calls)
                later = await up.upload_bytes(
                    b"# Later\n\nWritten after the switch.", "later.md", tenant_id="svc"
                )
                assert await wait_status(store, later.document_id, {"embedded"}) == "embedded"
                assert (
                    time.monotonic() - switched_at < 5 + 5
                )  # switch within 5 s, then the document
                detail = await embed_step(store, later.document_id)
                assert detail["provider"] == "local"
                assert len(server.calls) == calls_before
