"""`Metrics`: every ragstream series of one process, on a registry of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from ragstream.events import DocumentEmbedded
from ragstream.metrics.exposition import exposition
from ragstream.metrics.labels import (
    CALL_BUCKETS,
    CIRCUIT_STATES,
    OUTCOMES,
    PIPELINE_BUCKETS,
    SERVICE_MODES,
    STAGE_BUCKETS,
    THROTTLE_STATES,
    state_value,
)


class TopicPartitionLike(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...


class Metrics:
    """Every ragstream metric of one process, on `self.registry`."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.build_info = Info("ragstream_build", "The running ragstream version.", registry=r)
        self.build_info.info({"version": _version()})
        self.records = Counter(
            "ragstream_records_total",
            "Records a stage finished with, by outcome (ok, duplicate, skipped, retried, "
            "waiting, dead-lettered, poison).",
            ["stage", "outcome"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "ragstream_stage_duration_seconds",
            "Time to handle one record in a stage, retries within the handling included.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.pipeline_latency = Histogram(
            "ragstream_upload_to_embedded_seconds",
            "From a document's upload event to its embedded event.",
            buckets=PIPELINE_BUCKETS,
            registry=r,
        )
        self.batch_records = Histogram(
            "ragstream_batch_records",
            "Records a stage handled in one micro-batch (one transaction and one commit).",
            ["stage"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.inflight_records = Gauge(
            "ragstream_inflight_records",
            "Records a stage is handling right now.",
            ["stage"],
            registry=r,
        )
        self.lag = Gauge(
            "ragstream_consumer_lag",
            "Records in a partition this member owns that its group has not yet committed.",
            ["stage", "topic", "partition"],
            registry=r,
        )
        self.retries = Counter(
            "ragstream_retries_total",
            "Attempts that failed and will be retried.",
            ["stage", "error_class"],
            registry=r,
        )
        self.dead_letters = Counter(
            "ragstream_dead_letters_total",
            "Records sent to the dead-letter topic.",
            ["stage", "error_class"],
            registry=r,
        )
        self.external_calls = Counter(
            "ragstream_external_calls_total",
            "Calls to external services, by status (ok, an HTTP status or an error class).",
            ["service", "operation", "status"],
            registry=r,
        )
        self.external_call_duration = Histogram(
            "ragstream_external_call_duration_seconds",
            "Duration of calls to external services, failed calls included.",
            ["service", "operation"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.circuit_state = Gauge(
            "ragstream_circuit_state",
            "Circuit breaker state per service: 0 closed, 1 half-open, 2 open.",
            ["service"],
            registry=r,
        )
        self.usage_units = Counter(
            "ragstream_usage_units_total",
            "Billable units used per service (tokens, pages, requests).",
            ["service", "unit"],
            registry=r,
        )
        self.spend = Counter(
            "ragstream_spend_usd_total",
            "Money spent per service, in US dollars.",
            ["service"],
            registry=r,
        )
        self.throttle_state = Gauge(
            "ragstream_throttle_state",
            "Budget throttle per service: 0 open, 1 warning, 2 throttled.",
            ["service"],
            registry=r,
        )
        self.service_mode = Gauge(
            "ragstream_service_mode",
            "1 for the mode each service is in as this worker follows the control topic "
            "(local, real, hybrid), 0 for the others.",
            ["service", "mode"],
            registry=r,
        )
        self.budget = Gauge(
            "ragstream_budget_usd",
            "The spending budget of a service for a window, in US dollars.",
            ["service", "window"],
            registry=r,
        )
        self.budget_spent = Gauge(
            "ragstream_budget_spent_usd",
            "What a service has spent of its budget in the current window, in US dollars.",
            ["service", "window"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "ragstream_assigned_partitions",
            "Partitions of its input topic this member of the stage's group owns.",
            ["stage"],
            registry=r,
        )
        self.stage_paused = Gauge(
            "ragstream_stage_paused",
            "1 while the stage holds its input partitions paused because its paid service is "
            "throttled.",
            ["stage"],
            registry=r,
        )
        self.dependency_up = Gauge(
            "ragstream_dependency_up",
            "0 while this process waits for one of its own dependencies (postgres, kafka) to "
            "answer again, its records held; 1 otherwise.",
            ["dependency"],
            registry=r,
        )
        self.restarts = Counter(
            "ragstream_consumer_restarts_total",
            "Times a consumer (stage or cost accountant) crashed and was started again by its "
            "worker process.",
            ["stage"],
            registry=r,
        )
        self.worker_up = Gauge(
            "ragstream_worker_up",
            "1 while this process's runner of the stage is a member of the stage's group.",
            ["stage"],
            registry=r,
        )

    # -- records ---------------------------------------------------------------------------

    def record_handled(self, stage: str, outcome: str, seconds: float) -> None:
        """One record finished: outcome is the stage's status (ok, duplicate, skipped) or
        failed / poison."""
        self.records.labels(stage, outcome).inc()
        self.stage_duration.labels(stage).observe(max(0.0, seconds))

    def record_batch(self, stage: str, records: int) -> None:
        self.batch_records.labels(stage).observe(records)

    def record_pipeline_latency(self, seconds: float) -> None:
        self.pipeline_latency.observe(max(0.0, seconds))

    def record_embedded(self, event: DocumentEmbedded) -> None:
        """Upload-to-embedded latency of a document, from the event's own timestamps."""
        self.record_pipeline_latency((event.occurred_at - event.uploaded_at).total_seconds())

    @contextmanager
    def inflight(self, stage: str) -> Iterator[None]:
        gauge = self.inflight_records.labels(stage)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def record_retry(self, stage: str, error_class: str) -> None:
        self.retries.labels(stage, error_class).inc()

    def record_dead_letter(self, stage: str, error_class: str) -> None:
        self.dead_letters.labels(stage, error_class).inc()

    # -- the consumer group ----------------------------------------------------------------

    def set_member(self, stage: str, assigned_partitions: int) -> None:
        """The runner (re)joined its group with this many partitions (0 is a member too)."""
        for outcome in OUTCOMES:
            self.records.labels(stage, outcome)
        self.stage_duration.labels(stage)
        self.assigned_partitions.labels(stage).set(assigned_partitions)
        self.worker_up.labels(stage).set(1)

    def set_stage_paused(self, stage: str, paused: bool) -> None:
        self.stage_paused.labels(stage).set(1 if paused else 0)

    def record_restart(self, stage: str) -> None:
        self.restarts.labels(stage).inc()

    def set_dependency_up(self, dependency: str, up: bool) -> None:
        self.dependency_up.labels(dependency).set(1 if up else 0)

    def stage_stopped(self, stage: str) -> None:
        """The runner left its group: it owns nothing and reports no lag."""
        self.assigned_partitions.labels(stage).set(0)
        self.worker_up.labels(stage).set(0)
        self._drop_lag_where(lambda s, _t, _p: s == stage)

    def set_lag(self, stage: str, topic: str, partition: int, lag: int) -> None:
        self.lag.labels(stage, topic, str(partition)).set(max(0, lag))

    def drop_lag(self, stage: str, partitions: Iterable[TopicPartitionLike]) -> None:
        """Forget the lag of partitions this member gave away (their new owner reports it)."""
        gone = {(tp.topic, str(tp.partition)) for tp in partitions}
        self._drop_lag_where(lambda s, t, p: s == stage and (t, p) in gone)

    # -- external services -----------------------------------------------------------------

    def record_external_call(
        self, service: str, operation: str, status: str, seconds: float
    ) -> None:
        self.external_calls.labels(service, operation, status).inc()
        self.external_call_duration.labels(service, operation).observe(max(0.0, seconds))

    def known_calls(self, service: str, operation: str) -> None:
        """Show a service's calls at 0 before the first (`ok`, and the duration), so rate()
        and increase() count the first ones too."""
        self.external_calls.labels(service, operation, "ok")
        self.external_call_duration.labels(service, operation)

    @contextmanager
    def external_call(self, service: str, operation: str) -> Iterator[None]:
        """Time a call; its status is `ok` or the class name of what it raised."""
        started = time.perf_counter()
        status = "ok"
        try:
            yield
        except BaseException as exc:
            status = "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
            raise
        finally:
            self.record_external_call(service, operation, status, time.perf_counter() - started)

    def set_circuit_state(self, service: str, state: str) -> None:
        """`state` is a CircuitState (closed, half_open, open)."""
        self.circuit_state.labels(service).set(state_value(CIRCUIT_STATES, state, "circuit"))

    def on_circuit_change(self, name: str, old: str, new: str) -> None:
        """A `CircuitBreaker` listener: `breaker.add_listener(metrics.on_circuit_change)`."""
        self.set_circuit_state(name, new)

    def record_usage(
        self, service: str, unit: str, units: float, cost_usd: Decimal | float
    ) -> None:
        self.usage_units.labels(service, unit).inc(max(0.0, float(units)))
        self.spend.labels(service).inc(max(0.0, float(cost_usd)))

    def set_throttle(self, service: str, state: str) -> None:
        """`state` is a ThrottleState (OPEN, WARNING, THROTTLED)."""
        self.throttle_state.labels(service).set(state_value(THROTTLE_STATES, state, "throttle"))

    def set_mode(self, service: str, mode: str) -> None:
        """The mode the worker serves `service` in now (a ServiceMode value)."""
        for each in SERVICE_MODES:
            self.service_mode.labels(service, each).set(1 if each == str(mode).lower() else 0)

    def set_budget(
        self,
        service: str,
        window: str,
        budget_usd: Decimal | float,
        spent_usd: Decimal | float,
    ) -> None:
        self.budget.labels(service, window).set(float(budget_usd))
        self.budget_spent.labels(service, window).set(float(spent_usd))

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the text format (0.0.4), without the `_created` series."""
        return exposition(self.registry)

    # -- internals -------------------------------------------------------------------------

    def _drop_lag_where(self, match: Callable[[str, str, str], bool]) -> None:
        for sample in [s for m in self.lag.collect() for s in m.samples]:
            labels = sample.labels
            if match(labels["stage"], labels["topic"], labels["partition"]):
                try:
                    self.lag.remove(labels["stage"], labels["topic"], labels["partition"])
                except KeyError:  # removed meanwhile
                    pass


def _version() -> str:
    try:
        return version("ragstream")
    except PackageNotFoundError:
        return "unknown"
