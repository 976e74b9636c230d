"""Installable as published: the wheel, installed without extras into a fresh virtualenv,
gives a CLI whose every group starts (its imports are all declared dependencies)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("stack", "topics", "services", "db", "dlq", "cost", "config", "rollback")
COMMANDS = (
    "demo",
    "worker",
    "upload",
    "doc",
    "search",
    "replay",
    "status",
    "backup",
    "restore",
    "prune",
)


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, env=env
    )


def test_the_wheel_installs_without_extras_and_every_command_starts(tmp_path: Path) -> None:
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path, ROOT)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("ragstream-*.whl")
    home = tmp_path / "venv"
    venv.create(home, with_pip=True)
    installed = _run(home / "bin" / "pip", "install", "--quiet", wheel)
    assert installed.returncode == 0, installed.stderr[-2000:]
    cli = home / "bin" / "ragstream"
    clean = {"PATH": f"{home / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "120"}

    assert _run(cli, "--version", env=clean).stdout.startswith("ragstream ")
    top = _run(cli, "--help", env=clean)
    assert top.returncode == 0, top.stderr
    for name in (*GROUPS, *COMMANDS):
        assert name in top.stdout
        shown = _run(cli, name, "--help", env=clean)
        assert shown.returncode == 0 and "Usage" in shown.stdout, (name, shown.stderr[-2000:])
    # One command that works with nothing running: the configuration, from the bundled files.
    config = _run(cli, "config", "show", env=clean)
    assert config.returncode == 0 and "bootstrap_servers" in config.stdout, config.stderr
    # One that needs the broker, against a closed port: one line, exit 1, no traceback.
    closed = {**clean, "RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    listed = _run(cli, "dlq", "list", env=closed)
    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert "Traceback" not in listed.stderr and "127.0.0.1:1" in listed.stderr
