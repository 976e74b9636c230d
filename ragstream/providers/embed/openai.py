"""The OpenAI embedder: the openai SDK, requests packed to the API's limits, errors translated.

Limits of the embeddings endpoint: at most 2048 inputs and 300,000 tokens per request, at most
8192 tokens per input, no empty input. Tokens are counted exactly and offline with cl100k_base
(`ragstream.tokens`), so a request is never refused for its size. An input over 8192 tokens or
an empty one is refused here with a `PermanentError` naming it: splitting is the chunker's job.

`pack` spreads the inputs over as few requests as it can (both limits at once); the requests of
one `embed` call run concurrently (`max_concurrency`), each after the rate limiter allows it,
and the vectors come back in input order (by each item's `index`). Usage is what the API reports
(`usage.prompt_tokens`). The SDK's own retries are off (`max_retries=0`): the consumer runtime
owns retries, from the errors this module raises:

    429 insufficient_quota                     PermanentError (no credit left; retrying cannot help)
    other 429                                  RetryableError, retry_after from retry-after(-ms)
    408, 409, 5xx, connection lost, timeout    RetryableError
    other 4xx                                  PermanentError
"""

from __future__ import annotations

import array
import asyncio
import base64
import heapq
import math
import sys
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import httpx
import openai

from ragstream import tracing
from ragstream.cost.meter import Meter, metered
from ragstream.errors import ConfigError, PermanentError, RagstreamError, RetryableError
from ragstream.providers.embed.port import Embedder, EmbedResult
from ragstream.providers.ratelimit import HEADER_PREFIX, RateLimiter, retry_after_from
from ragstream.settings import OpenAISettings
from ragstream.tokens import Tokenizer, get_tokenizer

MAX_INPUTS: Final = 2048
MAX_INPUT_TOKENS: Final = 8192
MAX_REQUEST_TOKENS: Final = 300_000
PROVIDER: Final = "openai"

T = TypeVar("T")


class InsufficientQuotaError(PermanentError):
    """The OpenAI account has no credit left (429 `insufficient_quota`)."""


# -- packing -----------------------------------------------------------------------------------


def minimum_requests(
    token_counts: Sequence[int],
    *,
    max_inputs: int = MAX_INPUTS,
    max_tokens: int = MAX_REQUEST_TOKENS,
) -> int:
    """The lower bound: no packing can use fewer requests than this."""
    if not token_counts:
        return 0
    return max(math.ceil(len(token_counts) / max_inputs), math.ceil(sum(token_counts) / max_tokens))


def pack(
    token_counts: Sequence[int],
    *,
    max_inputs: int = MAX_INPUTS,
    max_tokens: int = MAX_REQUEST_TOKENS,
) -> list[list[int]]:
    """Input indices grouped into requests of at most `max_inputs` inputs and `max_tokens` tokens.

    Tries k = the lower bound, then k + 1, ... requests: inputs largest first, each to the
    request with the fewest tokens that still has room for another input (longest-processing-
    time scheduling, which keeps every request within one input of the average). Inputs are
    small next to a request (8192 against 300,000), so k = lower bound or lower bound + 1
    succeeds in practice. Within a request the indices are in input order.
    """
    if any(count > max_tokens or count < 0 for count in token_counts):
        raise ValueError(f"every count must be between 0 and {max_tokens}")
    if not token_counts:
        return []
    order = sorted(range(len(token_counts)), key=lambda i: token_counts[i], reverse=True)
    k = minimum_requests(token_counts, max_inputs=max_inputs, max_tokens=max_tokens)
    while True:
        groups = _assign(order, token_counts, k, max_inputs, max_tokens)
        if groups is not None:
            return [sorted(group) for group in groups if group]
        k += 1


def _assign(
    order: list[int], counts: Sequence[int], k: int, max_inputs: int, max_tokens: int
) -> list[list[int]] | None:
    groups: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, g) for g in range(k)]  # (tokens, group) of groups with room for one more input
    for i in order:
        if not heap:
            return None
        tokens, g = heapq.heappop(heap)
        tokens += counts[i]
        if tokens > max_tokens:
            return None
        groups[g].append(i)
        if len(groups[g]) < max_inputs:
            heapq.heappush(heap, (tokens, g))
    return groups


# -- the embedder --------------------------------------------------------------------------------


NO_KEY = "none"  # what the client sends to a server that asks for no key


def _is_openai(base_url: str) -> bool:
    return urlsplit(base_url).hostname == "api.openai.com"


