"""docker-compose.yml cannot run here (no Docker engine); this keeps it agreeing with the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ragstream.cli import app
from ragstream.settings import load_settings
from ragstream.topology import Stage

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _env_default(value: str) -> str:
    """${VAR:-default} → default, as compose resolves it with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def _argv(command: Any) -> list[str]:
    if isinstance(command, str):
        return shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        return shlex.split(command[2])
    return list(command)


def test_services_and_images_agree_with_config(compose: dict[str, Any]) -> None:
    settings = load_settings()
    services = compose["services"]
    assert {"kafka", "postgres", "init", *(s.value for s in Stage)} <= set(services)
    assert services["kafka"]["image"] == f"apache/kafka:{settings.devstack.kafka_version}"
    assert services["postgres"]["image"].startswith("pgvector/pgvector:pg18")
    kafka_port = settings.kafka.bootstrap_servers.rsplit(":", 1)[1]
    assert f"127.0.0.1:{kafka_port}:9092" in services["kafka"]["ports"]
    assert f"127.0.0.1:{settings.postgres.port}:5432" in services["postgres"]["ports"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == settings.postgres.database
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "EXTERNAL://127.0.0.1:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert _env_default(env["KAFKA_CONTROLLER_QUORUM_VOTERS"]) == "1@kafka:9093"  # one alone
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name != "init":
            assert "healthcheck" in service, name
    init_deps = compose["services"]["init"]["depends_on"]
    assert init_deps["kafka"]["condition"] == "service_healthy"
    assert init_deps["postgres"]["condition"] == "service_healthy"
    for stage in Stage:
        assert compose["services"][stage.value]["depends_on"]["init"]["condition"] == (
            "service_completed_successfully"
        )


def test_commands_are_real_cli_commands(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    commands: list[list[str]] = []
    for service in compose["services"].values():
        if "command" not in service:
            continue
        argv = _argv(service["command"])
        # split "a && b" chains
        chain: list[str] = []
        for token in [*argv, "&&"]:
            if token == "&&":
                commands.append(chain)
                chain = []
            else:
                chain.append(token)
    ragstream_commands = [c for c in commands if c and c[0] == "ragstream"]
    assert ["ragstream", "topics", "create"] in ragstream_commands
    for stage in Stage:
        assert ["ragstream", "worker", stage.value] in ragstream_commands
    assert ["ragstream", "worker", "cost"] in ragstream_commands  # the cost accountant
    for argv in ragstream_commands:
        result = runner.invoke(app, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{argv}: {result.output}"


def test_worker_environment_is_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"]["parse"]["environment"]
    assert _env_default(env["RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS"]) == "kafka:29092"
    for key, value in env.items():
        assert key.startswith("RAGSTREAM_"), key
        monkeypatch.setenv(key, _env_default(value))
    settings = load_settings()  # raises ConfigError on any unknown key or bad value
    assert settings.postgres.host == "postgres"
    assert settings.postgres.port == 5432
    assert settings.observability.metrics_host == "0.0.0.0"


def test_prometheus_scrapes_every_stage_and_grafana_is_provisioned(compose: dict[str, Any]) -> None:
    root = COMPOSE.parent
    services = compose["services"]
    metrics_port = load_settings().observability.metrics_port
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (root / source).exists(), f"{name} mounts missing {source}"
    mounts = services["prometheus"]["volumes"]
    assert "./config/prometheus/prometheus.compose.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./config/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    scrape = yaml.safe_load((root / "config/prometheus/prometheus.compose.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]  # beside the config file in the container
    (workers,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "ragstream-workers"]
    (dns,) = workers["dns_sd_configs"]
    assert set(dns["names"]) == {s.value for s in Stage} | {"cost"}
    assert dns["port"] == metrics_port
    # The workers' own healthcheck asks the same port for /ready.
    assert f":{metrics_port}/ready" in " ".join(services["parse"]["healthcheck"]["test"])
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_the_database_password_has_no_default(compose: dict[str, Any]) -> None:
    """Compose refuses to start without POSTGRES_PASSWORD (`${VAR:?message}`): no known default
    password reaches a database."""
    server = compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    client = compose["services"]["parse"]["environment"]["RAGSTREAM_POSTGRES__PASSWORD"]
    for value in (server, client):
        assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", value), value
    assert "changeme" not in COMPOSE.read_text()


def _interpolated(value: Any, env: dict[str, str]) -> str:
    """${VAR:-default} as compose resolves it with `env` set."""
    return re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), str(value))


def test_the_three_brokers_profile_is_the_local_clusters_shape(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker compose --env-file compose/three-brokers.env up`: three KRaft nodes in one
    quorum, replication 3 with min.insync.replicas 2, and workers that know all three."""
    env_file = COMPOSE.parent / "compose" / "three-brokers.env"
    values = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["COMPOSE_PROFILES"] == "three-brokers"
    services = compose["services"]
    nodes = ["kafka", "kafka-2", "kafka-3"]
    assert [services[n].get("profiles") for n in nodes] == [
        None,
        ["three-brokers"],
        ["three-brokers"],
    ]
    voters = {_interpolated(services[n]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"], values)
              for n in nodes}  # fmt: skip
    assert voters == {"1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"}
    for number, name in enumerate(nodes, 1):
        env = {k: _interpolated(v, values) for k, v in services[name]["environment"].items()}
        assert env["KAFKA_NODE_ID"] == str(number)
        assert f"INTERNAL://{name}:29092" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2"
    assert len({services[n]["environment"]["CLUSTER_ID"] for n in nodes}) == 1
    worker = services["embed"]["environment"]
    for key, value in worker.items():
        monkeypatch.setenv(key, _interpolated(value, values))
    settings = load_settings()
    assert settings.kafka.replication_factor == 3
    assert settings.kafka.bootstrap_servers == "kafka:29092,kafka-2:29092,kafka-3:29092"
