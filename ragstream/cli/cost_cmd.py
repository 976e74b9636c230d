"""`ragstream cost` (the report) and `ragstream cost budget` (raise or lower a budget live)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ragstream.cli.common import EXIT_CONFIG, console, fail, run, settings_or_exit
from ragstream.settings import Settings

if TYPE_CHECKING:
    from ragstream.cost.report import CostReport

app = typer.Typer(
    help="Spend against budget: the report, and budgets set at runtime.",
    invoke_without_command=True,
)


async def _report(settings: Settings, days: int) -> CostReport:
    from ragstream.control import snapshot
    from ragstream.cost.report import cost_report
    from ragstream.store import Store

    state = await snapshot(settings)
    async with await Store.from_settings(settings.postgres) as store:
        return await cost_report(settings, store, state, days=days)


@app.callback()
def report(
    ctx: typer.Context,
    days: Annotated[int, typer.Option(min=1, max=366, help="Days of spend to show.")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Spend by day, service and tenant; budgets used; throttle state; when the daily budget
    runs out at the current rate."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_or_exit()
    result = run(_report, settings, days)
    if as_json:
        console.print_json(json.dumps(result.as_json()))
        return
    spend = Table(title=f"spend, last {days} day window(s) (UTC)")
    for col in ("day", "service", "tenant", "requests", "units", "cost (USD)"):
        spend.add_column(
            col, justify="right" if col in ("requests", "units", "cost (USD)") else "left"
        )
    for r in result.days:
        spend.add_row(
            r.day.strftime("%Y-%m-%d %H:%M"),
            r.service,
            r.tenant_id or "-",
            str(r.requests),
            f"{r.units} {r.unit}",
            f"{r.cost_usd:.6f}",
        )
    if not result.days:
        spend.add_row("-", "no paid calls yet", "", "", "", "")
    console.print(spend)
    from ragstream.cost.budget import usd

    budgets = Table(title="budgets now")
    for col in (
        "service",
        "tenant",
        "spent / daily budget",
        "used",
        "requests / hour",
        "state",
        "deciding window",
        "USD per hour",
        "runs out",
    ):
        budgets.add_column(col)
    for b in result.budgets:
        state = b.computed_state
        if b.published_state and b.published_state != state:
            state += f" (published {b.published_state})"
        colour = {"THROTTLED": "red", "WARNING": "yellow"}.get(b.computed_state, "green")
        budgets.add_row(
            b.service,
            b.tenant_id or "(all)",
            f"{usd(b.spent_usd)} / {usd(b.budget_usd)}",
            f"{b.used:.0%}" if b.budget_usd else "no budget",
            f"{b.requests_this_hour} / {b.request_budget}",
            f"[{colour}]{state}[/]",
            f"{b.window}, ends {b.window_ends_at:%Y-%m-%d %H:%M} UTC",
            usd(b.usd_per_hour),
            b.runs_out_at.strftime("%Y-%m-%d %H:%M UTC")
            if b.runs_out_at
            else f"not before the window resets ({b.day_ends_at:%Y-%m-%d %H:%M} UTC)",
        )
    console.print(budgets)


@app.command("budget")
def budget(
    service: Annotated[str, typer.Argument(help="llamaparse | openai")],
    tenant: Annotated[str | None, typer.Option(help="A tenant's own budget.")] = None,
    daily_usd: Annotated[str | None, typer.Option(help="Spend allowed per day window.")] = None,
    hourly_requests: Annotated[
        int | None, typer.Option(min=0, help="Paid requests allowed per hour window.")
    ] = None,
    clear_daily: Annotated[
        bool, typer.Option("--clear-daily", help="Daily spend back to the configured budget.")
    ] = False,
    clear_hourly: Annotated[
        bool,
        typer.Option("--clear-hourly", help="Hourly requests back to the configured budget."),
    ] = False,
    clear: Annotated[bool, typer.Option(help="Both limits back to the configured budget.")] = False,
) -> None:
    """Change a budget at runtime (kept in PostgreSQL, over the config). Only the limits named
    change; the others keep what they were. Prints the limits in force afterwards. The cost
    accountant applies it within budgets.evaluate_interval_s: raising it publishes OPEN."""
    from ragstream.control import SERVICES

    if service not in SERVICES:
        raise fail(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}", EXIT_CONFIG)
    amount = None
    if daily_usd is not None:
        try:
            amount = Decimal(daily_usd)
        except InvalidOperation:
            raise fail(f"--daily-usd {daily_usd!r} is not a number", EXIT_CONFIG) from None
        if not amount.is_finite() or amount < 0:
            raise fail(f"--daily-usd {daily_usd!r} must be a number >= 0", EXIT_CONFIG)
    if clear and (amount is not None or hourly_requests is not None):
        raise fail(
            "--clear goes back to the configured budget: give no values with it", EXIT_CONFIG
        )
    if clear_daily and amount is not None:
        raise fail("give --daily-usd or --clear-daily, not both", EXIT_CONFIG)
    if clear_hourly and hourly_requests is not None:
        raise fail("give --hourly-requests or --clear-hourly, not both", EXIT_CONFIG)
    clear_daily, clear_hourly = clear_daily or clear, clear_hourly or clear
    if not (clear_daily or clear_hourly) and amount is None and hourly_requests is None:
        raise fail(
            "give --daily-usd and/or --hourly-requests, or --clear-daily, --clear-hourly, --clear",
            EXIT_CONFIG,
        )
    settings = settings_or_exit()
    changes = BudgetChange(amount, hourly_requests, clear_daily, clear_hourly)
    limits = run(_set_budget, settings, service, tenant, changes)
    console.print(f"changed: {changes.describe()}")
    console.print(f"in force: {limits}", highlight=False)
    console.print(
        f"the cost accountant applies it within {settings.budgets.evaluate_interval_s:g} s"
    )


@dataclass(frozen=True, slots=True)
class BudgetChange:
    """What one `cost budget` command names; everything else stays as it was."""

    daily_usd: Decimal | None
    hourly_requests: int | None
    clear_daily: bool
    clear_hourly: bool

    def describe(self) -> str:
        from ragstream.cost.budget import usd

        parts = []
        if self.daily_usd is not None:
            parts.append(f"daily spend {usd(self.daily_usd)}")
        if self.clear_daily:
            parts.append("daily spend back to the config")
        if self.hourly_requests is not None:
            parts.append(f"{self.hourly_requests} paid requests an hour")
        if self.clear_hourly:
            parts.append("hourly requests back to the config")
        return "; ".join(parts)


async def _set_budget(
    settings: Settings, service: str, tenant: str | None, change: BudgetChange
) -> str:
    """Apply the change; the limits in force afterwards, as one line."""
    from ragstream.cost.budget import effective_limits
    from ragstream.store import Store
    from ragstream.store.migrate import migrate

    await migrate(settings.postgres.dsn(), dimensions=settings.embed.dimensions)
    async with await Store.from_settings(settings.postgres) as store:
        await store.set_budget(
            service,
            tenant,
            daily_usd=change.daily_usd,
            hourly_requests=change.hourly_requests,
            clear_daily=change.clear_daily,
            clear_hourly=change.clear_hourly,
        )
        overrides = await store.budget_overrides()
    return effective_limits(settings.budgets, overrides, service, tenant)