class OpenAIEmbedder(Embedder):
    """`Embedder` over OpenAI's embeddings endpoint (or anything that speaks it)."""

    def __init__(
        self,
        settings: OpenAISettings,
        *,
        dimensions: int,
        tokenizer: Tokenizer | None = None,
        limiter: RateLimiter | None = None,
        max_concurrency: int = 4,
        client: openai.AsyncOpenAI | None = None,
        meter: Meter | None = None,
    ) -> None:
        if client is None:
            if settings.api_key is None and _is_openai(settings.base_url):
                raise ConfigError(
                    "services.openai.api_key is not set "
                    "(RAGSTREAM_SERVICES__OPENAI__API_KEY) but the OpenAI embedder is in use"
                )
            # A self-hosted server (TEI, Ollama, vLLM) may need no key: the client sends a
            # placeholder it ignores.
            key = settings.api_key.get_secret_value() if settings.api_key else NO_KEY
            client = openai.AsyncOpenAI(
                api_key=key,
                base_url=settings.base_url,
                timeout=settings.timeout_s,
                max_retries=0,
            )
        self._client = client
        self._model = settings.model
        self._dimensions = dimensions
        self._send_dimensions = settings.send_dimensions
        self._timeout_s = settings.timeout_s
        self._tokenizer = tokenizer or get_tokenizer()
        self.limiter = limiter if limiter is not None else RateLimiter()
        self._slots = asyncio.Semaphore(max_concurrency)
        self.requests_made = 0  # HTTP requests sent, for metrics and benchmarks
        self.rate_limit_headers: dict[str, str] = {}  # the last response's x-ratelimit-*
        self.meter = meter  # prices each request, refuses one over budget, publishes usage

    @property
    def name(self) -> str:
        return PROVIDER

    @property
    def model(self) -> str:
        return self._model

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def aclose(self) -> None:
        await self._client.close()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Exact cl100k_base counts; refuses empty inputs and inputs over 8192 tokens.

        A refusal names the input by its position in `texts` ("chunk 3"), with its count.
        """
        counts: list[int] = []
        for index, text in enumerate(texts):
            if not text:
                raise PermanentError(
                    f"chunk {index} is an empty string: OpenAI refuses empty input"
                )
            count = self._tokenizer.count(text)
            if count > MAX_INPUT_TOKENS:
                raise PermanentError(
                    f"chunk {index} has {count} tokens, over the {MAX_INPUT_TOKENS}-token limit "
                    f"of {self._model} per input: the chunker must split it "
                    f"(it starts {text[:40]!r})"
                )
            counts.append(count)
        return counts

    async def embed(self, texts: list[str]) -> EmbedResult:
        if not texts:
            return EmbedResult(vectors=[], token_count=0, provider=PROVIDER, model=self._model)
        if len(texts) > 64:  # tiktoken releases the GIL: keep the event loop free on big calls
            counts = await asyncio.to_thread(self.count_tokens, texts)
        else:
            counts = self.count_tokens(texts)
        batches = pack(counts)
        results = await _all(
            [
                self._request([texts[i] for i in batch], sum(counts[i] for i in batch))
                for batch in batches
            ]
        )
        vectors: list[list[float]] = [[] for _ in texts]
        usage = 0
        for batch, (batch_vectors, batch_usage) in zip(batches, results, strict=True):
            usage += batch_usage
            for i, vector in zip(batch, batch_vectors, strict=True):
                vectors[i] = vector
        return EmbedResult(vectors=vectors, token_count=usage, provider=PROVIDER, model=self._model)

    async def _request(self, inputs: list[str], tokens: int) -> tuple[list[list[float]], int]:
        # The budget is asked first (BudgetExceeded: the request is not sent), then the limiter.
        async with self._slots, metered(self.meter, tokens) as bill:
            await self.limiter.acquire(tokens)
            self.requests_made += 1
            request: tracing.Attributes = {
                "gen_ai.operation.name": "embeddings",
                "gen_ai.request.model": self._model,
                "ragstream.inputs": len(inputs),
                "ragstream.tokens": tokens,
            }
            try:
                with tracing.call("openai embeddings", request) as span:
                    vectors, reported, request_id = await self._send(inputs)
                    if span is not None and request_id:
                        span.set_attribute("openai.request_id", request_id)
            finally:
                self.limiter.release()
            usage = tokens if reported is None else reported  # a server that reports none
            bill.report(usage, request_id)
            return vectors, usage

    async def _send(self, inputs: list[str]) -> tuple[list[list[float]], int | None, str | None]:
        try:
            sized: dict[str, Any] = (
                {"dimensions": self._dimensions} if self._send_dimensions else {}
            )
            raw = await self._client.embeddings.with_raw_response.create(
                input=inputs, model=self._model, encoding_format="base64", **sized
            )
        except openai.OpenAIError as exc:
            response = getattr(exc, "response", None)
            if isinstance(response, httpx.Response):
                self._observe(response.headers)
            error = translate_error(exc, timeout_s=self._timeout_s)
            if isinstance(error, RetryableError) and error.retry_after:
                self.limiter.block_for(error.retry_after)
            raise error from exc
        self._observe(raw.headers)
        try:
            body = raw.http_response.json()
        except ValueError as exc:
            raise RetryableError("openai: the response is not JSON") from exc
        vectors, usage = self._read(body, len(inputs))
        return vectors, usage, raw.headers.get("x-request-id")

    def _observe(self, headers: httpx.Headers) -> None:
        seen = {k.lower(): v for k, v in headers.items() if k.lower().startswith(HEADER_PREFIX)}
        if seen:
            self.rate_limit_headers = seen
            self.limiter.update_from_headers(seen)

    def _read(self, body: Any, expected: int) -> tuple[list[list[float]], int | None]:
        """Vectors in input order and `usage.prompt_tokens`, from the JSON body.

        The body is read directly rather than through the SDK's models: with base64 vectors that
        saves the SDK's per-vector work (without numpy it looks for numpy once per vector).
        """
        try:
            items = sorted(body["data"], key=lambda item: int(item["index"]))
            indices = [int(item["index"]) for item in items]
            vectors = [_decode(item["embedding"]) for item in items]
            # OpenAI always reports the tokens it bills; some self-hosted servers do not.
            counted = (body.get("usage") or {}).get("prompt_tokens")
            usage = None if counted is None else int(counted)
        except (KeyError, TypeError, ValueError) as exc:
            raise RetryableError(f"openai: malformed embeddings response: {exc!r}") from exc
        if indices != list(range(expected)):
            raise RetryableError(
                f"openai returned {len(items)} embeddings with indices "
                f"{indices[:5]}... for {expected} inputs"
            )
        for vector in vectors:
            if len(vector) != self._dimensions:
                raise PermanentError(
                    f"openai returned {len(vector)}-dimensional vectors, {self._dimensions} asked: "
                    f"does {self._model} support the dimensions parameter?"
                )
        return vectors, usage


def _decode(embedding: Any) -> list[float]:
    """A vector from base64 (little-endian float32, as OpenAI sends it) or a JSON list."""
    if isinstance(embedding, str):
        values = array.array("f", base64.b64decode(embedding))
        if sys.byteorder == "big":
            values.byteswap()
        return values.tolist()
    return [float(x) for x in embedding]


async def _all(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Run the calls concurrently; on the first error cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# -- errors --------------------------------------------------------------------------------------


def translate_error(exc: openai.OpenAIError, *, timeout_s: float | None = None) -> RagstreamError:
    """An openai SDK error as the ragstream error that says what the caller must do."""
    if isinstance(exc, openai.APITimeoutError):
        after = f" after {timeout_s:g}s" if timeout_s else ""
        return RetryableError(f"openai: the request timed out{after}")
    if isinstance(exc, openai.APIConnectionError):
        return RetryableError(f"openai: connection failed: {exc.__cause__ or exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = _message(exc)
        retry_after = retry_after_from(exc.response.headers)
        if status == 429:
            if "insufficient_quota" in (exc.code, exc.type):
                return InsufficientQuotaError(
                    f"openai: insufficient_quota: the account has no credit left, retrying "
                    f"cannot help until it is topped up ({message})"
                )
            return RetryableError(f"openai: rate limited (429): {message}", retry_after=retry_after)
        if status >= 500 or status in (408, 409):
            return RetryableError(f"openai: HTTP {status}: {message}", retry_after=retry_after)
        return PermanentError(f"openai: HTTP {status}: {message}")
    if isinstance(exc, openai.APIResponseValidationError):
        return RetryableError(f"openai: malformed response: {exc}")
    return PermanentError(f"openai: {type(exc).__name__}: {exc}")


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping) and isinstance(body.get("message"), str):
        return str(body["message"])
    return str(exc.message)
