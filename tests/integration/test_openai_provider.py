"""The OpenAI embedder, real HTTP against a local server that speaks the embeddings API.

Nothing is patched: the openai SDK talks to `tests/servers/openai_server.py` on 127.0.0.1,
which counts tokens, enforces the API's limits, sends rate-limit headers and fails on demand.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping

import pytest
from pydantic import SecretStr

from ragstream.errors import PermanentError, RetryableError
from ragstream.providers.circuit import CircuitBreaker, CircuitOpenError, CircuitState
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.embed.openai import (
    MAX_INPUTS,
    MAX_REQUEST_TOKENS,
    InsufficientQuotaError,
    OpenAIEmbedder,
    minimum_requests,
    pack,
)
from ragstream.providers.ratelimit import RateLimiter
from ragstream.providers.select import GuardedEmbedder, embedder_for
from ragstream.settings import Mode, OpenAISettings, ServicesSettings, Settings
from ragstream.tokens import get_tokenizer
from tests.servers.openai_server import Fault, OpenAIServer

DIMENSIONS = 64
WORDS = "stream kafka partition offset embedding vector chunk parse token budget replay".split()


def openai_settings(server: OpenAIServer, *, timeout_s: float = 5.0) -> OpenAISettings:
    return OpenAISettings(
        mode=Mode.REAL, base_url=server.base_url, api_key=SecretStr("test-key"), timeout_s=timeout_s
    )


def texts(n: int, *, seed: int = 7, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [
        f"chunk {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for i in range(n)
    ]


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as running:
        yield running


@pytest.fixture
async def embedder(server: OpenAIServer) -> AsyncIterator[OpenAIEmbedder]:
    embedder = OpenAIEmbedder(openai_settings(server, timeout_s=1.0), dimensions=DIMENSIONS)
    yield embedder
    await embedder.aclose()


# -- results ------------------------------------------------------------------------------------


async def test_vectors_and_usage_are_exactly_what_the_server_returned(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    inputs = texts(50)
    result = await embedder.embed(inputs)

    returned = server.returned()
    assert result.vectors == [returned[text] for text in inputs]  # in input order, bit for bit
    assert result.token_count == sum(call.tokens for call in server.ok_calls())
    assert result.token_count == sum(get_tokenizer().count(t) for t in inputs)
    assert (result.provider, result.model) == ("openai", "text-embedding-3-small")
    assert all(len(v) == DIMENSIONS for v in result.vectors)
    assert [(c.model, c.dimensions) for c in server.calls] == [
        ("text-embedding-3-small", DIMENSIONS)
    ]
    assert embedder.requests_made == 1


async def test_empty_call_sends_nothing(server: OpenAIServer, embedder: OpenAIEmbedder) -> None:
    result = await embedder.embed([])
    assert (result.vectors, result.token_count) == ([], 0)
    assert server.calls == []


async def test_rate_limit_headers_are_exposed(embedder: OpenAIEmbedder) -> None:
    with OpenAIServer(requests_per_minute=500, tokens_per_minute=1_000_000) as limited:
        limited_embedder = OpenAIEmbedder(openai_settings(limited), dimensions=DIMENSIONS)
        try:
            await limited_embedder.embed(["hello world"])
        finally:
            await limited_embedder.aclose()
    headers = limited_embedder.rate_limit_headers
    assert headers["x-ratelimit-limit-requests"] == "500"
    assert headers["x-ratelimit-remaining-requests"] == "499"
    assert headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 2)
    assert headers["x-ratelimit-reset-requests"].endswith("ms")
    assert limited_embedder.limiter.headers == headers


# -- inputs refused before any request ------------------------------------------------------------


async def test_empty_string_is_refused_naming_the_chunk(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    with pytest.raises(PermanentError, match=r"chunk 2 is an empty string"):
        await embedder.embed(["a", "b", "", "d"])
    assert server.calls == []


async def test_input_over_8192_tokens_is_refused_naming_chunk_and_count(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    huge = "token " * 9000
    count = get_tokenizer().count(huge)
    with pytest.raises(PermanentError, match=rf"chunk 1 has {count} tokens, over the 8192"):
        await embedder.embed(["fine", huge])
    assert server.calls == []


# -- errors at the boundary -----------------------------------------------------------------------


async def test_429_storm_is_retryable_then_recovers(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    server.inject(Fault.rate_limit(retry_after_s=0.05), times=4)
    outcomes: list[str] = []
    for _ in range(10):  # the consumer runtime's retry loop, in miniature
        try:
            result = await embedder.embed(["hello", "world"])
        except RetryableError as exc:
            assert exc.retry_after == pytest.approx(0.05)
            assert "429" in str(exc)
            outcomes.append("retry")
            await asyncio.sleep(exc.retry_after or 0)
        else:
            outcomes.append("ok")
            break
    assert outcomes == ["retry"] * 4 + ["ok"]
    assert len(result.vectors) == 2
    assert server.refused("injected_rate_limit") == 4


async def test_retry_after_holds_the_limiter_back(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    server.inject(Fault.rate_limit(retry_after_s=0.4))
    with pytest.raises(RetryableError):
        await embedder.embed(["x"])
    started = time.monotonic()
    await embedder.embed(["x"])
    assert time.monotonic() - started >= 0.35


async def test_insufficient_quota_is_permanent_with_a_clear_message(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    server.inject(Fault.insufficient_quota())
    with pytest.raises(InsufficientQuotaError) as info:
        await embedder.embed(["hello"])
    assert isinstance(info.value, PermanentError) and not info.value.retryable
    assert "insufficient_quota" in str(info.value)
    assert "no credit left" in str(info.value)


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409])
async def test_server_errors_are_retryable(
    server: OpenAIServer, embedder: OpenAIEmbedder, status: int
) -> None:
    server.inject(Fault.http(status))
    with pytest.raises(RetryableError, match=rf"HTTP {status}"):
        await embedder.embed(["hello"])
    assert len((await embedder.embed(["hello"])).vectors) == 1


@pytest.mark.parametrize("status", [400, 403, 404, 422])
async def test_other_client_errors_are_permanent(
    server: OpenAIServer, embedder: OpenAIEmbedder, status: int
) -> None:
    server.inject(Fault.http(status))
    with pytest.raises(PermanentError, match=rf"HTTP {status}") as info:
        await embedder.embed(["hello"])
    assert not info.value.retryable


async def test_wrong_api_key_is_permanent(server: OpenAIServer) -> None:
    settings = openai_settings(server).model_copy(update={"api_key": SecretStr("wrong")})
    embedder = OpenAIEmbedder(settings, dimensions=DIMENSIONS)
    try:
        with pytest.raises(PermanentError, match="HTTP 401"):
            await embedder.embed(["hello"])
    finally:
        await embedder.aclose()


async def test_timeout_is_retryable(server: OpenAIServer, embedder: OpenAIEmbedder) -> None:
    server.inject(Fault.delay(3.0))
    started = time.monotonic()
    with pytest.raises(RetryableError, match="timed out after 1s"):
        await embedder.embed(["slow"])
    assert time.monotonic() - started < 2.5  # the client gave up; the SDK did not retry


async def test_connection_refused_is_retryable(server: OpenAIServer) -> None:
    embedder = OpenAIEmbedder(openai_settings(server), dimensions=DIMENSIONS)
    server.stop()
    try:
        with pytest.raises(RetryableError, match="connection failed"):
            await embedder.embed(["hello"])
    finally:
        await embedder.aclose()


# -- packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_pack_respects_limits_and_stays_within_one_of_the_minimum(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 7, 2048, 2049, 5000, 10_000, 30_000])
    top = rng.choice([5, 150, 1000, 8192])
    counts = [rng.randint(1, top) for _ in range(n)]
    batches = pack(counts)
    assert sorted(i for batch in batches for i in batch) == list(range(n))
    assert all(len(batch) <= MAX_INPUTS for batch in batches)
    assert all(sum(counts[i] for i in batch) <= MAX_REQUEST_TOKENS for batch in batches)
    assert len(batches) <= 1 + minimum_requests(counts)


def test_pack_edge_cases() -> None:
    assert pack([]) == []
    assert pack([8192]) == [[0]]
    assert len(pack([8192] * 37)) == 2  # 303,104 tokens: one request cannot hold them
    assert len(pack([1] * 4096)) == 2  # exactly two requests by count
    with pytest.raises(ValueError):
        pack([MAX_REQUEST_TOKENS + 1])


@pytest.mark.slow
async def test_10k_chunks_use_at_most_one_request_over_the_minimum(server: OpenAIServer) -> None:
    rng = random.Random(11)
    inputs = [
        f"chunk {i}: " + " ".join(rng.choices(WORDS, k=rng.choice([5, 40, 200, 900, 1800])))
        for i in range(10_000)
    ]
    counts = [get_tokenizer().count(t) for t in inputs]
    embedder = OpenAIEmbedder(openai_settings(server, timeout_s=60), dimensions=DIMENSIONS)
    try:
        result = await embedder.embed(inputs)
    finally:
        await embedder.aclose()
    calls = server.ok_calls()
    assert len(calls) == len(server.calls)  # nothing refused: every request within the limits
    assert len(calls) <= 1 + minimum_requests(counts)
    assert max(len(c.inputs) for c in calls) <= MAX_INPUTS
    assert max(c.tokens for c in calls) <= MAX_REQUEST_TOKENS
    assert result.token_count == sum(counts)
    returned = server.returned()
    assert result.vectors == [returned[t] for t in inputs]


# -- the rate limiter -----------------------------------------------------------------------------


class _Blind(RateLimiter):
    """A limiter that never hears the headers: the control group."""

    def update_from_headers(self, headers: Mapping[str, str]) -> None:
        return None


async def _hammer(embedder: OpenAIEmbedder, calls: int, workers: int) -> None:
    queue = [[f"request {i}: {' '.join(WORDS)}"] for i in range(calls)]

    async def worker() -> None:
        while queue:
            batch = queue.pop()
            try:
                await embedder.embed(batch)
            except RetryableError as exc:
                queue.append(batch)  # as the runtime would: try again later
                await asyncio.sleep(exc.retry_after or 0.05)

    await asyncio.gather(*(worker() for _ in range(workers)))


@pytest.mark.slow
async def test_limiter_fed_by_headers_slows_down_before_a_429() -> None:
    # 20 requests and 2,000 tokens per "minute" of one second: 60 calls need about 2 s
    with OpenAIServer(requests_per_minute=20, tokens_per_minute=2000, window_s=1.0) as server:
        embedder = OpenAIEmbedder(openai_settings(server), dimensions=DIMENSIONS)
        started = time.monotonic()
        try:
            await _hammer(embedder, calls=60, workers=4)
        finally:
            await embedder.aclose()
        elapsed = time.monotonic() - started
        assert server.refused("rate_limit") == 0
        assert len(server.ok_calls()) == 60
        assert elapsed >= 1.5  # it did wait: the server's budget allows no faster
        assert embedder.limiter.waited_s > 0

    with OpenAIServer(requests_per_minute=20, tokens_per_minute=2000, window_s=1.0) as server:
        blind = OpenAIEmbedder(openai_settings(server), dimensions=DIMENSIONS, limiter=_Blind())
        try:
            await _hammer(blind, calls=60, workers=4)
        finally:
            await blind.aclose()
        assert server.refused("rate_limit") > 0  # without the headers the server says 429


# -- hybrid and real modes through select ---------------------------------------------------------


def settings_for(server: OpenAIServer, mode: Mode) -> Settings:
    openai = openai_settings(server).model_copy(update={"mode": mode})
    return Settings(services=ServicesSettings(openai=openai))


async def test_local_mode_is_the_local_embedder(server: OpenAIServer) -> None:
    embedder = embedder_for(settings_for(server, Mode.LOCAL))
    assert isinstance(embedder, LocalEmbedder)
    assert (await embedder.embed(["hello"])).provider == "local"
    assert server.calls == []


async def test_hybrid_falls_back_when_the_circuit_opens_and_comes_back(
    server: OpenAIServer,
) -> None:
    transitions: list[CircuitState] = []
    now = [0.0]  # the breaker's clock, moved by hand: the cooldown passes when the test says
    breaker = CircuitBreaker(
        "openai",
        failure_threshold=2,
        window_s=30,
        cooldown_s=0.5,
        listener=lambda _name, _old, new: transitions.append(new),
        clock=lambda: now[0],
    )
    settings = settings_for(server, Mode.HYBRID)
    embedder = embedder_for(settings, breaker=breaker)
    assert isinstance(embedder, GuardedEmbedder) and embedder.name == "hybrid"
    try:
        first = await embedder.embed(["hello world"])
        assert first.provider == "openai"
        assert first.vectors == [server.returned()["hello world"]]

        server.stop()
        with pytest.raises(RetryableError):  # one failure: below the threshold, retried on openai
            await embedder.embed(["hello world"])
        assert transitions == []
        fallback = await embedder.embed(["hello world"])  # the second failure opens the circuit
        assert transitions == [CircuitState.OPEN]
        assert (fallback.provider, fallback.model) == ("local", "local-hash-v1")
        local = LocalEmbedder(settings.embed.dimensions)
        assert fallback.vectors == local.embed_sync(["hello world"]).vectors
        assert (await embedder.embed(["more"])).provider == "local"  # open: straight to local

        server.start()
        calls_before = len(server.calls)
        assert (await embedder.embed(["more"])).provider == "local"  # still cooling down
        assert len(server.calls) == calls_before
        now[0] += 0.5
        probe = await embedder.embed(["back again"])  # half-open: the probe goes to openai
        assert probe.provider == "openai"
        assert breaker.state is CircuitState.CLOSED
        assert (await embedder.embed(["and again"])).provider == "openai"
        assert transitions == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
    finally:
        await embedder.aclose()


async def test_hybrid_does_not_hide_permanent_errors(server: OpenAIServer) -> None:
    breaker = CircuitBreaker("openai", failure_threshold=1)
    embedder = embedder_for(settings_for(server, Mode.HYBRID), breaker=breaker)
    server.inject(Fault.insufficient_quota())
    try:
        with pytest.raises(InsufficientQuotaError):
            await embedder.embed(["hello"])
        assert breaker.state is CircuitState.CLOSED
    finally:
        await embedder.aclose()


async def test_real_mode_turns_an_open_circuit_into_retries(server: OpenAIServer) -> None:
    breaker = CircuitBreaker("openai", failure_threshold=1, cooldown_s=30)
    embedder = embedder_for(settings_for(server, Mode.REAL), breaker=breaker)
    assert embedder.name == "openai"
    server.inject(Fault.http(503))
    try:
        with pytest.raises(RetryableError, match="HTTP 503"):
            await embedder.embed(["hello"])
        calls = len(server.calls)
        with pytest.raises(CircuitOpenError) as info:
            await embedder.embed(["hello"])
        assert info.value.retryable and math.isclose(info.value.retry_after or 0, 30, abs_tol=1)
        assert len(server.calls) == calls  # the open circuit spared the service
    finally:
        await embedder.aclose()
