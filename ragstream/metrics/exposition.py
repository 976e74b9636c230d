"""The registry in Prometheus's text format, as /metrics serves it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the text format (0.0.4), without the `_created` series."""
    return generate_latest(_WithoutCreated(registry))


class _WithoutCreated(Collector):
    """The registry's metrics minus the `_created` samples (creation times Prometheus does
    not need; they would double the series of every counter)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric
