"""The meter every paid call goes through, and the budget guard it asks first.

A paid provider wraps each API call in `Meter.call(estimate)`:

    async with meter.call(tokens) as bill:      # BudgetExceeded here: the call is not made
        response = await send(...)
        bill.report(response.usage, request_id)  # published as a CostUsage event

The call's document, tenant, stage and correlation id come from `current_call`, which the stage
runtime sets around each record. Local providers have no meter: they cost nothing and publish
nothing (one rule: only calls that cost money are in the ledger).

The guard knows the latest throttle state and spend of each service (and tenant) from the
control topic, which the cost accountant keeps current, plus what this process has settled
since its first call in the window and what it has reserved for calls in flight. It refuses a
call that would cross the remaining budget, so one process never crosses it; the spend past a
budget is bounded by what other processes spend before the accountant's figures show it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

import structlog
from aiokafka import AIOKafkaProducer

from ragstream import tracing
from ragstream.codec import Codec
from ragstream.control import ControlState
from ragstream.cost.budget import DAY, HOUR, limit_for, usd, window
from ragstream.cost.pricing import Price
from ragstream.errors import BudgetExceeded
from ragstream.events import CostUsage, ThrottleEvent, ThrottleState
from ragstream.kafkaio import started_producer
from ragstream.settings import BudgetSettings, Settings
from ragstream.topology import Topology

log = structlog.get_logger(__name__)

Scope = tuple[str, str | None]  # (service, tenant or None for the whole service)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who a paid call is made for; set by the stage runtime around each record."""

    stage: str
    document_id: str
    tenant_id: str
    correlation_id: str


current_call: ContextVar[CallContext | None] = ContextVar("ragstream_current_call", default=None)


class UsageSink(Protocol):
    async def publish(self, usage: CostUsage) -> None: ...


class KafkaUsageSink:
    """Publishes CostUsage events to `<prefix>.cost.usage`, acknowledged by all replicas."""

    def __init__(self, settings: Settings, codec: Codec | None = None) -> None:
        self._settings = settings
        self._codec = codec or Codec()
        self._topic = Topology(settings.kafka.topic_prefix).cost_usage
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = await started_producer(self._settings)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def publish(self, usage: CostUsage) -> None:
        assert self._producer is not None, "start() the sink first"
        key = (usage.document_ids[0] if usage.document_ids else usage.service).encode()
        await self._producer.send_and_wait(
            self._topic,
            self._codec.encode(usage),
            key=key,
            headers=tracing.inject(self._codec.headers_for(usage)),  # under the stage's span
        )


@dataclass
class _Room:
    """One scope's use of one window (spend in the day, requests in the hour) as this process
    knows it: the accountant's figure from before this process's first call in the window, what
    this process has settled since, and what it has reserved for calls still in flight."""

    start: datetime | None = None
    base: Decimal | None = None  # None: this process has made no call in this window yet
    settled: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)

    def roll(self, start: datetime) -> None:
        """A new window: what was settled belongs to the old one (open reservations stay)."""
        if self.start != start:
            self.start, self.base, self.settled = start, None, Decimal(0)

    def used(self, reported: Decimal) -> Decimal:
        """At least what the window has used: the accountant's figure, or the figure from
        before this process's first call plus all it settled since (the accountant's may not
        hold those yet), whichever is more; plus the open reservations."""
        known = reported if self.base is None else max(reported, self.base + self.settled)
        return known + self.reserved

    def reserve(self, reported: Decimal, amount: Decimal) -> None:
        if self.base is None:  # seen before this call: it cannot hold the call's usage
            self.base = reported
        self.reserved += amount

    def settle(self, reported: Decimal, reserved: Decimal, actual: Decimal) -> None:
        if self.base is None:  # the window rolled while the call was in flight
            self.base = reported
        self.reserved -= reserved
        self.settled += actual


@dataclass
class _Use:
    day: _Room = field(default_factory=_Room)  # USD
    hour: _Room = field(default_factory=_Room)  # paid requests


