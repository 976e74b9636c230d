"""Which provider serves a service: `real`, `local` or `hybrid`, each behind its circuit breaker.

    real     the real provider behind its breaker: while the circuit is open a call fails at
             once with `CircuitOpenError` (retryable), so errors turn into retries
    local    the local provider, no network
    hybrid   the real provider first; the local one when the circuit is open, or when a call
             fails retryably and that failure opens the circuit (a lone failure below the
             threshold is raised, so the record is retried on the real provider), and when
             the budget refuses the real call (`BudgetExceeded`: the service is throttled)

Results say who produced them (`EmbedResult.provider` and `.model`, `ParseResult.parser`), so a
hybrid caller stores the truth. A `PermanentError` from the real provider (bad input, no quota)
is raised as it is: it is not the service being down, and a fallback would hide it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ragstream.control import EMBED_SERVICE, PARSE_SERVICE
from ragstream.cost.meter import Meter
from ragstream.errors import BudgetExceeded, RetryableError
from ragstream.providers.circuit import CircuitBreaker, CircuitOpenError, CircuitState
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.embed.port import Embedder, EmbedResult
from ragstream.providers.parse.local import LocalParser
from ragstream.providers.parse.port import Parser, ParseResult
from ragstream.providers.ratelimit import RateLimiter
from ragstream.settings import LlamaParseSettings, Mode, OpenAISettings, Settings

R = TypeVar("R")


def breaker_for(settings: Settings, service: str) -> CircuitBreaker:
    """The breaker of `service` with its configured policy: `services.<service>.circuit_failures`
    failures within `circuit_window_s` open it for `circuit_open_s` (5 in 60 s, 30 s)."""
    sections: dict[str, LlamaParseSettings | OpenAISettings] = {
        EMBED_SERVICE: settings.services.openai,
        PARSE_SERVICE: settings.services.llamaparse,
    }
    if service not in sections:
        raise ValueError(f"no circuit breaker for {service!r}: one of {sorted(sections)}")
    policy = sections[service]
    return CircuitBreaker(
        service,
        failure_threshold=policy.circuit_failures,
        window_s=policy.circuit_window_s,
        cooldown_s=policy.circuit_open_s,
    )


def embedder_for(
    settings: Settings,
    mode_override: Mode | None = None,
    *,
    breaker: CircuitBreaker | None = None,
    limiter: RateLimiter | None = None,
    meter: Meter | None = None,
) -> Embedder:
    """The embedder for the configured (or overriding) mode of `services.openai`."""
    mode = Mode(mode_override or settings.services.openai.mode)
    local = LocalEmbedder(settings.embed.dimensions)
    if mode is Mode.LOCAL:
        return local
    from ragstream.providers.embed.openai import OpenAIEmbedder

    real = OpenAIEmbedder(
        settings.services.openai,
        dimensions=settings.embed.dimensions,
        limiter=limiter,
        meter=meter,
    )
    guard = breaker or breaker_for(settings, EMBED_SERVICE)
    return GuardedEmbedder(real, guard, fallback=local if mode is Mode.HYBRID else None)


def parser_for(
    settings: Settings,
    mode_override: Mode | None = None,
    *,
    breaker: CircuitBreaker | None = None,
    meter: Meter | None = None,
    credits_per_page: float = 3.0,
) -> Parser:
    """The parser for the configured (or overriding) mode of `services.llamaparse`."""
    mode = Mode(mode_override or settings.services.llamaparse.mode)
    local = LocalParser(settings.parse)
    if mode is Mode.LOCAL:
        return local
    from ragstream.providers.parse.llamaparse import LlamaParseParser

    real = LlamaParseParser(
        settings.services.llamaparse,
        max_bytes=settings.parse.max_bytes,
        meter=meter,
        credits_per_page=credits_per_page,
    )
    guard = breaker or breaker_for(settings, PARSE_SERVICE)
    return GuardedParser(real, guard, fallback=local if mode is Mode.HYBRID else None)


class _Guard:
    """The shared call policy of the guarded embedder and parser."""

    operation = "call"  # what the external-call metrics name it

    def __init__(self, primary: Any, breaker: CircuitBreaker, fallback: Any | None) -> None:
        self.primary = primary
        self.breaker = breaker
        self.fallback = fallback

    async def aclose(self) -> None:
        await self.primary.aclose()
        if self.fallback is not None:
            await self.fallback.aclose()

    def _use_primary(self) -> bool:
        if self.breaker.allow():
            return True
        if self.fallback is None:
            raise CircuitOpenError(self.breaker.name, self.breaker.retry_after())
        return False

    async def _call(
        self, primary: Callable[[], Awaitable[R]], fallback: Callable[[], Awaitable[R]]
    ) -> R:
        """The primary call under the breaker; the fallback while the circuit is open, when a
        retryable failure has just opened it, or when the budget refused the call."""
        if self._use_primary():
            started = time.perf_counter()
            try:
                result = await primary()
            except BudgetExceeded:
                # Not the service failing: the call was never made. Hybrid serves it locally.
                self.breaker.release()
                if self.fallback is None:
                    raise
            except Exception as exc:
                self._observe(type(exc).__name__, started)
                if not self._after_failure(exc):
                    raise
            except BaseException:
                self.breaker.release()
                raise
            else:
                self._observe("ok", started)
                self.breaker.record_success()
                return result
        assert self.fallback is not None
        return await fallback()

    def _observe(self, status: str, started: float) -> None:
        self.breaker.record_call(self.operation, status, time.perf_counter() - started)

    def _after_failure(self, exc: Exception) -> bool:
        """Record the outcome of a failed primary call; True when the fallback should run."""
        if isinstance(exc, RetryableError):
            self.breaker.record_failure()
            return self.fallback is not None and self.breaker.state is not CircuitState.CLOSED
        self.breaker.record_success()  # the service answered: the input was at fault
        return False


class GuardedEmbedder(_Guard, Embedder):
    """An `Embedder` behind a circuit breaker; with a fallback, the hybrid embedder."""

    operation = "embeddings"

    primary: Embedder
    fallback: Embedder | None

    def __init__(
        self, primary: Embedder, breaker: CircuitBreaker, fallback: Embedder | None = None
    ) -> None:
        if fallback is not None and fallback.dimensions != primary.dimensions:
            raise ValueError(
                f"fallback embedder has {fallback.dimensions} dimensions, "
                f"the primary {primary.dimensions}"
            )
        super().__init__(primary, breaker, fallback)

    @property
    def name(self) -> str:
        return "hybrid" if self.fallback is not None else self.primary.name

    @property
    def model(self) -> str:
        return self.primary.model

    @property
    def dimensions(self) -> int:
        return self.primary.dimensions

    async def embed(self, texts: list[str]) -> EmbedResult:
        return await self._call(
            lambda: self.primary.embed(texts),
            lambda: self._fallback().embed(texts),
        )

    def _fallback(self) -> Embedder:
        assert self.fallback is not None
        return self.fallback


class GuardedParser(_Guard, Parser):
    """A `Parser` behind a circuit breaker; with a fallback, the hybrid parser."""

    operation = "parse"

    primary: Parser
    fallback: Parser | None

    def __init__(
        self, primary: Parser, breaker: CircuitBreaker, fallback: Parser | None = None
    ) -> None:
        super().__init__(primary, breaker, fallback)

    @property
    def name(self) -> str:
        return "hybrid" if self.fallback is not None else self.primary.name

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult:
        return await self._call(
            lambda: self.primary.parse(data, filename=filename, content_type=content_type),
            lambda: self._fallback().parse(data, filename=filename, content_type=content_type),
        )

    def _fallback(self) -> Parser:
        assert self.fallback is not None
        return self.fallback
