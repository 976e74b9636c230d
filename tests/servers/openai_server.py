"""A local server speaking OpenAI's embeddings API, with faults on demand.

POST /v1/embeddings takes what OpenAI takes (`input` a string or a list of strings, `model`,
`dimensions`, `encoding_format` float or base64) and answers what OpenAI answers: vectors of the
requested dimensions (deterministic per model and text, unit length, float32 values, so both
encodings carry the same numbers), `usage.prompt_tokens` counted with cl100k_base, and the
`x-ratelimit-*` headers of its own request and token buckets. It enforces the API's limits
(2048 inputs, 8192 tokens per input, 300,000 per request, no empty input) with a 400, so a
client that packs badly is caught.

Faults, injected for the next requests in order: `Fault.rate_limit()` (429 rate_limit_exceeded
with retry-after), `Fault.insufficient_quota()` (429 insufficient_quota), `Fault.http(500)`,
`Fault.delay(s)` (answer late: past the client's timeout it is a timeout); or for every request
during a while with `fail_for(seconds, fault)`. `latency_s` delays every answer. Every request
is recorded in `calls` (inputs, tokens, status, vectors returned).
"""

from __future__ import annotations

import array
import asyncio
import base64
import hashlib
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ragstream.tokens import get_tokenizer
from tests.servers import BackgroundServer, go_duration

MAX_INPUTS = 2048
MAX_INPUT_TOKENS = 8192
MAX_REQUEST_TOKENS = 300_000
NATIVE_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072}


@dataclass(frozen=True)
class Fault:
    kind: Literal["rate_limit", "insufficient_quota", "status", "delay"]
    status: int = 500
    retry_after_s: float | None = None
    delay_s: float = 0.0

    @classmethod
    def rate_limit(cls, retry_after_s: float | None = 0.05) -> Fault:
        return cls("rate_limit", status=429, retry_after_s=retry_after_s)

    @classmethod
    def insufficient_quota(cls) -> Fault:
        return cls("insufficient_quota", status=429)

    @classmethod
    def http(cls, status: int) -> Fault:
        return cls("status", status=status)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        return cls("delay", delay_s=seconds)


@dataclass
class Call:
    """One request as the server saw it."""

    at: float
    status: int
    inputs: list[str]
    tokens: int
    model: str | None = None
    dimensions: int | None = None
    reason: str = ""  # why it was refused: "rate_limit", "insufficient_quota", "invalid", ...
    vectors: list[list[float]] = field(default_factory=list)


def vector_for(model: str, text: str, dimensions: int) -> list[float]:
    """The server's embedding of `text`: deterministic, unit length, float32 values."""
    digest = hashlib.shake_256(f"{model}\x00{dimensions}\x00{text}".encode()).digest(2 * dimensions)
    raw = array.array("h", digest)
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return array.array("f", [x / norm for x in raw]).tolist()


class _Bucket:
    def __init__(self, limit: float, window_s: float) -> None:
        self.limit = limit
        self.rate = limit / window_s
        self.level = limit
        self.updated = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (min(amount, self.limit) - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.limit - self.level) / self.rate