class BudgetGuard:
    """Refuses paid calls while a service (or tenant) is throttled or would cross its budget.

    Reservations are kept apart from settled spend: a call's estimate is reserved before it
    starts and released when it settles, and a throttle event never touches open reservations.
    So one process, at any concurrency, never admits calls that jointly cross a budget."""

    def __init__(
        self,
        state: ControlState,
        budgets: BudgetSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.state = state
        self.budgets = budgets
        self._clock = clock
        self._use: dict[Scope, _Use] = {}

    def active_throttle(self, service: str, tenant: str | None = None) -> ThrottleEvent | None:
        """The THROTTLED event in force for the scope, if any (it lapses when its window ends,
        even before the accountant says OPEN)."""
        event = self.state.throttles.get((service, tenant))
        if event is None or event.state is not ThrottleState.THROTTLED:
            return None
        if event.window_ends_at is not None and event.window_ends_at <= self._clock():
            return None
        return event

    def admit(self, service: str, tenant: str | None, cost: Decimal) -> None:
        """Reserve `cost` and one request, or raise BudgetExceeded."""
        now = self._clock()
        scopes: list[Scope] = [(service, None)] + ([(service, tenant)] if tenant else [])
        for scope in scopes:
            self._check(scope, cost, now)
        for scope in scopes:
            use, (spent, requests) = self._rolled(scope, now), self._reported(scope, now)
            use.day.reserve(spent, cost)
            use.hour.reserve(requests, Decimal(1))

    def settle(
        self,
        service: str,
        tenant: str | None,
        reserved: Decimal,
        actual: Decimal,
        *,
        made: bool | None = None,
    ) -> None:
        """Release a reservation and settle what the call really cost (0, and no request,
        when it was not made; `made` defaults to whether it cost anything)."""
        now = self._clock()
        made = actual != 0 if made is None else made
        for scope in [(service, None)] + ([(service, tenant)] if tenant else []):
            use, (spent, requests) = self._rolled(scope, now), self._reported(scope, now)
            use.day.settle(spent, reserved, actual)
            use.hour.settle(requests, Decimal(1), Decimal(made))

    def _rolled(self, scope: Scope, now: datetime) -> _Use:
        use = self._use.setdefault(scope, _Use())
        use.day.roll(window(DAY, self.budgets.day_s, now).start)
        use.hour.roll(window(HOUR, self.budgets.hour_s, now).start)
        return use

    def _reported(self, scope: Scope, now: datetime) -> tuple[Decimal, Decimal]:
        """The accountant's latest spend (day) and requests (hour) for the scope, in the
        current windows."""
        event = self.state.throttles.get(scope)
        if event is None:
            return Decimal(0), Decimal(0)
        day, hour = window(DAY, self.budgets.day_s, now), window(HOUR, self.budgets.hour_s, now)
        spent = event.spent_usd if event.occurred_at >= day.start else Decimal(0)
        requests = Decimal(event.requests if event.occurred_at >= hour.start else 0)
        return spent, requests

    def _check(self, scope: Scope, cost: Decimal, now: datetime) -> None:
        service, tenant = scope
        throttle = self.active_throttle(service, tenant)
        if throttle is not None:
            raise BudgetExceeded(
                f"{service} is throttled: {throttle.reason}",
                service=service,
                tenant_id=tenant,
                retry_after=_seconds_until(throttle.window_ends_at, now),
            )
        event = self.state.throttles.get(scope)
        if event is not None:
            budget, request_budget = event.budget_usd, event.request_budget
        else:
            limit = limit_for(self.budgets, [], service, tenant)
            if limit is None:  # a tenant without a budget of its own
                return
            budget, request_budget = limit.daily_usd, limit.hourly_requests
        use = self._rolled(scope, now)
        reported_spend, reported_requests = self._reported(scope, now)
        spent, requests = use.day.used(reported_spend), use.hour.used(reported_requests)
        who = f"{service} (tenant {tenant})" if tenant else service
        if spent + cost > budget:
            raise BudgetExceeded(
                f"{who}: a call estimated at {usd(cost)} would cross the daily budget "
                f"({usd(spent)} of {usd(budget)} spent or reserved)",
                service=service,
                tenant_id=tenant,
            )
        if requests + 1 > request_budget:
            hour = window(HOUR, self.budgets.hour_s, now)
            raise BudgetExceeded(
                f"{who}: {requests} of {request_budget} paid requests this hour already "
                "(made or in flight)",
                service=service,
                tenant_id=tenant,
                retry_after=_seconds_until(hour.end, now),
            )


def _seconds_until(when: datetime | None, now: datetime) -> float | None:
    return None if when is None else max(0.0, (when - now).total_seconds())


@dataclass
class Bill:
    """What the provider learned from the response: the units the API reported."""

    units: float | None = None
    request_id: str | None = None
    model: str | None = None

    def report(self, units: float, request_id: str | None = None) -> None:
        self.units = units
        self.request_id = request_id


@dataclass
class Meter:
    """Prices, guards and records the paid calls of one service's model or tier."""

    service: str
    operation: str
    model: str
    price: Price
    guard: BudgetGuard | None = None
    sink: UsageSink | None = None
    on_usage: list[Callable[[CostUsage], None]] = field(default_factory=list)

    def estimate(self, units: float) -> Decimal:
        return self.price.cost(units)

    @asynccontextmanager
    async def call(self, estimated_units: float) -> AsyncIterator[Bill]:
        """Admit the call (or raise BudgetExceeded), then record what it really used.

        A self-hosted model's calls are not paid calls: no budget admits them (neither the
        daily dollars nor the hourly requests) and no usage event is published; the process's
        own usage metrics still count their units."""
        ctx = current_call.get()
        tenant = ctx.tenant_id if ctx else None
        reserved = self.estimate(estimated_units)
        guard = None if self.price.self_hosted else self.guard
        if guard is not None:
            guard.admit(self.service, tenant, reserved)
        bill = Bill()
        actual = Decimal(0)
        try:
            yield bill
            if bill.units is not None:
                usage = self.usage(bill, ctx)
                actual = usage.cost_usd
                await self._record(usage)
        finally:
            if guard is not None:
                made = bill.units is not None
                guard.settle(self.service, tenant, reserved, actual, made=made)

    def usage(self, bill: Bill, ctx: CallContext | None) -> CostUsage:
        assert bill.units is not None
        return CostUsage(
            service=self.service,
            operation=self.operation,
            model=bill.model or self.model,
            unit=self.price.unit,
            units=math.ceil(bill.units),
            unit_price_usd=self.price.unit_price_usd,
            cost_usd=self.price.cost(bill.units),
            tenant_id=ctx.tenant_id if ctx else None,
            document_ids=[ctx.document_id] if ctx and ctx.document_id else [],
            stage=ctx.stage if ctx else None,
            correlation_id=ctx.correlation_id if ctx else None,
            request_id=bill.request_id,
        )

    async def _record(self, usage: CostUsage) -> None:
        for listener in self.on_usage:
            listener(usage)
        if self.sink is None or self.price.self_hosted:
            return
        try:
            await self.sink.publish(usage)
        except Exception:
            # The money is spent: say so loudly, with every figure, before the record retries.
            log.error("usage event not published", usage=_fields(usage))
            raise


def _fields(usage: CostUsage) -> dict[str, object]:
    return {
        "event_id": str(usage.event_id),
        "service": usage.service,
        "units": usage.units,
        "unit": usage.unit,
        "cost_usd": str(usage.cost_usd),
        "tenant_id": usage.tenant_id,
        "document_ids": usage.document_ids,
        "request_id": usage.request_id,
    }


@asynccontextmanager
async def metered(meter: Meter | None, estimated_units: float) -> AsyncIterator[Bill]:
    """`meter.call(...)`, or a bill nobody reads when the provider has no meter."""
    if meter is None:
        yield Bill()
        return
    async with meter.call(estimated_units) as bill:
        yield bill
