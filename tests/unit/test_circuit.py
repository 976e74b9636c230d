"""The circuit breaker, transition by transition, on a fake clock; and the rate limiter's clock."""

from __future__ import annotations

import asyncio

import pytest

from ragstream.errors import PermanentError, RetryableError
from ragstream.providers.circuit import CircuitBreaker, CircuitOpenError, CircuitState
from ragstream.providers.ratelimit import RateLimiter, parse_duration

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transitions() -> list[tuple[str, CircuitState, CircuitState]]:
    return []


@pytest.fixture
def breaker(
    clock: FakeClock, transitions: list[tuple[str, CircuitState, CircuitState]]
) -> CircuitBreaker:
    return CircuitBreaker(
        "openai",
        failure_threshold=3,
        window_s=10.0,
        cooldown_s=5.0,
        clock=clock,
        listener=lambda name, old, new: transitions.append((name, old, new)),
    )


async def fail() -> None:
    raise RetryableError("503")


async def ok() -> str:
    return "ok"


async def bad_input() -> None:
    raise PermanentError("400")


def open_it(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()


def test_starts_closed_and_lets_calls_through(breaker: CircuitBreaker) -> None:
    assert breaker.state is CLOSED
    assert breaker.allow() and breaker.allow()


def test_closed_to_open_after_threshold_failures_within_window(
    breaker: CircuitBreaker, transitions: list[tuple[str, CircuitState, CircuitState]]
) -> None:
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    breaker.record_failure()
    assert breaker.state is OPEN
    assert transitions == [("openai", CLOSED, OPEN)]
    assert not breaker.allow()


def test_failures_outside_the_window_do_not_count(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(10.5)  # the first two fall out of the 10 s window
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    breaker.record_failure()
    assert breaker.state is OPEN


def test_open_to_half_open_after_cooldown(
    breaker: CircuitBreaker,
    clock: FakeClock,
    transitions: list[tuple[str, CircuitState, CircuitState]],
) -> None:
    open_it(breaker)
    clock.advance(4.9)
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() == 0.0
    assert transitions[-1] == ("openai", OPEN, HALF_OPEN)


def test_half_open_lets_exactly_one_probe_through(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    open_it(breaker)
    clock.advance(5)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else waits for its verdict
    assert not breaker.allow()


def test_half_open_to_closed_when_the_probe_succeeds(
    breaker: CircuitBreaker,
    clock: FakeClock,
    transitions: list[tuple[str, CircuitState, CircuitState]],
) -> None:
    open_it(breaker)
    clock.advance(5)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert [new for _, _, new in transitions] == [OPEN, HALF_OPEN, CLOSED]
    breaker.record_failure()
    breaker.record_failure()  # the failures from before the opening are forgotten
    assert breaker.state is CLOSED


def test_half_open_to_open_when_the_probe_fails_and_cooldown_restarts(
    breaker: CircuitBreaker,
    clock: FakeClock,
    transitions: list[tuple[str, CircuitState, CircuitState]],
) -> None:
    open_it(breaker)
    clock.advance(5)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.advance(5)
    assert breaker.state is HALF_OPEN
    assert [new for _, _, new in transitions] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN]


def test_a_cancelled_probe_frees_the_slot_without_a_verdict(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    open_it(breaker)
    clock.advance(5)
    assert breaker.allow()
    breaker.release()
    assert breaker.state is HALF_OPEN
    assert breaker.allow()


def test_late_failures_while_open_change_nothing(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_it(breaker)
    clock.advance(3)
    breaker.record_failure()  # a call admitted before the opening failed late
    assert breaker.retry_after() == pytest.approx(2.0)


def test_reset_closes(breaker: CircuitBreaker) -> None:
    open_it(breaker)
    breaker.reset()
    assert breaker.state is CLOSED and breaker.allow()


async def test_call_counts_retryable_errors_only(breaker: CircuitBreaker) -> None:
    for _ in range(5):
        with pytest.raises(PermanentError):
            await breaker.call(bad_input)  # the service answered: not its failure
    assert breaker.state is CLOSED
    for _ in range(3):
        with pytest.raises(RetryableError):
            await breaker.call(fail)
    assert breaker.state is OPEN


async def test_call_refuses_with_retry_after_while_open(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    open_it(breaker)
    clock.advance(2)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.retryable
    assert info.value.retry_after == pytest.approx(3.0)
    assert "openai" in str(info.value)
    clock.advance(3)
    assert await breaker.call(ok) == "ok"  # the probe
    assert breaker.state is CLOSED


async def test_call_cancelled_probe_is_released(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_it(breaker)
    clock.advance(5)
    task = asyncio.create_task(breaker.call(asyncio.Event().wait))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is HALF_OPEN
    assert await breaker.call(ok) == "ok"


def test_listener_sees_every_transition_in_order(
    breaker: CircuitBreaker,
    clock: FakeClock,
    transitions: list[tuple[str, CircuitState, CircuitState]],
) -> None:
    seen: list[str] = []
    breaker.add_listener(lambda _name, old, new: seen.append(f"{old}->{new}"))
    open_it(breaker)
    clock.advance(5)
    breaker.allow()
    breaker.record_failure()
    clock.advance(5)
    breaker.allow()
    breaker.record_success()
    assert seen == [
        "closed->open",
        "open->half_open",
        "half_open->open",
        "open->half_open",
        "half_open->closed",
    ]
    assert len(transitions) == len(seen)


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", window_s=0)


# -- the rate limiter on the same fake clock ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("17.28s", 17.28),
        ("250us", 0.00025),
        ("2", 2.0),
        ("soon", None),
        ("", None),
        ("1s2x", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


async def test_limiter_waits_for_the_request_budget(clock: FakeClock) -> None:
    limiter = RateLimiter(requests_per_minute=60, clock=clock, sleep=clock.sleep)
    for _ in range(60):
        assert await limiter.acquire() == 0.0
    waited = await limiter.acquire()  # the bucket is empty: one request refills in 1 s
    assert waited == pytest.approx(1.0)


async def test_limiter_waits_for_the_token_budget(clock: FakeClock) -> None:
    limiter = RateLimiter(tokens_per_minute=6000, clock=clock, sleep=clock.sleep)
    assert await limiter.acquire(6000) == 0.0
    assert await limiter.acquire(500) == pytest.approx(5.0)  # 100 tokens/s
    assert await limiter.acquire(100_000) == pytest.approx(60.0)  # capped at a full bucket


async def test_limiter_learns_from_headers(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    assert await limiter.acquire(10**6) == 0.0  # nothing known yet: no limit
    limiter.release()
    limiter.update_from_headers(
        {
            "X-RateLimit-Limit-Requests": "100",
            "X-RateLimit-Remaining-Requests": "0",
            "X-RateLimit-Reset-Requests": "10s",  # 100 back in 10 s; counted as 99 to be safe
            "x-ratelimit-limit-tokens": "1000000",
            "x-ratelimit-remaining-tokens": "999000",
            "x-ratelimit-reset-tokens": "60ms",
        }
    )
    assert await limiter.acquire(10) == pytest.approx(10 / 99)
    assert limiter.headers["x-ratelimit-limit-requests"] == "100"


async def test_limiter_headers_never_raise_the_local_count(clock: FakeClock) -> None:
    limiter = RateLimiter(requests_per_minute=60, clock=clock, sleep=clock.sleep)
    for _ in range(60):
        await limiter.acquire()
    limiter.update_from_headers(
        {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59"}
    )  # a late answer from before the burst
    assert await limiter.acquire() == pytest.approx(1.0)


async def test_limiter_block_for_holds_everyone(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    limiter.block_for(2.5)
    assert await limiter.acquire() == pytest.approx(2.5)
    limiter.release()
    assert await limiter.acquire() == 0.0


async def test_limiter_learns_one_request_at_a_time(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    second = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not second.done()  # nothing known yet: the first request must answer first
    limiter.update_from_headers(
        {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9"}
    )
    await asyncio.wait_for(second, 1)
    assert limiter.in_flight == 2
    limiter.release()
    limiter.release()
    assert limiter.in_flight == 0


async def test_limiter_without_headers_stops_learning_after_one_answer(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    second = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    limiter.release()  # answered without rate-limit headers: nothing to learn
    await asyncio.wait_for(second, 1)
    for _ in range(100):
        assert await limiter.acquire() == 0.0


async def test_a_caller_refused_during_the_probe_is_told_so(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    open_it(breaker)
    clock.advance(5)
    assert breaker.allow()  # the probe is out
    with pytest.raises(
        CircuitOpenError, match="half-open: its one probe call is under way"
    ) as info:
        await breaker.call(ok)
    assert info.value.retryable and info.value.retry_after == 0.0
