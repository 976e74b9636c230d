"""`consumers.policy.decide`: one case per exception kind the consumer runtime meets."""

from __future__ import annotations

import random

import asyncpg
import pytest
from aiokafka import errors as kafka_errors

from consumers.policy import (
    WAIT_RECHECK_S,
    DeadLetter,
    Hold,
    Park,
    Retry,
    WaitForInfrastructure,
    backoff_delay,
    decide,
)
from ragstream.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    ClaimCheckRefused,
    ConfigError,
    DecodeError,
    InfrastructureError,
    InfrastructureUnavailable,
    InvalidEvent,
    PermanentError,
    RetryableError,
    TenantConflict,
)
from ragstream.providers.circuit import CircuitOpenError
from ragstream.settings import RetrySettings
from ragstream.store._errors import UniqueViolation, translate

POLICY = RetrySettings(base_s=1.0, factor=2.0, cap_s=60.0, max_attempts=3)


def test_a_poison_pill_is_dead_lettered_at_once() -> None:
    assert decide(DecodeError("bad magic"), 1, POLICY) == DeadLetter("poison")


def test_a_permanent_failure_is_dead_lettered_at_once_whatever_the_attempt() -> None:
    for attempt in (1, 2, 3):
        assert decide(PermanentError("corrupt PDF"), attempt, POLICY) == DeadLetter("permanent")


@pytest.mark.parametrize(
    "exc",
    [
        RetryableError("HTTP 503"),
        RetryableError("HTTP 429"),
        UniqueViolation("another writer won"),
        ValueError("a bug nobody foresaw"),
        TimeoutError(),
    ],
)
def test_retryable_and_unexpected_errors_retry_then_dead_letter(exc: Exception) -> None:
    rng = random.Random(7)
    first = decide(exc, 1, POLICY, rng)
    assert isinstance(first, Retry) and first.attempt == 2
    assert 0.5 <= first.delay_s <= 1.0
    second = decide(exc, 2, POLICY, rng)
    assert isinstance(second, Retry) and second.attempt == 3
    assert 1.0 <= second.delay_s <= 2.0
    assert decide(exc, 3, POLICY, rng) == DeadLetter("exhausted")


def test_a_retry_waits_at_least_what_the_service_asked() -> None:
    action = decide(RetryableError("429", retry_after=30.0), 1, POLICY)
    assert isinstance(action, Retry) and action.delay_s == 30.0


def test_backoff_is_capped() -> None:
    assert backoff_delay(20, POLICY, random.Random(1)) <= POLICY.cap_s


@pytest.mark.parametrize(
    ("exc", "dependency"),
    [
        (InfrastructureUnavailable("database unavailable", dependency="postgres"), "postgres"),
        (translate(asyncpg.exceptions.CannotConnectNowError("starting up")), "postgres"),
        (translate(asyncpg.exceptions.AdminShutdownError("terminating")), "postgres"),
        (translate(ConnectionRefusedError(111, "refused")), "postgres"),
        (translate(TimeoutError()), "postgres"),
        (kafka_errors.KafkaTimeoutError(), "kafka"),
        (kafka_errors.KafkaConnectionError("refused"), "kafka"),
        (kafka_errors.NotLeaderForPartitionError(), "kafka"),
        (kafka_errors.RequestTimedOutError(), "kafka"),
        (kafka_errors.NotEnoughReplicasError(), "kafka"),
        (kafka_errors.TopicAuthorizationFailedError(), "kafka"),
        (InfrastructureError("cannot reach the broker"), ""),
        (AuthenticationFailed("kafka.sasl_username: the broker refuses user 'ragstream'"), ""),
        (ConfigError("postgres.url: bad password"), ""),
    ],
)
def test_our_own_infrastructure_being_away_waits_and_spends_no_attempt(
    exc: BaseException, dependency: str
) -> None:
    for attempt in (1, 3, 99):  # even past max_attempts: an outage is not the record's fault
        assert decide(exc, attempt, POLICY) == WaitForInfrastructure(dependency)


@pytest.mark.parametrize(
    "exc",
    [
        kafka_errors.MessageSizeTooLargeError(),
        kafka_errors.RecordTooLargeError(),
        kafka_errors.CorruptRecordException(),
        kafka_errors.RecordListTooLargeError(),
        kafka_errors.InvalidTimestampError(),
    ],
)
def test_a_record_kafka_refuses_is_dead_lettered(exc: BaseException) -> None:
    assert decide(exc, 1, POLICY) == DeadLetter("permanent")


def test_a_database_race_is_retried_not_waited_for() -> None:
    exc = translate(asyncpg.exceptions.SerializationError("could not serialize"))
    assert isinstance(decide(exc, 1, POLICY), Retry)
    assert decide(exc, 3, POLICY) == DeadLetter("exhausted")


def test_a_service_wide_budget_holds_the_record_in_place() -> None:
    assert decide(BudgetExceeded("throttled", service="openai"), 5, POLICY) == Hold()


def test_a_tenants_budget_parks_the_record_until_its_window_ends() -> None:
    exc = BudgetExceeded("tenant over", service="openai", tenant_id="acme", retry_after=120.0)
    assert decide(exc, 3, POLICY) == Park(120.0)
    soon = BudgetExceeded("tenant over", service="openai", tenant_id="acme", retry_after=0.1)
    assert decide(soon, 1, POLICY) == Park(2.0)  # never sooner than the recheck interval


def test_an_open_circuit_parks_without_spending_an_attempt() -> None:
    exc = CircuitOpenError("openai", retry_after=15.0)
    assert decide(exc, 3, POLICY) == Park(15.0)


@pytest.mark.parametrize(
    "exc",
    [
        InvalidEvent("invalid record key: missing; it must be the document_id"),
        ClaimCheckRefused("claim check refused: outside the tenant's area"),
        TenantConflict("doc-1", "globex"),
    ],
)
def test_what_the_stages_refuse_at_the_door_is_dead_lettered_at_once(exc: Exception) -> None:
    assert decide(exc, 1, POLICY) == DeadLetter("permanent")


def test_bytes_that_do_not_decode_are_poison_not_merely_permanent() -> None:
    assert isinstance(DecodeError("x"), PermanentError)
    assert decide(DecodeError("truncated body"), 3, POLICY) == DeadLetter("poison")


def test_the_last_attempt_is_dead_lettered_whatever_the_service_asked() -> None:
    assert decide(RetryableError("429", retry_after=5.0), 3, POLICY) == DeadLetter("exhausted")
    once = RetrySettings(base_s=1.0, factor=2.0, cap_s=60.0, max_attempts=1)
    assert decide(RetryableError("HTTP 503"), 1, once) == DeadLetter("exhausted")


def test_a_half_open_circuit_parks_for_the_recheck_interval() -> None:
    assert decide(CircuitOpenError("openai", retry_after=0.0), 1, POLICY) == Park(WAIT_RECHECK_S)


def test_a_budget_or_an_open_circuit_never_spends_the_last_attempt() -> None:
    beyond = POLICY.max_attempts + 5
    assert decide(BudgetExceeded("throttled", service="openai"), beyond, POLICY) == Hold()
    assert decide(CircuitOpenError("openai", retry_after=15.0), beyond, POLICY) == Park(15.0)
