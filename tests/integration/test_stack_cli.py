"""The README's commands, run as an operator runs them: `ragstream stack up`, third-party
clients (kcat, psql) against what it started, an upload through the running workers,
`ragstream stack down` (whole or part by part, `up` bringing back just what was stopped), and
the main job `ragstream demo`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragstream.devstack.postgres import read_password
from ragstream.pids import process_alive
from ragstream.samples import sample_dir
from ragstream.settings import load_settings
from ragstream.topology import Stage, Topology
from tests.integration.pipeline_helpers import (
    committed_offsets,
    end_offsets,
    make_corpus,
    wait_until,
)
from tests.local_stack import own_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stack_env() -> Iterator[dict[str, str]]:
    """A stack of its own: own data directory and ports, so it coexists with the suite's."""
    with own_stack("ragstream-stack-test-") as env:
        yield env


def ragstream(
    env: dict[str, str], *args: str, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ragstream", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _psql(env: dict[str, str], sql: str) -> subprocess.CompletedProcess[str]:
    """psql against the stack's PostgreSQL, with the password the stack generated."""
    password = read_password(Path(env["RAGSTREAM_DEVSTACK__DATA_DIR"]))
    assert password, "the stack's PostgreSQL has no generated password"
    return subprocess.run(
        [
            *("psql", "-h", "127.0.0.1", "-p", env["RAGSTREAM_POSTGRES__PORT"], "-U", "postgres"),
            *("-d", "ragstream", "-At", "-c", sql),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGPASSWORD": password},
    )


def _wait_for_targets(api: str, want: set[str], timeout_s: float = 60) -> dict[str, str]:
    """Prometheus's active targets ({address: process label}) once they are exactly `want`,
    each scraped up."""
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"{api}/targets?state=active", timeout=5) as page:
            active = json.loads(page.read())["data"]["activeTargets"]
        up = {t["labels"]["instance"]: t["labels"].get("process", "") for t in active
              if t["health"] == "up"}  # fmt: skip
        if set(up) == want and len(active) == len(want):
            return up
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus's targets {active}, wanted {want}")
        time.sleep(1)


def test_stack_up_serves_third_party_clients_and_a_running_pipeline(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed (make test installs Debian's kcat)"
    assert shutil.which("prometheus"), "prometheus is not installed (make test installs it)"
    up = ragstream(stack_env, "stack", "up", "--prometheus")
    assert up.returncode == 0, up.stdout + up.stderr
    bootstrap = stack_env["RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
    assert bootstrap in up.stdout
    # worker all and its four processes, each named, and where the metrics really are
    assert "worker all (supervisor)" in up.stdout
    for row in ("worker parse (parse stage)", "worker chunk (chunk stage)"):
        assert row in up.stdout, up.stdout
    assert "worker embed (embed stage)" in up.stdout
    assert "worker cost (cost accountant)" in up.stdout
    assert "exporter (the groups from outside)" in up.stdout
    metrics_url = f"http://127.0.0.1:{stack_env['RAGSTREAM_OBSERVABILITY__METRICS_PORT']}/metrics"
    assert metrics_url in up.stdout
    with urllib.request.urlopen(metrics_url, timeout=10) as page:
        assert 'worker="embed"' in page.read().decode()

    # Prometheus finds every process the stack runs, and one started beside it, at the ports
    # they really bound, from the target files they write (file-based discovery).
    data = Path(stack_env["RAGSTREAM_DEVSTACK__DATA_DIR"])
    targets_dir = data / "prometheus" / "targets"
    prometheus_api = f"http://127.0.0.1:{stack_env['RAGSTREAM_DEVSTACK__PROMETHEUS_PORT']}/api/v1"
    worker_all = f"127.0.0.1:{stack_env['RAGSTREAM_OBSERVABILITY__METRICS_PORT']}"
    assert _wait_for_targets(prometheus_api, {worker_all}) == {worker_all: "worker all"}
    extra = subprocess.Popen(
        [sys.executable, "-m", "ragstream", "worker", "parse"],
        env={**stack_env, "RAGSTREAM_OBSERVABILITY__METRICS_PORT": "0",
             "RAGSTREAM_OBSERVABILITY__SCRAPE_DIR": str(targets_dir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        own = targets_dir / f"{extra.pid}.json"
        deadline = time.monotonic() + 60
        while not own.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        (entry,) = json.loads(own.read_text())
        (address,) = entry["targets"]
        assert not address.endswith(":0"), address
        seen = _wait_for_targets(prometheus_api, {worker_all, address})
        assert seen == {worker_all: "worker all", address: "worker parse"}
    finally:
        extra.terminate()
        extra.wait(timeout=60)
    assert not own.exists()
    assert set(_wait_for_targets(prometheus_api, {worker_all})) == {worker_all}

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
    psql = _psql(
        stack_env, "select tablename from pg_tables where schemaname = 'public' order by 1"
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

    # From another directory, with the data directory left to its default: a file over the
    # inline limit goes to the stack's blob store (not one under the working directory) and
    # the workers read it there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    big = elsewhere / "long-espresso-notes.md"
    big.write_text("# Long notes\n\n" + doc.read_text() * (80 * 1024 // len(doc.read_text()) + 1))
    assert big.stat().st_size > 64 * 1024
    default_env = {k: v for k, v in stack_env.items() if k != "RAGSTREAM_DEVSTACK__DATA_DIR"}
    uploaded = ragstream(
        default_env, "upload", big.name, "--tenant", "stack-test", "--wait", "--timeout", "120",
        cwd=elsewhere,
    )  # fmt: skip
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    assert re.search(r"long-espresso-notes\.md.*\bembedded\b", uploaded.stdout), uploaded.stdout
    assert not (elsewhere / ".ragstream").exists()
    assert any((Path(stack_env["XDG_DATA_HOME"]) / "ragstream" / "blobs").rglob("*"))

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


def _pid(data_dir: Path, name: str) -> int | None:
    """The pid a stack part's pid file names, if that process runs."""
    files = {
        "workers": data_dir / "workers.pid",
        "kafka": data_dir / "kafka" / "broker.pid",
        "postgres": data_dir / "postgres" / "data" / "postmaster.pid",
    }
    try:
        pid = int(files[name].read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    return pid if process_alive(pid) else None


def _positions(env: dict[str, str]) -> dict[str, dict[tuple[str, int], int]]:
    """End offsets of the document topics and committed offsets of the stage groups, once
    every group has caught up (a stage commits just after it writes the status)."""
    settings = load_settings(
        kafka={"bootstrap_servers": env["RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS"], "partitions": 12}
    )
    topology = Topology()

    async def read() -> dict[str, dict[tuple[str, int], int]]:
        out: dict[str, dict[tuple[str, int], int]] = {}
        for stage in Stage:
            topic = topology.input_topic(stage)
            ends = await end_offsets(settings, topic)
            out[topic] = {(tp.topic, tp.partition): n for tp, n in ends.items()}
            group = await committed_offsets(settings, topology.group(stage))
            out[topology.group(stage)] = {(tp.topic, tp.partition): n for tp, n in group.items()}
        return out

    async def caught_up() -> dict[str, dict[tuple[str, int], int]] | None:
        got = await read()
        for stage in Stage:
            ends = got[topology.input_topic(stage)]
            done = got[topology.group(stage)]
            if any(done.get(tp, 0) != n for tp, n in ends.items() if n):
                return None
        return got

    return asyncio.run(wait_until(caught_up, 60, "the stage groups to commit", poll_s=0.5))


@pytest.mark.timeout(600)
def test_each_part_stops_alone_and_up_restores_just_it(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = Path(stack_env["RAGSTREAM_DEVSTACK__DATA_DIR"])
    bootstrap = stack_env["RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
    ports = {
        "kafka": int(bootstrap.rsplit(":", 1)[1]),
        "postgres": int(stack_env["RAGSTREAM_POSTGRES__PORT"]),
    }
    up = ragstream(stack_env, "stack", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    samples = iter(make_corpus(tmp_path, 7))

    def upload_one() -> None:
        done = ragstream(
            stack_env,
            "upload",
            str(next(samples)),
            *("--tenant", "parts", "--wait", "--timeout", "120"),
        )
        assert done.returncode == 0 and "embedded" in done.stdout, done.stdout + done.stderr

    def documents() -> int:
        psql = _psql(stack_env, "select count(*) from documents")
        assert psql.returncode == 0, psql.stderr
        return int(psql.stdout)

    upload_one()
    for part, kill in [
        ("kafka", False),
        ("postgres", False),
        ("workers", False),
        ("kafka", True),
        ("postgres", True),
        ("workers", True),
    ]:
        before = _positions(stack_env)
        pids = {name: _pid(data_dir, name) for name in ("kafka", "postgres", "workers")}
        assert all(pids.values()), pids
        uploaded = documents()

        down = ragstream(stack_env, "stack", "down", part, *(["--kill"] if kill else []))
        assert down.returncode == 0, down.stdout + down.stderr
        assert down.stdout.strip() == f"stopped: {part}", (part, kill, down.stdout)
        assert _pid(data_dir, part) is None, (part, kill)
        if part in ports:
            assert not _listening(ports[part]), (part, kill)
        for other, pid in pids.items():
            if other != part:  # the other parts run on, the same processes
                assert _pid(data_dir, other) == pid, (part, kill, other)

        up = ragstream(stack_env, "stack", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"started: {part};" in up.stdout, (part, kill, up.stdout)
        assert _pid(data_dir, part) not in (None, pids[part]), (part, kill)
        # Back on its data: the same records and committed offsets, the same documents.
        assert _positions(stack_env) == before, (part, kill)
        assert documents() == uploaded, (part, kill)
        # And the pipeline works through it again.
        upload_one()

    down = ragstream(stack_env, "stack", "down", "kafka", "postgres")
    assert down.stdout.strip() == "stopped: kafka, postgres", down.stdout
    again = ragstream(stack_env, "stack", "down", "kafka")
    assert again.stdout.strip() == "stopped: nothing was running", again.stdout


def _sourced(env: dict[str, str], path: Path) -> dict[str, str]:
    """`env` after `source path` (a file of `export NAME=value` lines, values shell-quoted)."""
    out = dict(env)
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            out[name] = shlex.split(value)[0]
    return out


def test_stack_up_secure_authenticates_every_client(stack_env: dict[str, str]) -> None:
    """`stack up --secure`: workers, the CLI (as admin, from secure.env), an uploader (as the
    publisher) and Kafka's own tools all authenticate; a client without credentials is refused."""
    up = ragstream(stack_env, "stack", "up", "--secure")
    assert up.returncode == 0, up.stdout + up.stderr
    data = Path(stack_env["RAGSTREAM_DEVSTACK__DATA_DIR"])
    secure_env = data / "secure.env"
    assert f"source {secure_env}" in up.stdout, up.stdout
    assert secure_env.stat().st_mode & 0o077 == 0
    admin = _sourced(stack_env, secure_env)
    passwords = json.loads((data / "secure" / "passwords.json").read_text())
    publisher = {
        **admin,
        "RAGSTREAM_KAFKA__SASL_USERNAME": "publisher",
        "RAGSTREAM_KAFKA__SASL_PASSWORD": passwords["publisher"],
    }
    doc = make_corpus(data / "in", 1)[0]
    uploaded = ragstream(
        publisher, "upload", str(doc), "--tenant", "secure", "--wait", "--timeout", "120"
    )
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    assert "embedded" in uploaded.stdout, uploaded.stdout
    status = ragstream(admin, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    groups = ragstream(admin, "stack", "kafka-tool", "consumer-groups", "--list")
    assert groups.returncode == 0, groups.stderr
    assert "ragstream-embed" in groups.stdout
    # The same command without credentials: one line, no traceback.
    refused = ragstream(stack_env, "status")
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: cannot reach Kafka"), refused.stderr


def _running_it_block() -> list[str]:
    """The commands of the README's "Running it" block, one per line, comments dropped."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Running it", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block under 'Running it'"
    return [line.split("  #")[0].strip() for line in block[1].splitlines() if line.strip()]


def test_the_readme_running_it_block_runs_as_written(stack_env: dict[str, str]) -> None:
    """Each command as the README shows it (`.venv/bin/ragstream` is this interpreter's, run
    from the checkout; `<document-id ...>` is an id the upload printed, as the table shows it)."""
    root = Path(__file__).resolve().parents[2]
    commands = _running_it_block()
    assert [c.split()[1:3] for c in commands] == [
        ["stack", "up"],
        ["upload", "ragstream/samples/docs/"],
        ["search", '"how'],
        ["doc", "<document-id"],
        ["stack", "down"],
    ], commands
    shown_id = ""
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/ragstream", command
        if argv[1] == "doc":
            argv = [argv[0], "doc", shown_id]
        done = subprocess.run(
            [sys.executable, "-m", "ragstream", *argv[1:]],
            env=stack_env, cwd=root, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
        if argv[1] == "upload":
            assert "embedded" in done.stdout, done.stdout
            # a row that went the whole way (of two identical files, either may be the duplicate)
            found = re.search(r"│\s*([0-9a-f]{8})\S*\s*│.*\bembedded\b", done.stdout)
            assert found, done.stdout
            shown_id = found[1]
        if argv[1] == "search":
            assert "consumer" in done.stdout.lower(), done.stdout
        if argv[1] == "doc":
            assert "embed" in done.stdout, done.stdout
