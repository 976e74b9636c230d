"""Circuit breaker thresholds per service: configured, validated, and what `breaker_for` builds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragstream.cli import app
from ragstream.errors import ConfigError
from ragstream.providers.circuit import CircuitBreaker, CircuitState
from ragstream.providers.select import breaker_for
from ragstream.settings import load_settings

SERVICES = ("openai", "llamaparse")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RAGSTREAM_"):
            monkeypatch.delenv(key)


def policy(breaker: CircuitBreaker) -> tuple[str, int, float, float]:
    return (breaker.name, breaker.failure_threshold, breaker.window_s, breaker.cooldown_s)


@pytest.mark.parametrize("service", SERVICES)
def test_defaults_are_five_failures_in_a_minute_then_thirty_seconds_open(service: str) -> None:
    settings = load_settings()
    section = getattr(settings.services, service)
    assert (section.circuit_failures, section.circuit_window_s, section.circuit_open_s) == (
        5,
        60.0,
        30.0,
    )
    assert policy(breaker_for(settings, service)) == (service, 5, 60.0, 30.0)


def test_each_service_is_configured_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSTREAM_SERVICES__OPENAI__CIRCUIT_FAILURES", "2")
    monkeypatch.setenv("RAGSTREAM_SERVICES__OPENAI__CIRCUIT_WINDOW_S", "10")
    monkeypatch.setenv("RAGSTREAM_SERVICES__OPENAI__CIRCUIT_OPEN_S", "0.5")
    settings = load_settings()
    assert policy(breaker_for(settings, "openai")) == ("openai", 2, 10.0, 0.5)
    assert policy(breaker_for(settings, "llamaparse")) == ("llamaparse", 5, 60.0, 30.0)


def test_a_config_file_sets_the_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "prod.toml"
    extra.write_text(
        "[services.llamaparse]\ncircuit_failures = 20\ncircuit_window_s = 300\n"
        "circuit_open_s = 120\n"
    )
    monkeypatch.setenv("RAGSTREAM_CONFIG", str(extra))
    settings = load_settings()
    assert policy(breaker_for(settings, "llamaparse")) == ("llamaparse", 20, 300.0, 120.0)
    assert settings.services.llamaparse.max_jobs_in_flight == 16  # the rest stays as it was


def test_the_built_breaker_follows_the_configured_policy() -> None:
    settings = load_settings(
        services={"openai": {"circuit_failures": 2, "circuit_window_s": 10, "circuit_open_s": 5}}
    )
    breaker = breaker_for(settings, "openai")
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert 4.0 < breaker.retry_after() <= 5.0


def test_an_unknown_service_has_no_breaker() -> None:
    with pytest.raises(ValueError, match="no circuit breaker for 'cohere'"):
        breaker_for(load_settings(), "cohere")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("circuit_failures", "0", "greater than or equal to 1"),
        ("circuit_failures", "many", "valid integer"),
        ("circuit_window_s", "0", "greater than 0"),
        ("circuit_open_s", "-1", "greater than 0"),
    ],
)
@pytest.mark.parametrize("service", SERVICES)
def test_a_wrong_threshold_is_one_line_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, service: str, key: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"RAGSTREAM_SERVICES__{service.upper()}__{key.upper()}", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert f"services.{service}.{key}" in text and message in text
    assert "\n" not in text


def test_the_cli_refuses_a_wrong_threshold_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAGSTREAM_SERVICES__OPENAI__CIRCUIT_OPEN_S", "0")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "services.openai.circuit_open_s" in result.output
    assert "Traceback" not in result.output


def test_config_show_lists_the_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSTREAM_SERVICES__LLAMAPARSE__CIRCUIT_OPEN_S", "45")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "circuit_open_s" in result.output and "45" in result.output