class OpenAIServer(BackgroundServer):
    """OpenAI's POST /v1/embeddings on 127.0.0.1, with rate limits and faults on demand."""

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        window_s: float = 60.0,
        latency_s: float = 0.0,
        port: int | None = None,
        echo_credentials: bool = False,
        fixed_dimensions: dict[str, int] | None = None,
    ) -> None:
        """`api_key` None: no authentication, as a self-hosted server (TEI, Ollama) runs.
        `fixed_dimensions`: models served at one size that refuse the `dimensions` parameter
        (400), as vLLM does for a model without Matryoshka training."""
        super().__init__(
            Starlette(routes=[Route("/v1/embeddings", self._embeddings, methods=["POST"])]),
            port=port,
        )
        self.api_key = api_key
        self.echo_credentials = echo_credentials  # a careless server: 401 quotes what it got
        self.fixed_dimensions = dict(fixed_dimensions or {})
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self._requests = _Bucket(requests_per_minute, window_s) if requests_per_minute else None
        self._tokens = _Bucket(tokens_per_minute, window_s) if tokens_per_minute else None
        self.faults: deque[Fault] = deque()
        self._storm: tuple[float, Fault] | None = None  # (until, fault)
        self.calls: list[Call] = []
        self._tokenizer = get_tokenizer()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def inject(self, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self.faults.extend([fault] * times)

    def fail_for(self, seconds: float, fault: Fault) -> None:
        """Answer every request with `fault` for the next `seconds` (a storm), after the faults
        injected one by one; `calm()` ends it early."""
        with self._lock:
            self._storm = (time.monotonic() + seconds, fault)

    def calm(self) -> None:
        """End a storm now."""
        with self._lock:
            self._storm = None

    def ok_calls(self) -> list[Call]:
        return [c for c in self.calls if c.status == 200]

    def refused(self, reason: str) -> int:
        return sum(1 for c in self.calls if c.reason == reason)

    def returned(self) -> dict[str, list[float]]:
        """Every text the server embedded, with the vector it returned."""
        return {t: v for c in self.ok_calls() for t, v in zip(c.inputs, c.vectors, strict=True)}

    # -- the endpoint ---------------------------------------------------------------------------

    async def _embeddings(self, request: Request) -> JSONResponse:
        now = time.monotonic()
        authorization = request.headers.get("authorization", "")
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            self.calls.append(Call(now, 401, [], 0, reason="auth"))
            message = "Incorrect API key provided."
            if self.echo_credentials:
                key = authorization.removeprefix("Bearer ")
                message = f"Incorrect API key provided: {key} (Authorization: {authorization})"
            return _error(401, message, "invalid_request_error", "invalid_api_key")
        body: dict[str, Any] = await request.json()
        raw_input = body.get("input")
        inputs = [raw_input] if isinstance(raw_input, str) else list(raw_input or [])
        model = str(body.get("model", ""))
        if model in self.fixed_dimensions and body.get("dimensions") is not None:
            self.calls.append(Call(now, 400, [], 0, model, reason="dimensions"))
            message = f"Model {model} does not support matryoshka representation"
            return _error(400, message, "invalid_request_error", None)
        native = {**NATIVE_DIMENSIONS, **self.fixed_dimensions}
        dimensions = body.get("dimensions") or native.get(model, 1536)
        counts = [self._tokenizer.count(text) for text in inputs]
        call = Call(now, 200, inputs, sum(counts), model, dimensions)
        self.calls.append(call)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

        with self._lock:
            fault = self.faults.popleft() if self.faults else self._storm_fault(now)
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.delay_s)
        elif fault is not None:
            return self._fault(call, fault)

        invalid = self._invalid(inputs, counts)
        if invalid:
            call.status, call.reason = 400, "invalid"
            return _error(400, invalid, "invalid_request_error", None)

        headers, wait = self._take(1, call.tokens)
        if wait is not None:
            call.status, call.reason = 429, "rate_limit"
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            return _error(
                429,
                f"Rate limit reached for {model}: please try again in {go_duration(wait)}.",
                "requests",
                "rate_limit_exceeded",
                headers,
            )

        vectors = [vector_for(model, text, dimensions) for text in inputs]
        call.vectors = vectors
        base64_out = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (
                    base64.b64encode(array.array("f", vector).tobytes()).decode()
                    if base64_out
                    else vector
                ),
            }
            for i, vector in reversed(list(enumerate(vectors)))  # order comes from `index`
        ]
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": call.tokens, "total_tokens": call.tokens},
        }
        return JSONResponse(payload, headers=headers)

    def _storm_fault(self, now: float) -> Fault | None:
        if self._storm is None or now >= self._storm[0]:
            return None
        return self._storm[1]

    def _fault(self, call: Call, fault: Fault) -> JSONResponse:
        call.status = fault.status
        if fault.kind == "insufficient_quota":
            call.reason = "insufficient_quota"
            return _error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            )
        if fault.kind == "rate_limit":
            call.reason = "injected_rate_limit"
            headers = {}
            if fault.retry_after_s is not None:
                headers["retry-after-ms"] = str(round(fault.retry_after_s * 1000))
            return _error(429, "Rate limit reached.", "requests", "rate_limit_exceeded", headers)
        call.reason = f"injected_{fault.status}"
        return _error(
            fault.status,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )

    def _invalid(self, inputs: list[str], counts: list[int]) -> str | None:
        if not inputs:
            return "'input' is required"
        if len(inputs) > MAX_INPUTS:
            return f"'input' : maximum {MAX_INPUTS} inputs, got {len(inputs)}"
        for i, (text, count) in enumerate(zip(inputs, counts, strict=True)):
            if not text:
                return f"'input'[{i}] : input cannot be an empty string"
            if count > MAX_INPUT_TOKENS:
                return (
                    f"This model's maximum context length is {MAX_INPUT_TOKENS} tokens, "
                    f"however you requested {count} tokens (input {i})"
                )
        if sum(counts) > MAX_REQUEST_TOKENS:
            return f"Requested {sum(counts)} tokens, max {MAX_REQUEST_TOKENS} tokens per request"
        return None

    def _take(self, requests: int, tokens: int) -> tuple[dict[str, str], float | None]:
        """Take from the buckets; the rate-limit headers, and the wait when refused."""
        with self._lock:
            now = time.monotonic()
            waits = []
            for bucket, amount in ((self._requests, requests), (self._tokens, tokens)):
                if bucket is not None:
                    bucket.refill(now)
                    waits.append(bucket.wait_for(amount))
            refused = max(waits, default=0.0) > 0
            if not refused:
                if self._requests is not None:
                    self._requests.level -= requests
                if self._tokens is not None:
                    self._tokens.level -= min(tokens, self._tokens.limit)
            headers: dict[str, str] = {}
            for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
                if bucket is not None:
                    headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.limit))
                    headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
                    headers[f"x-ratelimit-reset-{kind}"] = go_duration(bucket.reset_s())
            return headers, (max(waits) if refused else None)


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
