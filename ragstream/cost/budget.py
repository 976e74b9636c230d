"""Budgets, windows and the throttle verdict: pure functions of spend, limits and time.

A service (or a tenant of it) is THROTTLED when its spend in the daily window has reached its
daily budget, or its paid requests in the hourly window have reached the request budget;
WARNING from `warn_ratio` of either; OPEN otherwise. A budget of 0 means no paid calls at all.
Windows are aligned to the Unix epoch (UTC), so a day window starts at 00:00 UTC and every
process computes the same bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from ragstream.events import ThrottleState
from ragstream.settings import BudgetSettings
from ragstream.store._cost import BudgetOverride, WindowUsage

DAY, HOUR = "day", "hour"


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    start: datetime
    end: datetime


def window(name: str, length_s: int, now: datetime) -> Window:
    epoch = int(now.timestamp())
    start = epoch - epoch % length_s
    begin = datetime.fromtimestamp(start, UTC)
    return Window(name, begin, begin + timedelta(seconds=length_s))


def windows(budgets: BudgetSettings, now: datetime) -> tuple[Window, Window]:
    return window(DAY, budgets.day_s, now), window(HOUR, budgets.hour_s, now)


@dataclass(frozen=True, slots=True)
class Limit:
    daily_usd: Decimal
    hourly_requests: int


def limit_for(
    budgets: BudgetSettings,
    overrides: list[BudgetOverride],
    service: str,
    tenant: str | None = None,
) -> Limit | None:
    """The budget of `service` (or of `tenant` on it): runtime override, else config; None
    when a tenant has no budget of its own."""
    configured = budgets.tenants.get(tenant) if tenant else budgets.services.get(service)
    override = next((o for o in overrides if o.service == service and o.tenant_id == tenant), None)
    if tenant and configured is None and override is None:
        return None
    daily = _first(
        override and override.daily_usd, configured and configured.daily_usd, budgets.daily_usd
    )
    hourly = _first(
        override and override.hourly_requests,
        configured and configured.hourly_requests,
        budgets.hourly_requests,
    )
    return Limit(Decimal(str(daily)), int(str(hourly)))


def effective_limits(
    budgets: BudgetSettings,
    overrides: list[BudgetOverride],
    service: str,
    tenant: str | None = None,
) -> str:
    """One line naming the limits in force for a scope and where each comes from."""
    who = f"{service} (tenant {tenant})" if tenant else service
    limit = limit_for(budgets, overrides, service, tenant)
    if limit is None:
        return f"{who}: no budget of its own; the service's budget applies"
    override = next((o for o in overrides if o.service == service and o.tenant_id == tenant), None)
    daily = "set at runtime" if override and override.daily_usd is not None else "config"
    hourly = "set at runtime" if override and override.hourly_requests is not None else "config"
    return (
        f"{who}: daily {usd(limit.daily_usd)} ({daily}), "
        f"{limit.hourly_requests} paid requests an hour ({hourly})"
    )


def usd(amount: Decimal) -> str:
    """Money with the precision it has: at least cents, never a sub-cent amount rounded away
    ($0.0001, not $0.00), at most the ledger's nine places."""
    exponent = amount.normalize().as_tuple().exponent
    places = min(9, max(2, -exponent)) if isinstance(exponent, int) else 2
    return f"${amount:.{places}f}"


def _first(*values: object) -> object:
    """The first value that is set (0 is a value: a budget of nothing)."""
    return next(v for v in values if v is not None and v is not False)


@dataclass(frozen=True, slots=True)
class Verdict:
    state: ThrottleState
    reason: str
    window: str
    window_ends_at: datetime
    spent_usd: Decimal
    budget_usd: Decimal
    requests: int
    request_budget: int


def verdict(
    usage: WindowUsage | None,
    limit: Limit,
    warn_ratio: float,
    day: Window,
    hour: Window,
    *,
    service: str,
    tenant: str | None = None,
) -> Verdict:
    spent = usage.spent_day if usage else Decimal(0)
    requests = usage.requests_hour if usage else 0
    who = f"{service} (tenant {tenant})" if tenant else service
    spend = _ratio(spent, limit.daily_usd)
    # The budget is reached when the next call, at the window's average cost, would cross it:
    # the stages refuse such a call, so spend alone might stop just short of 100%.
    next_call = usage.spent_day / usage.requests_day if usage and usage.requests_day else 0
    if spend < 1 and next_call and spent + next_call > limit.daily_usd:
        spend = 1.0
    calls = _ratio(Decimal(requests), Decimal(limit.hourly_requests))
    over_spend = f"{who}: {usd(spent)} of {usd(limit.daily_usd)} spent this {DAY}"
    over_calls = f"{who}: {requests} of {limit.hourly_requests} paid requests this {HOUR}"
    if spend >= 1 or calls >= 1:
        # When both are exhausted the throttle lasts until the later window ends.
        parts = [(day, over_spend)] * (spend >= 1) + [(hour, over_calls)] * (calls >= 1)
        ends, reason = max(parts, key=lambda p: p[0].end)[0], "; ".join(p[1] for p in parts)
        state = ThrottleState.THROTTLED
    elif spend >= warn_ratio or calls >= warn_ratio:
        ends, reason = (day, over_spend) if spend >= calls else (hour, over_calls)
        state = ThrottleState.WARNING
    else:
        ends, reason = day, f"{who}: within budget"
        state = ThrottleState.OPEN
    return Verdict(
        state=state,
        reason=reason,
        window=ends.name,
        window_ends_at=ends.end,
        spent_usd=spent,
        budget_usd=limit.daily_usd,
        requests=requests,
        request_budget=limit.hourly_requests,
    )


def _ratio(used: Decimal, budget: Decimal) -> float:
    if budget <= 0:
        return float("inf")  # a zero budget allows nothing
    return float(used / budget)
