"""File-based discovery: a process's target file while it serves, none after, none left by the
dead (ragstream.scrape)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ragstream.scrape import announce, withdraw


def test_a_process_announces_its_real_address_and_withdraws_it(tmp_path: Path) -> None:
    path = announce(str(tmp_path / "targets"), "worker embed", "127.0.0.1", 43817)
    assert path == tmp_path / "targets" / f"{os.getpid()}.json"
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:43817"], "labels": {"process": "worker embed"}}
    ]
    withdraw(path)
    assert not path.exists()
    assert announce("", "worker embed", "127.0.0.1", 1) is None  # no scrape_dir: nothing


def test_the_file_of_a_process_that_is_gone_is_removed_by_the_next_one(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f"{dead.stdout.strip()}.json"
    stale.write_text("[]")
    other = tmp_path / "static.json"  # not a pid: someone else's, left alone
    other.write_text("[]")
    mine = announce(str(tmp_path), "exporter", "127.0.0.1", 9308)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "static.json"])  # type: ignore[union-attr]


def test_an_unwritable_directory_is_a_log_line_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert announce(str(blocker / "targets"), "worker all", "127.0.0.1", 9464) is None
