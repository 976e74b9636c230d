"""Every command with Kafka and PostgreSQL unreachable: one line naming the address and what
to check, exit 1, no traceback, no client-library log line."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragstream.cli import app


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


KAFKA = f"127.0.0.1:{_closed_port()}"
POSTGRES = f"postgresql://postgres:s3cret-pw@127.0.0.1:{_closed_port()}/x"

NEEDS_KAFKA = [
    ["status"],
    ["topics", "describe"],
    ["topics", "create"],
    ["cost"],
    ["services", "check"],
    ["services", "mode", "openai", "local"],
    ["dlq", "list"],
    ["dlq", "stats"],
    ["replay", "parse", "--earliest", "--dry-run"],
    ["backup", str(Path(tempfile.gettempdir()) / f"ragstream-unreachable-{os.getpid()}")],
]
NEEDS_POSTGRES = [
    ["doc", "abc"],
    ["search", "hello", "--tenant", "t"],
    ["db", "migrate"],
    ["cost", "budget", "openai", "--daily-usd", "3"],
    ["prune", "--keep-versions", "2", "--dry-run"],
    ["rollback", "chunker", "--to", "md-1:cl100k_base:t400:o40", "--dry-run"],
    ["rollback", "embedding", "--to", "text-embedding-3-small:512", "--tenant", "t"],
]


@pytest.mark.parametrize("args", NEEDS_KAFKA + NEEDS_POSTGRES, ids=" ".join)
def test_an_unreachable_dependency_is_one_line_and_exit_1(args: list[str]) -> None:
    env = {
        "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": KAFKA,
        "RAGSTREAM_KAFKA__REQUEST_TIMEOUT_MS": "2000",
        "RAGSTREAM_POSTGRES__URL": POSTGRES,
        "COLUMNS": "200",
    }
    result = CliRunner().invoke(app, args, env=env)
    out = result.output
    assert result.exit_code == 1, out
    assert "Traceback" not in out and '"level"' not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach "), out
    if args in NEEDS_KAFKA:
        assert f"Kafka at {KAFKA}" in lines[0] and "ragstream stack up" in lines[0], out
    else:
        assert "PostgreSQL at postgresql://postgres:***@" in lines[0], out
        assert "s3cret-pw" not in out
