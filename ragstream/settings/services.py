"""The settings sections of the work: the paid services, parsing, chunking, embedding, search
and budgets."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from ragstream.settings.sections import Mode, _Section


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
