"""The price table (`config/prices.toml`): USD per unit, each price with the date it was read.

Costs are exact decimals, quantized to nanodollars (the ledger's and the events' scale 9).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ragstream.errors import ConfigError
from ragstream.resources import config_dir

NANO = Decimal("0.000000001")


@dataclass(frozen=True, slots=True)
class Price:
    """What one unit of a service's model or tier costs."""

    service: str
    model: str
    unit: str
    unit_price_usd: Decimal
    as_of: date | None  # None: self-hosted, nothing to have read
    source: str | None = None
    self_hosted: bool = False  # a model on the operator's own server: costs nothing per call

    def cost(self, units: float | int | Decimal) -> Decimal:
        return (self.unit_price_usd * Decimal(str(units))).quantize(NANO)


@dataclass(frozen=True, slots=True)
class PriceTable:
    embeddings: dict[str, Price]  # OpenAI model -> price per token
    parse_credit: Price  # LlamaParse: price per credit
    credits_per_page: dict[str, Decimal]  # LlamaParse tier -> credits a page costs
    path: Path

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """Read and check the table; any problem is a ConfigError naming the file and key."""
        path = path or config_dir() / "prices.toml"
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"price table {path} does not exist (budgets.prices)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"price table {path} is not valid TOML: {exc}") from None
        where = str(path)
        openai = _section(data, "openai", where)
        embeddings = {
            model: _price("openai", model, _section(openai, model, where), where, "usd_per_million")
            for model in openai
        }
        lp = _section(data, "llamaparse", where)
        credit = _price("llamaparse", "credit", lp, where, "usd_per_thousand")
        per_page = {
            tier: _decimal(v, f"{where}: llamaparse.credits_per_page.{tier}")
            for tier, v in _section(lp, "credits_per_page", where).items()
        }
        return cls(embeddings, credit, per_page, path)

    def embedding(self, model: str) -> Price:
        try:
            return self.embeddings[model]
        except KeyError:
            known = ", ".join(sorted(self.embeddings)) or "none"
            raise ConfigError(
                f"no price for OpenAI model {model!r} in {self.path} (known: {known}); "
                "add it before using the model"
            ) from None

    def pages_to_credits(self, tier: str) -> Decimal:
        try:
            return self.credits_per_page[tier]
        except KeyError:
            known = ", ".join(sorted(self.credits_per_page)) or "none"
            raise ConfigError(
                f"no credits_per_page for LlamaParse tier {tier!r} in {self.path} (known: {known})"
            ) from None


_SCALE = {"usd_per_million": Decimal(1_000_000), "usd_per_thousand": Decimal(1000)}


def _section(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] is missing or not a table")
    return value


def _decimal(value: Any, what: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{what}: {value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise ConfigError(f"{what}: {value!r} must be a number >= 0")
    return number


def _price(service: str, model: str, entry: dict[str, Any], where: str, per: str) -> Price:
    key = f"{where}: {service}.{model}" if model != "credit" else f"{where}: {service}"
    hosted = entry.get("self_hosted", False)
    if not isinstance(hosted, bool):
        raise ConfigError(f"{key}.self_hosted: {hosted!r} must be true or false")
    if hosted:
        if per in entry:
            raise ConfigError(f"{key}: a self-hosted model has no {per} (it costs nothing)")
        unit = entry.get("unit", "tokens")
        return Price(service, model, str(unit), Decimal(0), None, entry.get("source"), True)
    if per not in entry:
        raise ConfigError(f"{key}: {per} is missing")
    as_of = entry.get("as_of")
    try:
        when = as_of if isinstance(as_of, date) else date.fromisoformat(str(as_of))
    except ValueError:
        raise ConfigError(
            f"{key}: as_of must be the date the price was read, got {as_of!r}"
        ) from None
    unit = entry.get("unit")
    if not isinstance(unit, str) or not unit:
        raise ConfigError(f"{key}: unit is missing")
    return Price(
        service=service,
        model=model,
        unit=unit,
        unit_price_usd=(_decimal(entry[per], f"{key}.{per}") / _SCALE[per]).quantize(NANO),
        as_of=when,
        source=entry.get("source"),
    )
