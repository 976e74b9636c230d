"""A client-side rate limiter with per-minute request and token budgets, fed by the API.

Each budget is a bucket that refills continuously, as OpenAI's limits do: capacity `limit`,
refill `limit / 60` per second unless the headers say otherwise. `acquire(tokens)` waits until
both buckets hold enough, then takes from them, so a stage slows down before the server starts
answering 429. The limits need not be configured: every response's headers feed the buckets

    x-ratelimit-limit-requests / -tokens       the capacity
    x-ratelimit-remaining-requests / -tokens   what is left now (for the whole API key,
                                               so other workers' use is seen too)
    x-ratelimit-reset-requests / -tokens       time until full again, in OpenAI's Go-style
                                               durations ("1s", "6m0s", "20ms", "1h2m3.5s")

and the refill rate is taken from them: (limit - remaining) / reset. A header never raises
the local estimate above what this process has counted (responses arrive late and out of
order; being conservative is what keeps the server from saying 429). A 429 with `retry-after`
is passed on with `block_for`, which holds every caller back for that long.

Every `acquire` is paired with a `release()` when its request is over, answered or not. With no
limits configured, the limiter learns them first: it lets one request through at a time until
headers arrive (or a request ends without any: the service sends none, and the budgets stay
unlimited); otherwise a first burst would go out before anything was counted. The clock and
sleep are injectable for tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final

HEADER_PREFIX: Final = "x-ratelimit-"
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)")
_UNIT_SECONDS: Final = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(value: str) -> float | None:
    """OpenAI's reset durations ("6m0s", "20ms", "1.5s", "0s") or a bare number of seconds."""
    text = value.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if position == len(text) else None


def retry_after_from(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    value = lowered.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


@dataclass(slots=True)
class _Bucket:
    """A continuously refilled budget; `limit is None` means no limit is known."""

    limit: float | None = None
    rate: float = 0.0  # per second
    level: float = 0.0
    updated: float = 0.0

    def refill(self, now: float) -> None:
        if self.limit is None:
            return
        if now > self.updated:
            self.level = min(self.limit, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def needs(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is now; inf when it never will be)."""
        if self.limit is None:
            return 0.0
        amount = min(amount, self.limit)  # more than a minute's worth: wait for a full bucket
        missing = amount - self.level
        if missing <= 1e-9 * max(1.0, amount):  # float dust is not a reason to wait
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf

    def take(self, amount: float) -> None:
        if self.limit is not None:
            self.level -= min(amount, self.limit)

    def observe(
        self, now: float, limit: float | None, remaining: float | None, reset: float | None
    ) -> None:
        self.refill(now)
        if limit is not None and limit > 0:
            if self.limit is None:
                self.level = limit  # first sight: start full, the remaining header trims it
                self.updated = now
            self.limit = limit
            self.level = min(self.level, limit)
            if self.rate <= 0:
                self.rate = limit / 60.0
        if remaining is not None:
            if self.limit is None:  # remaining without a limit: the best capacity guess we have
                self.limit, self.level, self.updated = remaining, remaining, now
                self.rate = max(self.rate, remaining / 60.0)
            self.level = min(self.level, remaining)
            used = self.limit - remaining
            if reset is not None and reset > 0 and used >= 2:
                # `remaining` is rounded down by the server: one unit less keeps the rate low
                self.rate = (used - 1) / reset


class RateLimiter:
    """Waits before a call until the request and token budgets allow it."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_wait_s: float = 60.0,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._max_wait_s = max_wait_s
        now = clock()
        self._requests = _Bucket()
        self._tokens = _Bucket()
        for bucket, per_minute in (
            (self._requests, requests_per_minute),
            (self._tokens, tokens_per_minute),
        ):
            if per_minute is not None:
                bucket.limit, bucket.level = per_minute, per_minute
                bucket.rate, bucket.updated = per_minute / 60.0, now
        self._blocked_until = 0.0
        self._lock = asyncio.Lock()
        self._learned = requests_per_minute is not None or tokens_per_minute is not None
        self._changed = asyncio.Event()
        self.in_flight = 0  # acquired and not yet released
        self.waited_s = 0.0  # total time callers spent waiting here
        self.headers: dict[str, str] = {}  # the last x-ratelimit-* headers seen

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until one request of `tokens` tokens fits, take it; the seconds waited."""
        waited = 0.0
        async with self._lock:  # first come, first served
            while True:
                if not self._learned and self.in_flight > 0:  # learning: one request at a time
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                now = self._clock()
                self._requests.refill(now)
                self._tokens.refill(now)
                wait = max(
                    self._blocked_until - now,
                    self._requests.needs(1),
                    self._tokens.needs(tokens),
                )
                if wait <= 0:
                    self._requests.take(1)
                    self._tokens.take(tokens)
                    self.in_flight += 1
                    break
                pause = min(max(wait, 0.001), self._max_wait_s)
                await self._sleep(pause)
                waited += pause
        self.waited_s += waited
        return waited

    def release(self) -> None:
        """The request admitted by `acquire` is over (with or without an answer)."""
        self.in_flight = max(0, self.in_flight - 1)
        self._learned = True
        self._changed.set()

    def update_from_headers(self, headers: Mapping[str, str]) -> None:
        """Feed the budgets from a response's `x-ratelimit-*` headers (any case)."""
        seen = {k.lower(): v for k, v in headers.items() if k.lower().startswith(HEADER_PREFIX)}
        if not seen:
            return
        self.headers = seen
        self._learned = True
        self._changed.set()
        now = self._clock()
        for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            reset_header = seen.get(f"{HEADER_PREFIX}reset-{kind}")
            bucket.observe(
                now,
                limit=_number(seen.get(f"{HEADER_PREFIX}limit-{kind}")),
                remaining=_number(seen.get(f"{HEADER_PREFIX}remaining-{kind}")),
                reset=parse_duration(reset_header) if reset_header else None,
            )

    def block_for(self, seconds: float) -> None:
        """Hold every caller back for `seconds` (the server said 429, retry after this)."""
        if seconds > 0:
            self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    def snapshot(self) -> dict[str, float | None]:
        """The current estimate, for logs and metrics."""
        now = self._clock()
        self._requests.refill(now)
        self._tokens.refill(now)
        return {
            "requests_limit": self._requests.limit,
            "requests_available": self._requests.level if self._requests.limit else None,
            "tokens_limit": self._tokens.limit,
            "tokens_available": self._tokens.level if self._tokens.limit else None,
            "blocked_for_s": max(0.0, self._blocked_until - now),
        }
