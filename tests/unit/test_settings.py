"""Settings: defaults, environment overrides, secrets only from the environment, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragstream.cli import app
from ragstream.errors import ConfigError
from ragstream.settings import Mode, load_settings, redacted


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RAGSTREAM_"):
            monkeypatch.delenv(key)


def test_defaults_come_from_the_bundled_toml() -> None:
    s = load_settings()
    assert s.kafka.topic_prefix == "ragstream"
    assert s.kafka.partitions == 12
    assert s.services.openai.mode is Mode.LOCAL
    assert str(s.budgets.daily_usd) == "5.00"
    assert s.budgets.hourly_requests == 100
    assert (s.retry.base_s, s.retry.factor, s.retry.cap_s, s.retry.max_attempts) == (
        1.0,
        2.0,
        60.0,
        3,
    )
    # The local servers listen where the clients look, unless told otherwise.
    assert s.devstack.kafka_port == 9092
    assert s.devstack.postgres_port == s.postgres.port


def test_environment_overrides_nested_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSTREAM_KAFKA__PARTITIONS", "24")
    monkeypatch.setenv("RAGSTREAM_SERVICES__OPENAI__MODE", "hybrid")
    monkeypatch.setenv("RAGSTREAM_KAFKA_BOOTSTRAP", "10.0.0.1:19092")
    s = load_settings()
    assert s.kafka.partitions == 24
    assert s.services.openai.mode is Mode.HYBRID
    assert s.kafka.bootstrap_servers == "10.0.0.1:19092"
    assert s.devstack.kafka_port == 19092


def test_extra_config_file_merges_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "prod.toml"
    extra.write_text('[kafka]\nreplication_factor = 3\n[budgets]\ndaily_usd = "12.50"\n')
    monkeypatch.setenv("RAGSTREAM_CONFIG", str(extra))
    s = load_settings()
    assert s.kafka.replication_factor == 3
    assert str(s.budgets.daily_usd) == "12.50"
    assert s.kafka.partitions == 12  # untouched defaults stay


@pytest.mark.parametrize(
    ("env", "value", "names"),
    [
        ("RAGSTREAM_POSTGRES__PORT", "70000", "postgres.port"),
        ("RAGSTREAM_SERVICES__OPENAI__MODE", "mock", "services.openai.mode"),
        ("RAGSTREAM_BUDGETS__DAILY_USD", "-1", "budgets.daily_usd"),
        ("RAGSTREAM_KAFKA__PARTITIONS", "zero", "kafka.partitions"),
        ("RAGSTREAM_KAFKA__FETCH_MAX_WAIT_MS", "0", "kafka.fetch_max_wait_ms"),
    ],
)
def test_wrong_value_is_one_line_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, names: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"config error: {names}:")
    assert repr(value) in message


def test_secret_in_a_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "leaky.toml"
    extra.write_text('[services.openai]\napi_key = "sk-live-123"\n')
    monkeypatch.setenv("RAGSTREAM_CONFIG", str(extra))
    with pytest.raises(
        ConfigError,
        match=r"services\.openai\.api_key: secrets are read only from the environment \(RAGSTREAM_SERVICES__OPENAI__API_KEY\)",
    ):
        load_settings()


def test_config_show_redacts_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSTREAM_SERVICES__OPENAI__API_KEY", "sk-test-very-secret")
    monkeypatch.setenv("RAGSTREAM_POSTGRES__PASSWORD", "pg-very-secret")
    s = load_settings()
    assert s.services.openai.api_key is not None
    assert s.services.openai.api_key.get_secret_value() == "sk-test-very-secret"
    assert redacted(s)["services"]["openai"]["api_key"] == "***"
    for args in (["config", "show"], ["config", "show", "--json"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "very-secret" not in result.output
        assert "***" in result.output
        assert "bootstrap_servers" in result.output


def test_cli_wrong_value_exits_2_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSTREAM_POSTGRES__PORT", "-5")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "config error: postgres.port" in result.output
    assert "Traceback" not in result.output


def test_oauthbearer_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"})
    assert "kafka.sasl_mechanism" in str(info.value)
    assert "OAUTHBEARER is not supported (ragstream has no token provider)" in str(info.value)


def test_version_is_printed() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ragstream {version('ragstream')}"


def test_config_show_is_toml_that_reads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSTREAM_BUDGETS__TENANTS", '{"acme corp": {"daily_usd": "2.5"}}')
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)  # valid TOML, whole
    assert shown["kafka"]["partitions"] == 12 and shown["kafka"]["batch_records"] == 50
    assert shown["kafka"]["fetch_max_wait_ms"] == 100
    assert "sasl_username" not in shown["kafka"]  # unset: a comment line, not a value
    assert "# sasl_username = (unset)" in result.output
    assert shown["budgets"]["tenants"]["acme corp"]["daily_usd"] == "2.5"  # a key quoted


def test_the_data_directory_is_absolute_and_does_not_depend_on_where_a_command_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import os

    from ragstream.settings import default_data_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    s = load_settings()
    assert s.devstack.data_dir == tmp_path / "xdg" / "ragstream"
    assert s.blob_root() == tmp_path / "xdg" / "ragstream" / "blobs"

    # Without XDG_DATA_HOME: root's is /var/lib (PostgreSQL's system user cannot enter
    # root's home), anyone else's is under their home.
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_data_dir() == Path("/var/lib/ragstream")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "ragstream"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")  # as the XDG spec says
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "ragstream"

    # A relative path in a config file is the file's; in the environment, the caller's.
    conf = tmp_path / "conf" / "ragstream.toml"
    conf.parent.mkdir()
    conf.write_text('[local]\ndata_dir = "state"\n[blobs]\nroot = "~/blobs"\n')
    monkeypatch.setenv("RAGSTREAM_CONFIG", str(conf))
    s = load_settings()
    assert s.devstack.data_dir == tmp_path / "conf" / "state"
    assert s.blob_root() == tmp_path / "home" / "blobs"
    monkeypatch.setenv("RAGSTREAM_DEVSTACK__DATA_DIR", "here")
    assert load_settings().devstack.data_dir == elsewhere / "here"


def notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ragstream.settings.sources"]


def test_the_old_local_section_in_a_config_file_is_read_as_devstack_with_a_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    conf = tmp_path / "old.toml"
    conf.write_text(
        '[local]\ndata_dir = "state"\nkafka_port = 19092\nkafka_heap = "1g"\n'
        '[devstack]\nkafka_heap = "2g"\n'
    )
    monkeypatch.setenv("RAGSTREAM_CONFIG", str(conf))
    with caplog.at_level("WARNING", logger="ragstream.settings.sources"):
        s = load_settings()
    assert s.devstack.data_dir == tmp_path / "state"  # relative to the file, as before
    assert s.devstack.kafka_port == 19092
    assert s.devstack.kafka_heap == "2g"  # the new name wins within a file
    assert s.blob_root() == tmp_path / "state" / "blobs"
    [notice] = notices(caplog)
    assert "\n" not in notice and str(conf) in notice and "[devstack]" in notice


def test_old_local_environment_variables_are_read_as_devstack_with_a_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RAGSTREAM_LOCAL__DATA_DIR", str(tmp_path / "old"))
    monkeypatch.setenv("RAGSTREAM_LOCAL__KAFKA_PORT", "19092")
    monkeypatch.setenv("RAGSTREAM_LOCAL__POSTGRES_PORT", "15433")
    monkeypatch.setenv("RAGSTREAM_DEVSTACK__POSTGRES_PORT", "25433")
    with caplog.at_level("WARNING", logger="ragstream.settings.sources"):
        s = load_settings()
    assert s.devstack.data_dir == tmp_path / "old"
    assert s.devstack.kafka_port == 19092
    assert s.devstack.postgres_port == 25433  # the new name wins
    [notice] = notices(caplog)
    assert "\n" not in notice
    assert "RAGSTREAM_LOCAL__DATA_DIR" in notice and "RAGSTREAM_DEVSTACK__" in notice


def test_no_notice_without_the_old_names(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="ragstream.settings.sources"):
        load_settings()
    assert notices(caplog) == []
