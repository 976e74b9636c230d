"""Prometheus file-based service discovery for the processes that serve /metrics.

With `observability.scrape_dir` set (`ragstream stack up` sets it for the workers it starts),
a process writes `<scrape_dir>/<pid>.json` once its metrics server has bound its real port,

    [{"targets": ["127.0.0.1:43817"], "labels": {"process": "worker all"}}]

and removes it when it stops; Prometheus's `file_sd_configs` reads the directory, so every
process is scraped at the port it really has, and one that stops is dropped. A file whose
process is gone (SIGKILL) is removed by the next process that announces itself, or by
`prune` when the stack starts Prometheus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from ragstream.pids import process_alive

log = structlog.get_logger(__name__)


def announce(scrape_dir: str, name: str, host: str, port: int) -> Path | None:
    """Write this process's target file (atomically); None when there is no scrape_dir or it
    cannot be written (said once in the log: metrics are still served)."""
    if not scrape_dir:
        return None
    directory = Path(scrape_dir)
    path = directory / f"{os.getpid()}.json"
    target = [{"targets": [f"{host}:{port}"], "labels": {"process": name}}]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        prune(directory)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(target))
        partial.replace(path)  # Prometheus never reads half a file
    except OSError as exc:
        log.warning("cannot write the scrape target file", path=str(path), error=str(exc))
        return None
    return path


def withdraw(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def prune(directory: Path) -> None:
    """Remove the target files of processes that no longer run."""
    for path in directory.glob("*.json"):
        try:
            pid = int(path.stem)
        except ValueError:
            continue  # not one of ours
        if not process_alive(pid):
            path.unlink(missing_ok=True)
