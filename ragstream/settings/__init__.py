"""Settings: `config/ragstream.toml` defaults, then an optional file named by
`RAGSTREAM_CONFIG`, then `RAGSTREAM_*` environment variables (nested with `__`, e.g.
`RAGSTREAM_KAFKA__PARTITIONS=24`). Secrets (`SecretStr` fields) come only from the environment.

Build once with `load_settings()` at the entry point and pass the object down.

    sections   kafka, postgres, devstack, blobs, retry, observability
    services   services (llamaparse, openai), parse, chunk, embed, search, budgets
    sources    the TOML files and short variables, and the renamed `local` section
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ragstream.errors import ConfigError
from ragstream.settings.sections import (
    BlobSettings,
    DevStackSettings,
    KafkaSettings,
    Mode,
    ObservabilitySettings,
    PostgresSettings,
    RetrySettings,
    default_data_dir,
)
from ragstream.settings.services import (
    BudgetLimit,
    BudgetSettings,
    ChildLimits,
    ChunkSettings,
    EmbedSettings,
    LlamaParseSettings,
    OpenAISettings,
    ParseSettings,
    SearchSettings,
    ServicesSettings,
)
from ragstream.settings.sources import SECRET_KEYS, TomlSource

__all__ = [
    "SECRET_KEYS",
    "BlobSettings",
    "BudgetLimit",
    "BudgetSettings",
    "ChildLimits",
    "ChunkSettings",
    "DevStackSettings",
    "EmbedSettings",
    "KafkaSettings",
    "LlamaParseSettings",
    "Mode",
    "ObservabilitySettings",
    "OpenAISettings",
    "ParseSettings",
    "PostgresSettings",
    "RetrySettings",
    "SearchSettings",
    "ServicesSettings",
    "Settings",
    "default_data_dir",
    "load_settings",
    "redacted",
    "with_devstack_password",
]


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
    devstack: DevStackSettings = DevStackSettings()
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
    def _devstack_ports_follow_clients(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        local = dict(data.get("devstack") or {})
        kafka = data.get("kafka") or {}
        postgres = data.get("postgres") or {}
        if "kafka_port" not in local and isinstance(kafka, dict):
            first = str(kafka.get("bootstrap_servers", "127.0.0.1:9092")).split(",")[0]
            port = first.rsplit(":", 1)[-1]
            if port.isdigit():
                local["kafka_port"] = int(port)
        if "postgres_port" not in local and isinstance(postgres, dict) and "port" in postgres:
            local["postgres_port"] = postgres["port"]
        return {**data, "devstack": local}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlSource(settings_cls))

    def blob_root(self) -> Path:
        return self.blobs.root or self.devstack.data_dir / "blobs"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once. A wrong value raises ConfigError with one line naming the key."""
    try:
        return with_devstack_password(Settings(**overrides))
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


def with_devstack_password(settings: Settings) -> Settings:
    """`settings` with the dev stack's generated PostgreSQL password
    (`<devstack.data_dir>/postgres.password`) when none is configured and no `postgres.url` is
    given: the local server requires passwords, and this is how its clients know it."""
    pg = settings.postgres
    if pg.url or pg.password is not None:
        return settings
    from ragstream.devstack.postgres import read_password

    password = read_password(settings.devstack.data_dir)
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
