"""The failure policy: what the consumer runtime does with a record whose handling raised.

`decide(exc, attempt, policy)` is a pure function of the exception, the attempt it ended and
the retry settings; the runtime carries the answer out and decides nothing itself.

    exception                                    action
    DecodeError (bytes that are no event)        DeadLetter("poison")
    InfrastructureError, ConfigError,            WaitForInfrastructure: hold the record in
      any other KafkaError                         place, probe the dependency, try again;
                                                   no attempt is spent
    BudgetExceeded, service-wide                 Hold: the record waits in place, uncommitted
    BudgetExceeded, one tenant's budget          Park until the tenant's window ends
    CircuitOpenError (the call was not made)     Park until the circuit lets a probe through
    PermanentError, a record Kafka refuses       DeadLetter("permanent")
      (too large, corrupt, bad timestamp)
    RetryableError or anything unexpected        Retry(attempt + 1) with backoff and jitter,
                                                   DeadLetter("exhausted") after max_attempts

Park and Retry go through `<prefix>.retry.<stage>`, so the partition the record came from
goes on at once; Park keeps the attempt number (the call was never made).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from aiokafka import errors as kafka_errors
from aiokafka.errors import KafkaError

from ragstream.errors import (
    KAFKA,
    BudgetExceeded,
    ConfigError,
    DecodeError,
    InfrastructureError,
    InfrastructureUnavailable,
    PermanentError,
)
from ragstream.providers.circuit import CircuitOpenError
from ragstream.settings import RetrySettings

WAIT_RECHECK_S: Final = 2.0  # how soon a record refused without a call is tried again


@dataclass(frozen=True, slots=True)
class Retry:
    """Send to the retry topic, due in `delay_s`, as attempt `attempt`."""

    attempt: int
    delay_s: float


@dataclass(frozen=True, slots=True)
class Park:
    """Wait on the retry topic for `delay_s` without spending an attempt."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep the record where it is (uncommitted, its partition paused); try again later."""

    recheck_s: float = WAIT_RECHECK_S


@dataclass(frozen=True, slots=True)
class WaitForInfrastructure:
    """Our own broker or database does not answer: wait for `dependency`, then try again.

    `dependency` is "postgres", "kafka", or "" when the error does not say which."""

    dependency: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """To the dead-letter topic: `kind` is poison, permanent or exhausted."""

    kind: str


Action = Retry | Park | Hold | WaitForInfrastructure | DeadLetter


def backoff_delay(attempt: int, policy: RetrySettings, rng: random.Random | None = None) -> float:
    """Delay before `attempt + 1`: uniform(d/2, d) with d = min(cap, base * factor**(attempt-1))."""
    ceiling = min(policy.cap_s, policy.base_s * policy.factor ** max(attempt - 1, 0))
    return (rng or random).uniform(ceiling / 2, ceiling)


# What Kafka says of one record alone; any other KafkaError is about the broker or the client.
RECORD_REFUSED: Final[tuple[type[KafkaError], ...]] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
)


def decide(
    exc: BaseException,
    attempt: int,
    policy: RetrySettings,
    rng: random.Random | None = None,
) -> Action:
    """What to do with a record whose `attempt`-th handling raised `exc`."""
    if isinstance(exc, DecodeError):
        return DeadLetter("poison")
    if isinstance(exc, InfrastructureUnavailable):
        return WaitForInfrastructure(exc.dependency)
    if isinstance(exc, InfrastructureError | ConfigError):
        # Our own services, or their settings, are wrong: an operator fixes it; the record
        # is not at fault, so it waits rather than being dead-lettered.
        return WaitForInfrastructure("")
    if isinstance(exc, RECORD_REFUSED):
        return DeadLetter("permanent")
    if isinstance(exc, KafkaError):
        return WaitForInfrastructure(KAFKA)
    if isinstance(exc, BudgetExceeded):
        if exc.tenant_id is None:
            return Hold()
        return Park(max(exc.retry_after or 0.0, WAIT_RECHECK_S))
    if isinstance(exc, CircuitOpenError):
        return Park(max(exc.retry_after or 0.0, WAIT_RECHECK_S))
    if isinstance(exc, PermanentError):
        return DeadLetter("permanent")
    return retry_or_give_up(exc, attempt, policy, rng)


def retry_or_give_up(
    exc: BaseException,
    attempt: int,
    policy: RetrySettings,
    rng: random.Random | None = None,
) -> Retry | DeadLetter:
    """The next attempt with backoff (at least the `retry_after` the error names), or the DLQ
    when `attempt` was the last one."""
    if attempt >= policy.max_attempts:
        return DeadLetter("exhausted")
    retry_after = getattr(exc, "retry_after", None)
    delay = max(retry_after or 0.0, backoff_delay(attempt, policy, rng))
    return Retry(attempt + 1, delay)
