"""The README's commands, run as an operator runs them: `ragstream stack up`, third-party
clients (kcat, psql) against what it started, an upload through the running workers,
`ragstream stack down`, and the main job `ragstream demo`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragstream.samples import sample_dir
from ragstream.topology import Topology

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stack_env() -> Iterator[dict[str, str]]:
    """A stack of its own: own data directory and ports, so it coexists with the suite's."""
    data = Path(tempfile.mkdtemp(prefix="ragstream-stack-test-"))
    data.chmod(0o711)  # PostgreSQL's system user passes through
    kafka_port, pg_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    env.update(
        RAGSTREAM_LOCAL__DATA_DIR=str(data),
        RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{kafka_port}",
        RAGSTREAM_LOCAL__KAFKA_CONTROLLER_PORT=str(_free_port()),
        RAGSTREAM_POSTGRES__PORT=str(pg_port),
        RAGSTREAM_OBSERVABILITY__METRICS_PORT=str(_free_port()),
        RAGSTREAM_LOCAL__PROMETHEUS_PORT=str(_free_port()),
        COLUMNS="200",
    )
    yield env
    subprocess.run([sys.executable, "-m", "ragstream", "stack", "down"], env=env, timeout=120)
    shutil.rmtree(data, ignore_errors=True)


def ragstream(
    env: dict[str, str], *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ragstream", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_stack_up_serves_third_party_clients_and_a_running_pipeline(
    stack_env: dict[str, str],
) -> None:
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed (make test installs Debian's kcat)"
    assert shutil.which("prometheus"), "prometheus is not installed (make test installs it)"
    up = ragstream(stack_env, "stack", "up", "--prometheus")
    assert up.returncode == 0, up.stdout + up.stderr
    bootstrap = stack_env["RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
    assert bootstrap in up.stdout
    assert "workers (parse, chunk, embed)" in up.stdout

    # kcat, a third-party client, sees every topic with its partition count.
    listing = subprocess.run(
        [kcat, "-b", bootstrap, "-L"], capture_output=True, text=True, timeout=30
    )
    assert listing.returncode == 0, listing.stderr
    topics = dict(re.findall(r'topic "([^"]+)" with (\d+) partitions', listing.stdout))
    for spec in Topology().topics(12):
        assert topics.get(spec.name) == str(spec.partitions), (spec.name, topics)

    # psql, another third-party client, sees the migrated tables.
    pg_port = stack_env["RAGSTREAM_POSTGRES__PORT"]
    psql = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            pg_port,
            "-U",
            "postgres",
            "-d",
            "ragstream",
            "-At",
            "-c",
            "select tablename from pg_tables where schemaname = 'public' order by 1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert psql.returncode == 0, psql.stderr
    tables = set(psql.stdout.split())
    assert {"documents", "parse_results", "chunks", "embeddings", "embedding_cache"} <= tables

    # Idempotent: a second `stack up` starts nothing new.
    again = ragstream(stack_env, "stack", "up")
    assert again.returncode == 0, again.stderr
    assert "nothing (already running)" in again.stdout

    # The background workers process an upload published by the CLI.
    doc = sample_dir() / "espresso-at-home.md"
    uploaded = ragstream(
        stack_env, "upload", str(doc), "--tenant", "stack-test", "--wait", "--timeout", "120"
    )
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    assert "embedded" in uploaded.stdout

    found = ragstream(
        stack_env, "search", "how long should an espresso shot pull", "--tenant", "stack-test"
    )
    assert found.returncode == 0, found.stderr
    assert "espresso-at-home.md" in found.stdout

    # Kafka's own tools, same version as the broker, see the stage groups.
    groups = ragstream(stack_env, "stack", "kafka-tool", "consumer-groups", "--list")
    assert groups.returncode == 0, groups.stderr
    assert {"ragstream-parse", "ragstream-chunk", "ragstream-embed"} <= set(groups.stdout.split())

    down = ragstream(stack_env, "stack", "down")
    assert down.returncode == 0, down.stderr
    for service in ("prometheus", "workers", "kafka", "postgres"):
        assert service in down.stdout
    assert not _listening(int(bootstrap.rsplit(":", 1)[1]))
    assert not _listening(int(pg_port))


def test_demo_runs_the_pipeline_and_prints_the_summary(stack_env: dict[str, str]) -> None:
    result = ragstream(stack_env, "demo", "--timeout", "180", timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ragstream demo: tenant demo-" in out
    manifest = [p for p in sample_dir().iterdir() if p.suffix in (".pdf", ".md", ".html", ".txt")]
    assert re.search(rf"documents uploaded\s*│\s*{len(manifest)}\b", out), out
    assert re.search(rf"embedded\s*│\s*{len(manifest) - 1}\b", out), out
    assert re.search(r"duplicates \(not processed again\)\s*│\s*1\b", out), out
    assert "kafka-consumer-groups.pdf" in out.split("ragstream search")[-1]
    assert "stopped what the demo started: kafka, postgres" in out
    kafka_port = int(stack_env["RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    assert not _listening(kafka_port)
