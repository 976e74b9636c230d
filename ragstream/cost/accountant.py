"""The cost accountant: the `<prefix>-cost` consumer group.

It writes every CostUsage event to the ledger (keyed by the event's id, so a duplicate delivery
counts once) and commits only after the write. After each batch, and every
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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import OffsetAndMetadata

from ragstream.codec import Codec
from ragstream.control import SERVICES, ControlState, throttle_key
from ragstream.cost.budget import Verdict, limit_for, verdict, windows
from ragstream.dlq import dead_letter_headers
from ragstream.errors import DecodeError
from ragstream.events import CostUsage, ThrottleEvent, ThrottleState
from ragstream.metrics import Metrics
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Topology

log = structlog.get_logger(__name__)

NAME = "cost"

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
    ) -> None:
        self.settings = settings
        self.store = store
        self.state = state
        self.codec = codec or Codec()
        self.metrics = metrics or Metrics(process_metrics=False)
        self.topology = Topology(settings.kafka.topic_prefix)
        self.group_id = self.topology.group(NAME)
        self.joined = False
        self.recorded = 0  # usage events newly written to the ledger by this member
        self.duplicates = 0  # usage events that were already there
        self._published: dict[Scope, Published] = {}
        self._producer: AIOKafkaProducer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        kafka = self.settings.kafka
        consumer = AIOKafkaConsumer(
            **kafka.client_options(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=500,
        )
        consumer.subscribe([self.topology.cost_usage], listener=_Joined(self))
        self._producer = AIOKafkaProducer(
            **kafka.client_options(), acks="all", enable_idempotence=True
        )
        await self._producer.start()
        interval = self.settings.budgets.evaluate_interval_s
        try:
            await consumer.start()
            log.info("cost accountant started", group=self.group_id)
            next_check = 0.0
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=int(interval * 1000))
                fresh = 0
                for tp, records in batch.items():
                    fresh += await self._record(records)
                    await consumer.commit({tp: OffsetAndMetadata(records[-1].offset + 1, "")})
                if fresh or time.monotonic() >= next_check:
                    await self.evaluate()
                    next_check = time.monotonic() + interval
        finally:
            await consumer.stop()
            await self._producer.stop()
            self.joined = False
            log.info("cost accountant stopped", recorded=self.recorded, duplicates=self.duplicates)

    async def _record(self, records: list[ConsumerRecord[bytes, bytes]]) -> int:
        events: list[CostUsage] = []
        for record in records:
            try:
                event = self.codec.decode(record.value or b"")
                if not isinstance(event, CostUsage):
                    raise DecodeError(f"{type(event).__name__} is not a CostUsage event")
            except DecodeError as exc:
                await self._dead_letter(record, exc)
                continue
            events.append(event)
        fresh = await self.store.record_usage(events)
        self.recorded += len(fresh)
        self.duplicates += len(events) - len(fresh)
        if len(fresh) < len(events):
            log.info("duplicate usage events ignored", count=len(events) - len(fresh))
        return len(fresh)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], exc: Exception) -> None:
        """An undecodable usage record goes to the DLQ untouched; the ledger goes on."""
        assert self._producer is not None
        log.error("undecodable usage record dead-lettered", error=str(exc), offset=record.offset)
        headers = dead_letter_headers(
            record, exc, stage=NAME, group=self.group_id, kind="poison", attempts=1
        )
        await self._producer.send_and_wait(
            self.topology.dlq, record.value, key=record.key, headers=headers
        )
        self.metrics.record_dead_letter(NAME, type(exc).__name__)

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


class _Joined(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, accountant: CostAccountant) -> None:
        self.accountant = accountant

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.accountant.joined = True
        log.info("cost partitions assigned", partitions=sorted(tp.partition for tp in assigned))
