"""`ragstream cost`: spend by day, service and tenant; budgets used; throttle state; and when
the daily budget runs out at the current rate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ragstream.control import SERVICES, ControlState
from ragstream.cost.budget import limit_for, verdict, windows
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store._cost import SpendRow

RATE_WINDOW = timedelta(hours=1)  # the current rate: spend over the last hour of the window


@dataclass(frozen=True, slots=True)
class BudgetLine:
    service: str
    tenant_id: str | None
    spent_usd: Decimal
    budget_usd: Decimal
    requests_this_hour: int
    request_budget: int
    computed_state: str  # from the ledger now
    published_state: str | None  # the last ThrottleEvent on the control topic
    reason: str | None
    window: str  # the window that decides the state: the one throttling, else the day
    window_ends_at: datetime  # when that window ends (and a throttle from it lifts)
    day_ends_at: datetime
    usd_per_hour: Decimal
    runs_out_at: datetime | None  # None: not before the window resets (or nothing is spent)

    @property
    def used(self) -> float:
        return float(self.spent_usd / self.budget_usd) if self.budget_usd else float("inf")


@dataclass(frozen=True, slots=True)
class CostReport:
    generated_at: datetime
    days: list[SpendRow]
    budgets: list[BudgetLine]

    def as_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at.isoformat(),
            "spend": [
                {
                    "day": r.day.date().isoformat(),
                    "service": r.service,
                    "tenant_id": r.tenant_id,
                    "requests": r.requests,
                    "units": r.units,
                    "unit": r.unit,
                    "cost_usd": str(r.cost_usd),
                }
                for r in self.days
            ],
            "budgets": [
                {
                    "service": b.service,
                    "tenant_id": b.tenant_id,
                    "spent_usd": str(b.spent_usd),
                    "budget_usd": str(b.budget_usd),
                    "used": round(b.used, 4) if b.budget_usd else None,
                    "requests_this_hour": b.requests_this_hour,
                    "request_budget": b.request_budget,
                    "state": b.computed_state,
                    "published_state": b.published_state,
                    "reason": b.reason,
                    "window": b.window,
                    "window_ends_at": b.window_ends_at.isoformat(),
                    "day_ends_at": b.day_ends_at.isoformat(),
                    "usd_per_hour": str(b.usd_per_hour),
                    "runs_out_at": b.runs_out_at.isoformat() if b.runs_out_at else None,
                }
                for b in self.budgets
            ],
        }


async def cost_report(
    settings: Settings,
    store: Store,
    state: ControlState,
    *,
    days: int = 7,
    now: datetime | None = None,
) -> CostReport:
    budgets = settings.budgets
    now = now or datetime.now(UTC)
    day, hour = windows(budgets, now)
    recent_start = max(day.start, now - RATE_WINDOW)
    elapsed_h = Decimal(str(max((now - recent_start).total_seconds(), 1.0) / 3600))
    in_windows = {
        (u.service, u.tenant_id): u for u in await store.window_usage(day.start, hour.start)
    }
    recent = {
        (u.service, u.tenant_id): u for u in await store.window_usage(day.start, recent_start)
    }
    overrides = await store.budget_overrides()
    tenants = set(budgets.tenants) | {o.tenant_id for o in overrides if o.tenant_id}
    lines = []
    for service in SERVICES:
        for tenant in [None, *sorted(tenants)]:
            limit = limit_for(budgets, overrides, service, tenant)
            if limit is None:
                continue
            usage = in_windows.get((service, tenant))
            v = verdict(usage, limit, budgets.warn_ratio, day, hour, service=service, tenant=tenant)
            last = recent.get((service, tenant))
            rate = (last.spent_hour / elapsed_h) if last else Decimal(0)
            runs_out = None
            if rate > 0 and v.spent_usd < limit.daily_usd:
                hours = float((limit.daily_usd - v.spent_usd) / rate)
                at = now + timedelta(hours=hours)
                runs_out = at if at < day.end else None
            elif v.spent_usd >= limit.daily_usd and limit.daily_usd > 0:
                runs_out = now  # already used up
            published = state.throttles.get((service, tenant))
            lines.append(
                BudgetLine(
                    service=service,
                    tenant_id=tenant,
                    spent_usd=v.spent_usd,
                    budget_usd=limit.daily_usd,
                    requests_this_hour=v.requests,
                    request_budget=limit.hourly_requests,
                    computed_state=v.state.value,
                    published_state=published.state.value if published else None,
                    reason=published.reason if published else None,
                    window=v.window,
                    window_ends_at=v.window_ends_at,
                    day_ends_at=day.end,
                    usd_per_hour=rate.quantize(Decimal("0.000001")),
                    runs_out_at=runs_out,
                )
            )
    spend = await store.spend_by_day(
        day.start - timedelta(seconds=budgets.day_s * (days - 1)), budgets.day_s
    )
    return CostReport(generated_at=now, days=spend, budgets=lines)
