"""Prices, windows, budgets, the throttle verdict, the budget guard and the meter (pure logic)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from consumers.compose import observe_control
from ragstream.cli import app
from ragstream.control import ControlState
from ragstream.cost.budget import (
    DAY,
    HOUR,
    Limit,
    Verdict,
    effective_limits,
    limit_for,
    usd,
    verdict,
    window,
    windows,
)
from ragstream.cost.meter import BudgetGuard, CallContext, Meter, current_call
from ragstream.cost.pricing import PriceTable
from ragstream.errors import BudgetExceeded, ConfigError
from ragstream.events import CostUsage, ServiceMode, ThrottleEvent, ThrottleState
from ragstream.metrics import Metrics
from ragstream.providers.parse.llamaparse import estimate_pages
from ragstream.settings import BudgetSettings, load_settings
from ragstream.store._cost import BudgetOverride, WindowUsage

NOON = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)


def usage(spent: str = "0", requests_hour: int = 0, requests_day: int | None = None) -> WindowUsage:
    return WindowUsage(
        service="openai",
        tenant_id=None,
        spent_day=Decimal(spent),
        requests_day=requests_hour if requests_day is None else requests_day,
        spent_hour=Decimal(0),
        requests_hour=requests_hour,
    )


def judge(u: WindowUsage | None, daily: str = "5.00", hourly: int = 100) -> Verdict:
    day, hour = windows(BudgetSettings(), NOON)
    return verdict(u, Limit(Decimal(daily), hourly), 0.8, day, hour, service="openai")


# -- windows ------------------------------------------------------------------------------


def test_windows_align_to_utc_midnight_and_the_hour() -> None:
    day, hour = windows(BudgetSettings(), NOON)
    assert (day.start, day.end) == (
        datetime(2026, 11, 24, tzinfo=UTC),
        datetime(2026, 11, 25, tzinfo=UTC),
    )
    assert (hour.start, hour.end) == (NOON.replace(minute=0), NOON.replace(minute=0, hour=13))
    short = window(DAY, 20, NOON + timedelta(seconds=7))
    assert short.start == NOON and short.end == NOON + timedelta(seconds=20)


# -- the verdict ----------------------------------------------------------------------------


def test_verdict_open_warning_throttled_by_spend() -> None:
    assert judge(None).state is ThrottleState.OPEN
    assert judge(usage("3.99", 1, 400)).state is ThrottleState.OPEN
    warn = judge(usage("4.00", 1, 400))
    assert warn.state is ThrottleState.WARNING
    assert "$4.00 of $5.00" in warn.reason
    full = judge(usage("5.00", 1, 400))
    assert full.state is ThrottleState.THROTTLED
    assert full.window == DAY
    assert full.window_ends_at == datetime(2026, 11, 25, tzinfo=UTC)


def test_verdict_throttles_when_the_next_average_call_would_cross() -> None:
    # 4 calls of $1.20: $4.80 spent, the next (about $1.20) would cross $5.00.
    v = judge(usage("4.80", 4, 4))
    assert v.state is ThrottleState.THROTTLED


def test_verdict_by_requests_ends_with_the_hour_and_zero_budget_allows_nothing() -> None:
    v = judge(usage("0.01", 100, 100))
    assert v.state is ThrottleState.THROTTLED
    assert v.window == HOUR
    assert v.window_ends_at == NOON.replace(minute=0, hour=13)
    assert "100 of 100 paid requests" in v.reason
    both = judge(usage("9", 100, 100))
    assert both.window == DAY  # the later window decides
    assert judge(None, daily="0").state is ThrottleState.THROTTLED
    assert judge(usage("0", 80, 80)).state is ThrottleState.WARNING


def test_limits_come_from_runtime_override_then_config_then_defaults() -> None:
    budgets = BudgetSettings(
        services={"llamaparse": {"daily_usd": "20"}},  # type: ignore[dict-item]
        tenants={"acme": {"hourly_requests": 7}},  # type: ignore[dict-item]
    )
    assert limit_for(budgets, [], "openai") == Limit(Decimal("5.00"), 100)
    assert limit_for(budgets, [], "llamaparse") == Limit(Decimal("20"), 100)
    assert limit_for(budgets, [], "openai", "acme") == Limit(Decimal("5.00"), 7)
    assert limit_for(budgets, [], "openai", "other") is None
    raised = BudgetOverride("openai", None, Decimal("10"), None, NOON)
    assert limit_for(budgets, [raised], "openai") == Limit(Decimal("10"), 100)
    tenant = BudgetOverride("openai", "new", None, 3, NOON)
    assert limit_for(budgets, [tenant], "openai", "new") == Limit(Decimal("5.00"), 3)


def test_effective_limits_name_where_each_limit_comes_from() -> None:
    budgets = BudgetSettings()
    assert effective_limits(budgets, [], "openai") == (
        "openai: daily $5.00 (config), 100 paid requests an hour (config)"
    )
    hourly = BudgetOverride("openai", None, None, 7, NOON)
    assert effective_limits(budgets, [hourly], "openai") == (
        "openai: daily $5.00 (config), 7 paid requests an hour (set at runtime)"
    )
    daily = BudgetOverride("openai", "acme", Decimal("0.0001"), None, NOON)
    assert effective_limits(budgets, [daily], "openai", "acme") == (
        "openai (tenant acme): daily $0.0001 (set at runtime), 100 paid requests an hour (config)"
    )
    assert "no budget of its own" in effective_limits(budgets, [], "openai", "other")


def test_money_prints_with_the_precision_it_has() -> None:
    assert usd(Decimal("5")) == "$5.00"
    assert usd(Decimal("5.00")) == "$5.00"
    assert usd(Decimal("0.0001")) == "$0.0001"
    assert usd(Decimal("0.004662040")) == "$0.00466204"
    assert usd(Decimal("0.00000000001")) == "$0.000000000"  # past the ledger's nine places
    assert usd(Decimal("1E+1")) == "$10.00"
    tiny = judge(usage("0.00012", 2, 2), daily="0.0001")
    assert "$0.00012 of $0.0001 spent" in tiny.reason


def test_budget_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"budgets\.tenants\.acme\.daily_usd"):
        load_settings(budgets={"tenants": {"acme": {"daily_usd": "-1"}}})
    with pytest.raises(ConfigError, match=r"budgets\.day_s"):
        load_settings(budgets={"day_s": 0})


# -- the guard ------------------------------------------------------------------------------


def throttle(
    state: ThrottleState,
    *,
    spent: str = "0",
    budget: str = "1.00",
    requests: int = 0,
    request_budget: int = 100,
    ends: datetime | None = None,
    tenant: str | None = None,
    at: datetime = NOON,
) -> ThrottleEvent:
    return ThrottleEvent(
        occurred_at=at,
        service="openai",
        tenant_id=tenant,
        state=state,
        reason="test",
        window="day",
        window_ends_at=ends or datetime(2026, 11, 25, tzinfo=UTC),
        spent_usd=Decimal(spent),
        budget_usd=Decimal(budget),
        requests=requests,
        request_budget=request_budget,
    )


def guard(*events: ThrottleEvent, now: datetime = NOON) -> BudgetGuard:
    state = ControlState(defaults={"openai": ServiceMode.REAL, "llamaparse": ServiceMode.REAL})
    g = BudgetGuard(state, BudgetSettings(daily_usd=Decimal("1.00")), clock=lambda: now)
    for event in events:
        state.apply(event)
    return g


def test_guard_reserves_and_refuses_the_call_that_would_cross() -> None:
    g = guard(throttle(ThrottleState.OPEN, spent="0.50"))
    g.admit("openai", "t", Decimal("0.30"))
    with pytest.raises(BudgetExceeded, match="would cross the daily budget") as refused:
        g.admit("openai", "t", Decimal("0.30"))  # 0.50 + 0.30 reserved + 0.30 > 1.00
    assert refused.value.service == "openai" and refused.value.tenant_id is None
    g.settle("openai", "t", Decimal("0.30"), Decimal("0.10"))  # it cost less than estimated
    g.admit("openai", "t", Decimal("0.30"))
    # A newer event from the accountant holds what this process settled, but not the call
    # still in flight: its reservation stays.
    g.state.apply(throttle(ThrottleState.OPEN, spent="0.60"))
    with pytest.raises(BudgetExceeded, match=r"\$0.90 of \$1.00 spent or reserved"):
        g.admit("openai", "t", Decimal("0.39"))
    g.admit("openai", "t", Decimal("0.10"))


def test_guard_keeps_settled_spend_the_accountants_figures_do_not_hold_yet() -> None:
    g = guard(throttle(ThrottleState.OPEN, spent="0.50"))
    g.admit("openai", None, Decimal("0.30"))
    g.settle("openai", None, Decimal("0.30"), Decimal("0.30"))
    # An event computed before the call reached the ledger: the call's spend still counts.
    g.state.apply(throttle(ThrottleState.OPEN, spent="0.50", requests=1))
    with pytest.raises(BudgetExceeded, match="would cross"):
        g.admit("openai", None, Decimal("0.25"))
    # Once the ledger holds it (and another process's $0.05), the accountant's figure decides.
    g.state.apply(throttle(ThrottleState.OPEN, spent="0.85", requests=3))
    g.admit("openai", None, Decimal("0.15"))
    with pytest.raises(BudgetExceeded):
        g.admit("openai", None, Decimal("0.01"))
    # A call refused by the API (never made) releases its reservation and counts no request.
    g.settle("openai", None, Decimal("0.15"), Decimal(0), made=False)
    g.admit("openai", None, Decimal("0.15"))


@pytest.mark.parametrize(("cost", "request_budget"), [("0.07", 1000), ("0.0001", 12)])
async def test_guard_at_concurrency_8_never_crosses_a_budget_while_events_arrive(
    cost: str, request_budget: int
) -> None:
    """Eight callers with random latency; the accountant publishes figures every few
    milliseconds from a ledger that lags the calls. Neither the $1.00 daily budget nor the
    hourly request budget is crossed, and the callers get close to it."""
    g = guard()
    rng = random.Random(22)
    price = Decimal(cost)
    ledger: list[Decimal] = []
    made: list[Decimal] = []
    done = asyncio.Event()

    async def accountant() -> None:
        while not done.is_set():
            await asyncio.sleep(0.002)
            figures = throttle(
                ThrottleState.OPEN,
                spent=str(sum(ledger, Decimal(0))),
                requests=len(ledger),
                request_budget=request_budget,
            )
            g.state.apply(figures)

    async def caller() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(40):
            try:
                g.admit("openai", "t", price)
            except BudgetExceeded:
                await asyncio.sleep(0.003)
                continue
            await asyncio.sleep(rng.uniform(0.002, 0.012))  # the request in flight
            made.append(price)
            g.settle("openai", "t", price, price)
            loop.call_later(rng.uniform(0.001, 0.02), ledger.append, price)  # ledger lags

    following = asyncio.create_task(accountant())
    await asyncio.gather(*(caller() for _ in range(8)))
    done.set()
    await following
    spent = sum(made, Decimal(0))
    assert spent <= Decimal("1.00") and len(made) <= request_budget, (spent, len(made))
    assert len(made) == min(14, request_budget)  # the budget is used, not wasted


def test_guard_obeys_a_throttle_until_its_window_ends() -> None:
    ends = NOON + timedelta(minutes=10)
    g = guard(throttle(ThrottleState.THROTTLED, spent="1.00", ends=ends))
    with pytest.raises(BudgetExceeded, match="throttled") as refused:
        g.admit("openai", None, Decimal("0.01"))
    assert refused.value.retry_after == 600
    assert g.active_throttle("openai") is not None
    lapsed = guard(
        throttle(ThrottleState.THROTTLED, spent="1.00", ends=ends, at=NOON),
        now=ends + timedelta(seconds=1),
    )
    assert lapsed.active_throttle("openai") is None  # the window it named is over


def test_guard_forgets_spend_of_a_past_window_and_counts_requests() -> None:
    yesterday = NOON - timedelta(days=1)
    g = guard(throttle(ThrottleState.WARNING, spent="0.95", at=yesterday))
    g.admit("openai", None, Decimal("0.90"))  # yesterday's spend is not today's
    calls = guard(throttle(ThrottleState.OPEN, requests=99, request_budget=100))
    calls.admit("openai", None, Decimal("0"))
    with pytest.raises(BudgetExceeded, match="100 of 100 paid requests") as refused:
        calls.admit("openai", None, Decimal("0"))
    assert refused.value.retry_after == 30 * 60


def test_guard_holds_a_tenant_to_its_own_budget_only() -> None:
    tenant_throttled = throttle(ThrottleState.THROTTLED, spent="1.00", tenant="acme")
    g = guard(tenant_throttled)
    with pytest.raises(BudgetExceeded) as refused:
        g.admit("openai", "acme", Decimal("0.01"))
    assert refused.value.tenant_id == "acme"
    g.admit("openai", "other", Decimal("0.01"))


# -- the meter ------------------------------------------------------------------------------


class ListSink:
    def __init__(self) -> None:
        self.published: list[CostUsage] = []

    async def publish(self, usage: CostUsage) -> None:
        self.published.append(usage)


async def test_meter_prices_and_publishes_what_the_api_reported_for_the_current_document() -> None:
    prices = PriceTable.load()
    sink = ListSink()
    g = guard(throttle(ThrottleState.OPEN, spent="0"))
    meter = Meter(
        "openai",
        "embeddings",
        "text-embedding-3-small",
        prices.embedding("text-embedding-3-small"),
        g,
        sink,
    )
    token = current_call.set(CallContext("embed", "doc-1", "acme", "corr-1"))
    try:
        async with meter.call(1000) as bill:
            bill.report(1234, request_id="req-1")
    finally:
        current_call.reset(token)
    (event,) = sink.published
    assert (event.units, event.unit, event.cost_usd) == (1234, "tokens", Decimal("0.00002468"))
    assert event.unit_price_usd == Decimal("0.00000002")
    assert (event.tenant_id, event.document_ids, event.stage) == ("acme", ["doc-1"], "embed")
    assert (event.correlation_id, event.request_id) == ("corr-1", "req-1")


async def test_meter_refuses_before_the_call_and_publishes_nothing() -> None:
    sink = ListSink()
    g = guard(throttle(ThrottleState.THROTTLED, spent="1.00"))
    meter = Meter(
        "openai", "embeddings", "m", PriceTable.load().embedding("text-embedding-3-small"), g, sink
    )
    called = False
    with pytest.raises(BudgetExceeded):
        async with meter.call(10):
            called = True
    assert not called and not sink.published


# -- prices ---------------------------------------------------------------------------------


def test_price_table_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PriceTable.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[openai\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        PriceTable.load(bad)
    undated = tmp_path / "undated.toml"
    undated.write_text(
        '[openai.m]\nunit = "tokens"\nusd_per_million = "1"\n'
        '[llamaparse]\nunit = "credits"\nusd_per_thousand = "1"\nas_of = 2026-01-01\n'
        "[llamaparse.credits_per_page]\nfast = 1\n"
    )
    with pytest.raises(ConfigError, match=r"openai\.m: as_of must be the date"):
        PriceTable.load(undated)
    with pytest.raises(ConfigError, match="no price for OpenAI model 'nope'"):
        PriceTable.load().embedding("nope")
    with pytest.raises(ConfigError, match="tier 'gold'"):
        PriceTable.load().pages_to_credits("gold")


def test_page_estimate_for_a_job() -> None:
    pdf = b"%PDF-1.7\n1 0 obj <</Type /Pages>>\n2 0 obj <</Type /Page>>\n3 0 obj <</Type/Page>>"
    assert estimate_pages(pdf, "application/pdf") == 2
    assert estimate_pages(b"x" * 12_000, "text/markdown") == 3
    assert estimate_pages(b"short", "text/plain") == 1


# -- the CLI refuses bad budgets before touching anything ----------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "--daily-usd", "1"], "unknown service 'nope'"),
        (["openai"], "give --daily-usd and/or --hourly-requests, or --clear-daily"),
        (["openai", "--clear-daily", "--daily-usd", "1"], "not both"),
        (["openai", "--clear-hourly", "--hourly-requests", "1"], "not both"),
        (["openai", "--daily-usd", "-1"], "must be a number >= 0"),
        (["openai", "--daily-usd", "NaN"], "must be a number >= 0"),
        (["openai", "--clear", "--daily-usd", "1"], "give no values with it"),
    ],
)
def test_cost_budget_refuses_bad_input_with_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["cost", "budget", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_worker_metrics_carry_the_daily_budget_whichever_window_throttled() -> None:
    metrics = Metrics(process_metrics=False)
    by_requests = throttle(ThrottleState.THROTTLED, spent="0.40", budget="5.00", requests=100)
    observe_control(metrics, replace(by_requests, window="hour"))
    text = metrics.exposition().decode()
    assert 'ragstream_budget_usd{service="openai",window="daily"} 5.0' in text
    assert 'ragstream_budget_spent_usd{service="openai",window="daily"} 0.4' in text
    assert 'ragstream_throttle_state{service="openai"} 2.0' in text
