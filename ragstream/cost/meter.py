"""The meter every paid call goes through, and the budget guard it asks first.

A paid provider wraps each API call in `Meter.call(estimate)`:

    async with meter.call(tokens) as bill:      # BudgetExceeded here: the call is not made
        response = await send(...)
        bill.report(response.usage, request_id)  # published as a CostUsage event

The call's document, tenant, stage and correlation id come from `current_call`, which the stage
runtime sets around each record. Local providers have no meter: they cost nothing and publish
nothing (one rule: only calls that cost money are in the ledger).

The guard knows the latest throttle state and spend of each service (and tenant) from the
control topic, which the cost accountant keeps current, plus what this process has reserved
and spent since. It refuses a call that would cross the remaining budget, so the spend past a
budget is bounded by the calls already in flight in other processes.
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

from ragstream.codec import Codec
from ragstream.control import ControlState
from ragstream.cost.budget import DAY, HOUR, limit_for, window
from ragstream.cost.pricing import Price
from ragstream.errors import BudgetExceeded
from ragstream.events import CostUsage, Event, ThrottleEvent, ThrottleState
from ragstream.kafka_clients import started_or_explained
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
        kafka = self._settings.kafka
        self._producer = await started_or_explained(
            kafka,
            lambda: AIOKafkaProducer(**kafka.client_options(), acks="all", enable_idempotence=True),
        )

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def publish(self, usage: CostUsage) -> None:
        assert self._producer is not None, "start() the sink first"
        key = (usage.document_ids[0] if usage.document_ids else usage.service).encode()
        await self._producer.send_and_wait(
            self._topic, self._codec.encode(usage), key=key, headers=self._codec.headers_for(usage)
        )


@dataclass
class _Tally:
    cost: Decimal = Decimal(0)
    requests: int = 0


class BudgetGuard:
    """Refuses paid calls while a service (or tenant) is throttled or would cross its budget."""

    def __init__(
        self,
        state: ControlState,
        budgets: BudgetSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.state = state
        self.budgets = budgets
        self._clock = clock
        self._local: dict[Scope, _Tally] = {}  # spent and reserved since the last event
        state.listeners.append(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ThrottleEvent):  # the accountant's figures now include ours
            self._local.pop((event.service, event.tenant_id), None)

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
            tally = self._local.setdefault(scope, _Tally())
            tally.cost += cost
            tally.requests += 1

    def settle(self, service: str, tenant: str | None, reserved: Decimal, actual: Decimal) -> None:
        """Replace a reservation by what the call really cost (0 when it was not made)."""
        for scope in [(service, None)] + ([(service, tenant)] if tenant else []):
            tally = self._local.get(scope)
            if tally is not None:
                tally.cost += actual - reserved
                if actual == 0:
                    tally.requests -= 1

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
        day, hour = window(DAY, self.budgets.day_s, now), window(HOUR, self.budgets.hour_s, now)
        if event is not None:
            budget, request_budget = event.budget_usd, event.request_budget
            seen_at = event.occurred_at
            spent = event.spent_usd if seen_at >= day.start else Decimal(0)
            requests = event.requests if seen_at >= hour.start else 0
        else:
            limit = limit_for(self.budgets, [], service, tenant)
            if limit is None:  # a tenant without a budget of its own
                return
            budget, request_budget = limit.daily_usd, limit.hourly_requests
            spent, requests = Decimal(0), 0
        local = self._local.get(scope, _Tally())
        who = f"{service} (tenant {tenant})" if tenant else service
        if spent + local.cost + cost > budget:
            raise BudgetExceeded(
                f"{who}: a call estimated at ${cost:.6f} would cross the daily budget "
                f"(${spent + local.cost:.6f} of ${budget:.2f} spent or reserved)",
                service=service,
                tenant_id=tenant,
            )
        if requests + local.requests + 1 > request_budget:
            raise BudgetExceeded(
                f"{who}: {requests + local.requests} of {request_budget} paid requests "
                "this hour already",
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
        """Admit the call (or raise BudgetExceeded), then record what it really used."""
        ctx = current_call.get()
        tenant = ctx.tenant_id if ctx else None
        reserved = self.estimate(estimated_units)
        if self.guard is not None:
            self.guard.admit(self.service, tenant, reserved)
        bill = Bill()
        actual = Decimal(0)
        try:
            yield bill
            if bill.units is not None:
                usage = self.usage(bill, ctx)
                actual = usage.cost_usd
                await self._record(usage)
        finally:
            if self.guard is not None:
                self.guard.settle(self.service, tenant, reserved, actual)

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
        if self.sink is None:
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
