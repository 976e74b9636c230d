"""The compacted control topic: service modes and throttle states, keyed by kind and service.

Every worker reads the topic whole at start (so a new worker starts in the last mode set and
the last throttle state) and then follows it; `ControlState` is what the providers consult on
every call, so a change takes effect within a poll cycle, with no restart, and `Control` (the
state with its budget guard) tells a stage when to hold its partitions. Operators publish mode
changes with `publish_mode` (`ragstream services mode SERVICE MODE`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from ragstream import kafkaio
from ragstream.codec import Codec
from ragstream.errors import ConfigError, DecodeError
from ragstream.events import Event, ServiceMode, ServiceModeChanged, ThrottleEvent, ThrottleState
from ragstream.kafka_clients import started_or_explained
from ragstream.settings import Settings
from ragstream.topology import CONTROL_MODE, CONTROL_THROTTLE, Stage, Topology

if TYPE_CHECKING:
    from ragstream.cost.meter import BudgetGuard

log = structlog.get_logger(__name__)

# The paid services, by the name their modes, throttles, meters and breakers go by.
PARSE_SERVICE: Final = "llamaparse"
EMBED_SERVICE: Final = "openai"
SERVICES = (PARSE_SERVICE, EMBED_SERVICE)
STAGE_SERVICES: Final = {Stage.PARSE: PARSE_SERVICE, Stage.EMBED: EMBED_SERVICE}


@dataclass
class ControlState:
    """The latest mode per service and throttle state per (service, tenant)."""

    defaults: dict[str, ServiceMode]
    modes: dict[str, ServiceMode] = field(default_factory=dict)
    throttles: dict[tuple[str, str | None], ThrottleEvent] = field(default_factory=dict)
    listeners: list[Callable[[Event], None]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> ControlState:
        services = settings.services
        return cls(
            defaults={"llamaparse": services.llamaparse.mode, "openai": services.openai.mode}
        )

    def mode(self, service: str) -> ServiceMode:
        return self.modes.get(service, self.defaults[service])

    def throttled(self, service: str, tenant: str | None = None) -> bool:
        for key in ((service, None), (service, tenant)):
            event = self.throttles.get(key)
            if event is not None and event.state is ThrottleState.THROTTLED:
                return True
        return False

    def apply(self, event: Event) -> None:
        if isinstance(event, ServiceModeChanged):
            if self.modes.get(event.service) != event.mode:
                log.info("service mode changed", service=event.service, mode=event.mode.value)
            self.modes[event.service] = event.mode
        elif isinstance(event, ThrottleEvent):
            self.throttles[(event.service, event.tenant_id)] = event
        else:
            return
        for listener in self.listeners:
            listener(event)


@dataclass(frozen=True)
class Control:
    """What a worker follows on the control topic: modes, throttles, and the budget guard."""

    state: ControlState
    guard: BudgetGuard

    def gate(self, stage: Stage) -> Callable[[], str | None] | None:
        """The reason a stage must hold its partitions: its paid service is throttled while
        served in real mode (hybrid falls back to local instead; local costs nothing)."""
        service = STAGE_SERVICES.get(stage)
        if service is None:
            return None

        def reason() -> str | None:
            if self.state.mode(service) is not ServiceMode.REAL:
                return None
            throttle = self.guard.active_throttle(service)
            return f"{service} throttled: {throttle.reason}" if throttle else None

        return reason


class ControlFollower:
    """Reads the control topic whole, then follows it until stopped."""

    def __init__(self, settings: Settings, state: ControlState, codec: Codec | None = None) -> None:
        self.settings = settings
        self.state = state
        self.codec = codec or Codec()
        self.topic = Topology(settings.kafka.topic_prefix).control
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Catch up with everything on the topic, then keep following in the background."""
        kafka = self.settings.kafka
        consumer = await started_or_explained(
            kafka, lambda: kafkaio.consumer(self.settings, auto_offset_reset="latest")
        )
        self._consumer = consumer
        try:
            await consumer._client.force_metadata_update()
            partitions = sorted(consumer.partitions_for_topic(self.topic) or {0})
            consumer.assign([TopicPartition(self.topic, p) for p in partitions])
            held = await kafkaio.extents(consumer, self.topic, partitions)
            ranges = {TopicPartition(self.topic, p): e for p, e in held.items()}
            async for records in kafkaio.read_to_end(
                consumer, ranges, kafka.request_timeout_ms / 1000
            ):
                self._apply(records)
        except BaseException:
            await consumer.stop()
            raise
        self._task = asyncio.create_task(self._follow(), name="control-follower")

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            self._apply_batch(await self._consumer.getmany(timeout_ms=1000))

    def _apply_batch(self, batch: dict[TopicPartition, list[object]]) -> None:
        for records in batch.values():
            self._apply(records)

    def _apply(self, records: list[object]) -> None:
        for record in records:
            value = getattr(record, "value", None)
            if value is None:  # a tombstone: the key's state was removed
                continue
            try:
                self.state.apply(self.codec.decode(value))
            except DecodeError as exc:
                log.error("undecodable control record skipped", error=str(exc))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


async def snapshot(settings: Settings) -> ControlState:
    """The control topic's current state, read whole once (for reports and checks)."""
    state = ControlState.from_settings(settings)
    follower = ControlFollower(settings, state)
    await follower.start()
    await follower.stop()
    return state


async def publish_control(settings: Settings, key: bytes, event: Event) -> None:
    codec = Codec()
    producer = await kafkaio.started_producer(settings)
    try:
        await producer.send_and_wait(
            Topology(settings.kafka.topic_prefix).control,
            codec.encode(event),
            key=key,
            headers=codec.headers_for(event),
        )
    finally:
        await producer.stop()


async def publish_mode(
    settings: Settings,
    service: str,
    mode: str,
    *,
    requested_by: str | None = None,
    reason: str | None = None,
) -> ServiceModeChanged:
    """Tell every worker to serve `service` in `mode` from now on."""
    if service not in SERVICES:
        raise ConfigError(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
    try:
        chosen = ServiceMode(mode)
    except ValueError:
        choices = ", ".join(m.value for m in ServiceMode)
        raise ConfigError(f"unknown mode {mode!r}; choose one of {choices}") from None
    event = ServiceModeChanged(
        service=service, mode=chosen, requested_by=requested_by, reason=reason
    )
    await publish_control(settings, Topology.control_key(CONTROL_MODE, service), event)
    return event


def throttle_key(service: str, tenant: str | None = None) -> bytes:
    return Topology.control_key(CONTROL_THROTTLE, service, tenant)
