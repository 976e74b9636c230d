"""Waiting for our own dependencies (PostgreSQL, Kafka) instead of failing records.

When a record's handling meets an `InfrastructureUnavailable`, the consumer runtime calls
`InfrastructureWatch.wait`: the dependency is marked down (readiness false, the runners pause
their partitions), one probe loop per dependency asks it with backoff whether it answers
again, and every waiter returns when it does, to try its record again. No attempt is spent,
so an outage of any length dead-letters nothing.

`wait` says how the wait ended: `RECOVERED` (the dependency was down and is back), `WAS_UP`
(the first probe found it answering: the error may be the record's own, and the runtime stops
waiting for it after a few of these) or `ABANDONED` (the caller is shutting down or handing
the partition back).

`until_available` is the same idea for start-up: run a step (connect, migrate, join) until our
dependencies let it through, one log line per attempt, no traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Final, TypeVar

import structlog
from aiokafka import errors as kafka_errors
from aiokafka.errors import KafkaError

from ragstream.errors import InfrastructureError, InfrastructureUnavailable
from ragstream.kafka_clients import diagnose
from ragstream.metrics import Metrics
from ragstream.settings import KafkaSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")
Probe = Callable[[], Awaitable[bool]]

PROBE_BASE_S: Final = 0.5
PROBE_CAP_S: Final = 5.0
PROBE_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.2  # how often a waiter looks at whether it must give up


class Waited(Enum):
    RECOVERED = "recovered"
    WAS_UP = "was-up"
    ABANDONED = "abandoned"


class InfrastructureWatch:
    """Which of this process's dependencies are down; one probe loop per dependency.

    `probes` maps a dependency name to a probe that answers True when it is reachable. A
    waiter may bring its own probe for a dependency the watch has none for (a runner probes
    Kafka through its own producer)."""

    def __init__(
        self,
        probes: dict[str, Probe] | None = None,
        *,
        metrics: Metrics | None = None,
        base_s: float = PROBE_BASE_S,
        cap_s: float = PROBE_CAP_S,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.probes: dict[str, Probe] = dict(probes or {})
        self.metrics = metrics
        self.base_s = base_s
        self.cap_s = cap_s
        self.timeout_s = timeout_s
        self.down: dict[str, str] = {}  # dependency -> the error that sent us waiting
        self._loops: dict[str, asyncio.Task[bool]] = {}

    @property
    def reason(self) -> str | None:
        """Why records are held now, or None when every dependency answers."""
        if not self.down:
            return None
        return "; ".join(f"waiting for {dep}: {err}" for dep, err in sorted(self.down.items()))

    def ready(self) -> bool:
        return not self.down

    async def wait(
        self,
        dependency: str,
        error: BaseException,
        abandon: Callable[[], bool],
        probe: Probe | None = None,
    ) -> Waited:
        """Hold the caller until `dependency` answers again ("" or an unknown name: every
        dependency with a probe). Returns early with ABANDONED when `abandon()` says so."""
        names = [dependency] if dependency else list(self.probes) or [""]
        loops = []
        for name in names:
            loop = self._loops.get(name)
            if loop is None or loop.done():
                chosen = self.probes.get(name) or probe or self._probe_all
                self.down[name or "infrastructure"] = _brief(error)
                if self.metrics is not None and name:
                    self.metrics.set_dependency_up(name, False)
                loop = asyncio.create_task(self._probe_until_up(name, chosen), name=f"probe-{name}")
                self._loops[name] = loop
            loops.append(loop)
        while not all(loop.done() for loop in loops):
            if abandon():
                return Waited.ABANDONED
            await asyncio.wait(loops, timeout=_POLL_S)
        was_down = any(loop.result() for loop in loops)
        return Waited.RECOVERED if was_down else Waited.WAS_UP

    async def close(self) -> None:
        loops = list(self._loops.values())
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        self._loops.clear()

    async def _probe_all(self) -> bool:
        results = [await self._ask(p) for p in self.probes.values()]
        return all(results)

    async def _ask(self, probe: Probe) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await probe())
        except Exception as exc:
            log.debug("probe failed", error=_brief(exc))
            return False

    async def _probe_until_up(self, name: str, probe: Probe) -> bool:
        """Probe with backoff until it answers; True if it was found down at least once."""
        key = name or "infrastructure"
        delay, attempt, since = self.base_s, 0, time.monotonic()
        try:
            while True:
                await asyncio.sleep(delay)
                attempt += 1
                if await self._ask(probe):
                    if attempt > 1:
                        log.warning(
                            "dependency answers again; held records resume",
                            dependency=key,
                            waited_s=round(time.monotonic() - since, 1),
                        )
                    return attempt > 1
                log.warning(
                    "dependency unavailable; records held, nothing dead-lettered",
                    dependency=key,
                    attempt=attempt,
                    error=self.down.get(key),
                    next_probe_s=min(self.cap_s, delay * 2),
                )
                delay = min(self.cap_s, delay * 2)
        finally:
            self.down.pop(key, None)
            if self.metrics is not None and name:
                self.metrics.set_dependency_up(name, True)


# Kafka errors that say a setting is wrong, not that the broker is away: start-up stops.
_KAFKA_SETTINGS_ERRORS: Final[tuple[type[KafkaError], ...]] = (
    kafka_errors.KafkaConfigurationError,
    kafka_errors.IllegalArgumentError,
    kafka_errors.UnsupportedCodecError,
    kafka_errors.IncompatibleBrokerVersion,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
)


def _brief(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def unavailable(exc: BaseException) -> bool:
    """Is this our own broker or database not answering (rather than a bug or a bad setting)?"""
    if isinstance(exc, InfrastructureUnavailable):
        return True
    if isinstance(exc, InfrastructureError):
        return False  # could not be started: a setting or the machine, not a passing outage
    if isinstance(exc, KafkaError):
        return not isinstance(exc, _KAFKA_SETTINGS_ERRORS)
    return isinstance(exc, OSError | TimeoutError)


async def until_available(
    what: str,
    where: str,
    step: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    *,
    base_s: float = 1.0,
    cap_s: float = PROBE_CAP_S,
    on_wait: Callable[[bool], None] | None = None,
    diagnose: Callable[[], Awaitable[BaseException | None]] | None = None,
) -> T | None:
    """Run `step` until it gets through; while our dependencies do not answer, log one line
    per attempt (what, where, why) and try again with backoff. None if `stop` was set first.
    Any other error (a bug, a wrong setting) is raised, and so is what `diagnose` finds behind
    a failed attempt (a refused login is a setting to fix, not an outage to wait out)."""
    delay, attempt = base_s, 0
    while not stop.is_set():
        attempt += 1
        try:
            result = await step()
        except Exception as exc:
            if not unavailable(exc):
                raise
            found = await diagnose() if diagnose is not None else None
            if found is not None:
                raise found from exc
            if on_wait is not None:
                on_wait(False)
            log.warning(
                f"waiting for {what}",
                address=where,
                attempt=attempt,
                error=_brief(exc),
                retry_in_s=round(delay, 1),
            )
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(cap_s, delay * 2)
            continue
        if on_wait is not None:
            on_wait(True)
        if attempt > 1:
            log.info(f"{what} answers", address=where, attempts=attempt)
        return result
    return None


async def until_kafka(
    kafka: KafkaSettings, step: Callable[[], Awaitable[T]], stop: asyncio.Event
) -> T | None:
    """`until_available` for a step that needs the broker; a refused login or TLS handshake
    stops start-up with the setting named (ragstream.kafka_clients.diagnose)."""
    return await until_available(
        "kafka", kafka.bootstrap_servers, step, stop, diagnose=lambda: diagnose(kafka)
    )
