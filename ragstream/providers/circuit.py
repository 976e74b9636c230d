"""A circuit breaker per external service: closed, open, half-open.

    CLOSED  ── `failure_threshold` failures within `window_s` ──►  OPEN
    OPEN    ── `cooldown_s` elapsed (seen on the next look) ────►  HALF_OPEN
    HALF_OPEN ── the one probe call succeeds ──────────────────►  CLOSED
    HALF_OPEN ── the one probe call fails ─────────────────────►  OPEN (cool-down restarts)

Only failures that say "the service is unwell" count: by default `RetryableError` (timeouts,
429, 5xx, lost connections). A `PermanentError` means the service answered, so it counts as a
success. While open, `call` raises `CircuitOpenError` (retryable, `retry_after` = the rest of
the cool-down) without touching the service; in half-open one caller at a time is let through
as the probe and the others are refused the same way.

The clock is injectable (`clock() -> seconds`, monotonic), so every transition is testable
without sleeping. A listener `(name, old, new)` hears every transition, for logs and metrics.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

import structlog

from ragstream.errors import RetryableError

log = structlog.get_logger(__name__)

T = TypeVar("T")


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


Listener = Callable[[str, CircuitState, CircuitState], None]
CallListener = Callable[[str, str, str, float], None]


class CircuitOpenError(RetryableError):
    """The circuit is open (or its one probe is under way): the call was not attempted."""

    def __init__(self, name: str, retry_after: float) -> None:
        message = (
            f"circuit {name!r} is open: not calling the service for {retry_after:.1f}s"
            if retry_after > 0
            else f"circuit {name!r} is half-open: its one probe call is under way, "
            "not calling the service until it answers"
        )
        super().__init__(message, retry_after=retry_after)
        self.name = name


def _counts_as_failure(exc: BaseException) -> bool:
    return isinstance(exc, RetryableError)


class CircuitBreaker:
    """Closed → open after N failures within a window → half-open after a cool-down."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        window_s: float = 60.0,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        listener: Listener | None = None,
        is_failure: Callable[[BaseException], bool] = _counts_as_failure,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if window_s <= 0 or cooldown_s < 0:
            raise ValueError("window_s must be positive and cooldown_s not negative")
        self.name = name
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._listeners: list[Listener] = [listener] if listener else []
        self._call_listeners: list[CallListener] = []
        self._is_failure = is_failure
        self._state = CircuitState.CLOSED
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probe_in_flight = False

    # -- observation ----------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The state now; an open circuit whose cool-down has passed reads as half-open."""
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._transition(CircuitState.HALF_OPEN)
        return self._state

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_call_listener(self, listener: CallListener) -> None:
        """Hear every call made through this breaker: (service, operation, status, seconds),
        status `ok` or the error's class name (for the external-call metrics)."""
        self._call_listeners.append(listener)

    def record_call(self, operation: str, status: str, seconds: float) -> None:
        for listener in self._call_listeners:
            listener(self.name, operation, status, seconds)

    def retry_after(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    # -- the protocol ---------------------------------------------------------------------------

    def allow(self) -> bool:
        """May a call go to the service now? In half-open, True only for the one probe.

        A caller that got True must report with `record_success`, `record_failure` or
        `release` (when it gave up without an answer, e.g. cancelled).
        """
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._probe_in_flight = False
        if self._state is CircuitState.HALF_OPEN:
            self._failures.clear()
            self._transition(CircuitState.CLOSED)

    def record_failure(self) -> None:
        now = self._clock()
        self._probe_in_flight = False
        if self._state is CircuitState.HALF_OPEN:
            self._open(now)
            return
        if self._state is CircuitState.OPEN:
            return  # a call admitted before the circuit opened has failed too: nothing new
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window_s:
            self._failures.popleft()
        if len(self._failures) >= self.failure_threshold:
            self._open(now)

    def release(self) -> None:
        """Give back an admission that produced no verdict (the call was cancelled)."""
        self._probe_in_flight = False

    def reset(self) -> None:
        """Close the circuit and forget past failures (an operator's override)."""
        self._failures.clear()
        self._probe_in_flight = False
        if self._state is not CircuitState.CLOSED:
            self._transition(CircuitState.CLOSED)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` through the breaker; `CircuitOpenError` when it may not run."""
        if not self.allow():
            raise CircuitOpenError(self.name, self.retry_after())
        try:
            result = await fn()
        except BaseException as exc:
            if isinstance(exc, Exception) and self._is_failure(exc):
                self.record_failure()
            elif isinstance(exc, Exception):
                self.record_success()  # the service answered; the request was at fault
            else:
                self.release()  # cancelled or interrupted: no verdict on the service
            raise
        self.record_success()
        return result

    # -- internals ------------------------------------------------------------------------------

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._failures.clear()
        self._transition(CircuitState.OPEN)

    def _transition(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if old is new:
            return
        log.info("circuit state changed", circuit=self.name, old=old.value, new=new.value)
        for listener in self._listeners:
            listener(self.name, old, new)
