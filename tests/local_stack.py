"""A local stack of a test's own: the environment for `ragstream` commands whose `stack up`
starts a broker, PostgreSQL and workers in a data directory of their own on free ports, so it
runs beside the suite's services and any other stack on the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import free_port


@contextmanager
def own_stack(prefix: str) -> Iterator[dict[str, str]]:
    """The environment (no other RAGSTREAM_* variable of this process's); on exit, whatever
    it started is stopped (`ragstream stack down`) and its directory removed."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o711)  # PostgreSQL's system user passes through
    data = base / "ragstream"  # the default data directory under XDG_DATA_HOME=base
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    env.update(
        RAGSTREAM_DEVSTACK__DATA_DIR=str(data),
        XDG_DATA_HOME=str(base),
        RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        RAGSTREAM_DEVSTACK__KAFKA_CONTROLLER_PORT=str(free_port()),
        RAGSTREAM_POSTGRES__PORT=str(free_port()),
        RAGSTREAM_OBSERVABILITY__METRICS_PORT=str(free_port()),
        RAGSTREAM_DEVSTACK__PROMETHEUS_PORT=str(free_port()),
        COLUMNS="200",
    )
    try:
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "ragstream", "stack", "down"], env=env, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
