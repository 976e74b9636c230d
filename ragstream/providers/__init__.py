"""Real providers of the paid services, and what guards them.

    openai_embedder   OpenAIEmbedder: the openai SDK, requests packed to the API's limits
    llamaparse        LlamaParseParser and JobTracker: LlamaParse's REST API, many jobs in flight
    ratelimit         RateLimiter: per-minute request and token budgets fed by x-ratelimit-*
    circuit           CircuitBreaker: closed, open, half-open, per service
    select            embedder_for / parser_for: real, local or hybrid

The SDK-bound modules (openai, httpx) load only when a real provider is asked for.
"""

from __future__ import annotations

from ragstream.providers.circuit import CircuitBreaker, CircuitOpenError, CircuitState
from ragstream.providers.ratelimit import RateLimiter
from ragstream.providers.select import (
    GuardedEmbedder,
    GuardedParser,
    aclose,
    breaker_for,
    embedder_for,
    parser_for,
)

__all__ = [
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "GuardedEmbedder",
    "GuardedParser",
    "RateLimiter",
    "aclose",
    "breaker_for",
    "embedder_for",
    "parser_for",
]
