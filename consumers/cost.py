"""The cost accountant: the `<prefix>-cost` consumer group.

It runs on the same consumer runtime as the stages (`consumers.runtime`), so the same failure
policy holds: a ledger write that meets a PostgreSQL outage waits for it (nothing is lost or
dead-lettered), an undecodable usage record goes to the DLQ untouched, and the input offset is
committed only after the write. It writes every CostUsage event to the ledger (keyed by the
event's id, so a duplicate delivery counts once). Soon after new usage, and every
`budgets.evaluate_interval_s` (so a window rolling over, or a budget raised with
`ragstream cost budget`, is seen without new usage), it sums each service's spend over the day
window and its paid requests over the hour window, per service and per tenant with a budget of
its own, and publishes a ThrottleEvent on the compacted control topic, keyed by service (and
tenant), whenever the state changes: WARNING at `warn_ratio`, THROTTLED at the budget, OPEN
when the window rolls over or the budget is raised. While spend moves, the figures are
republished at most once per interval, so the stages' budget guard reads a current spend.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaProducer

from consumers.infrastructure import InfrastructureWatch, unavailable, until_kafka
from consumers.runtime import StageRunner
from consumers.stage import Outcome, RecordContext
from ragstream import kafkaio
from ragstream.codec import Codec
from ragstream.control import SERVICES, ControlState, throttle_key
from ragstream.cost.budget import Verdict, limit_for, verdict, windows
from ragstream.events import CostUsage, Event, ThrottleEvent, ThrottleState
from ragstream.kafka_clients import bounded, started
from ragstream.metrics import Metrics
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import COST, Topology

log = structlog.get_logger(__name__)

NAME = COST

Scope = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class Published:
    verdict: Verdict
    at: float


class CostAccountant:
    """One member of the cost group; `run(stop)` until stopped."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        state: ControlState,
        *,
        codec: Codec | None = None,
        metrics: Metrics | None = None,
        watch: InfrastructureWatch | None = None,
    ) -> None:
        self.name = NAME
        self.settings = settings
        self.store = store
        self.state = state
        self.codec = codec or Codec()
        self.metrics = metrics or Metrics(process_metrics=False)
        self.topology = Topology(settings.kafka.topic_prefix)
        self.group_id = self.topology.group(NAME)
        self.recorded = 0  # usage events newly written to the ledger by this member
        self.duplicates = 0  # usage events that were already there
        self._published: dict[Scope, Published] = {}
        self._producer: AIOKafkaProducer | None = None
        self._fresh = asyncio.Event()  # new usage in the ledger: evaluate soon
        self.runner = StageRunner(
            settings,
            NAME,
            self._account,
            self.codec,
            None,
            metrics=self.metrics,
            accepts=CostUsage,
            watch=watch,
            max_poll_records=500,
        )

    @property
    def joined(self) -> bool:
        return self.runner.joined

    async def run(self, stop: asyncio.Event) -> None:
        kafka = self.settings.kafka

        def make_producer() -> AIOKafkaProducer:
            return kafkaio.producer(self.settings)

        producer = await until_kafka(kafka, lambda: started(make_producer), stop)
        if producer is None:
            return
        self._producer = producer
        try:
            log.info("cost accountant started", group=self.group_id)
            await asyncio.gather(self.runner.run(stop), self._evaluate_until(stop))
        finally:
            await bounded(producer.stop(), "flush the throttle events")
            log.info("cost accountant stopped", recorded=self.recorded, duplicates=self.duplicates)

    async def _account(self, event: Event, ctx: RecordContext) -> Outcome:
        """One usage event into the ledger (a duplicate delivery changes nothing)."""
        assert isinstance(event, CostUsage)
        fresh = await self.store.record_usage([event])
        if fresh:
            self.recorded += 1
            self._fresh.set()
            return Outcome(None, "ok")
        self.duplicates += 1
        log.info("duplicate usage event ignored", event_id=str(event.event_id))
        return Outcome(None, "duplicate")

    async def _evaluate_until(self, stop: asyncio.Event) -> None:
        """Evaluate soon after new usage lands, and every `budgets.evaluate_interval_s`
        regardless, so a window rolling over or a budget raised is seen without new usage.
        A failed round (a store or broker outage) is logged; the next one recomputes all."""
        interval = self.settings.budgets.evaluate_interval_s
        while not stop.is_set():
            try:
                await self.evaluate()
            except Exception as exc:  # the next round recomputes everything from the ledger
                if unavailable(exc):
                    log.warning("budget evaluation waits for its dependencies", error=str(exc))
                else:
                    log.exception("budget evaluation failed; trying again next round")
            self._fresh.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, self._fresh)]
            try:
                await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            await asyncio.sleep(min(0.1, interval))  # let a burst of usage land as one round

    # -- windows and throttle events ---------------------------------------------------------

    async def evaluate(self, now: datetime | None = None) -> list[ThrottleEvent]:
        """Compare every budgeted scope's windows with its budget; publish what changed."""
        budgets = self.settings.budgets
        now = now or datetime.now(UTC)
        day, hour = windows(budgets, now)
        usage = {
            (u.service, u.tenant_id): u
            for u in await self.store.window_usage(day.start, hour.start)
        }
        overrides = await self.store.budget_overrides()
        tenants = set(budgets.tenants) | {o.tenant_id for o in overrides if o.tenant_id}
        published = []
        for service in SERVICES:
            for tenant in [None, *sorted(tenants)]:
                limit = limit_for(budgets, overrides, service, tenant)
                if limit is None:
                    continue
                found = usage.get((service, tenant))
                v = verdict(
                    found,
                    limit,
                    budgets.warn_ratio,
                    day,
                    hour,
                    service=service,
                    tenant=tenant,
                )
                event = await self._publish_if_changed((service, tenant), v)
                if event is not None:
                    published.append(event)
        return published

    async def _publish_if_changed(self, scope: Scope, v: Verdict) -> ThrottleEvent | None:
        last = self.state.throttles.get(scope)
        mine = self._published.get(scope)
        now = time.monotonic()
        if last is None:
            if v.state is ThrottleState.OPEN and not v.spent_usd and not v.requests:
                return None  # nothing used, nothing to say
        elif last.state is v.state and (last.window_ends_at == v.window_ends_at):
            figures = (last.spent_usd, last.requests, last.budget_usd, last.request_budget)
            if figures == (v.spent_usd, v.requests, v.budget_usd, v.request_budget):
                return None
            if mine is not None and now - mine.at < self.settings.budgets.evaluate_interval_s:
                return None  # the figures moved, the state did not: at most once per interval
        service, tenant = scope
        event = ThrottleEvent(
            service=service,
            tenant_id=tenant,
            state=v.state,
            reason=v.reason,
            window=v.window,
            window_ends_at=v.window_ends_at,
            spent_usd=v.spent_usd,
            budget_usd=v.budget_usd,
            requests=v.requests,
            request_budget=v.request_budget,
        )
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.topology.control,
            self.codec.encode(event),
            key=throttle_key(service, tenant),
            headers=self.codec.headers_for(event),
        )
        self._published[scope] = Published(v, now)
        if last is None or last.state is not v.state:
            log.warning(
                "throttle state changed",
                service=service,
                tenant_id=tenant,
                state=v.state.value,
                reason=v.reason,
                window_ends_at=v.window_ends_at.isoformat(),
            )
        self.state.apply(event)  # the follower will bring it back too; applying is idempotent
        return event
