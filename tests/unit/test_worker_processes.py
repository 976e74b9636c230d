"""The merged /metrics of `worker all`: one family per name, every series labelled by worker."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.processes import (
    REMOTE_EMBED_CONCURRENCY,
    free_ports,
    merge_expositions,
    sized_concurrency,
)
from ragstream.settings import load_settings


def _child(handled: int, seconds: float) -> str:
    registry = CollectorRegistry()
    records = Counter("ragstream_records", "Records.", ["stage"], registry=registry)
    duration = Histogram("ragstream_stage_duration_seconds", "Time.", ["stage"], registry=registry)
    records.labels("embed").inc(handled)
    duration.labels("embed").observe(seconds)
    return generate_latest(registry).decode()


def test_children_are_merged_into_one_valid_exposition_labelled_by_worker() -> None:
    text = merge_expositions({"parse": _child(3, 0.1), "embed": _child(5, 2.0)}).decode()
    # One HELP/TYPE per family, however many children export it (Prometheus rejects repeats).
    assert len(re.findall(r"^# TYPE ragstream_records_total counter$", text, re.M)) == 1
    assert len(re.findall(r"^# TYPE ragstream_stage_duration_seconds histogram$", text, re.M)) == 1
    values = {
        (s.name, s.labels.get("worker"), s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert values[("ragstream_records_total", "parse", None)] == 3
    assert values[("ragstream_records_total", "embed", None)] == 5
    assert values[("ragstream_stage_duration_seconds_count", "embed", None)] == 1
    assert values[("ragstream_stage_duration_seconds_bucket", "parse", "+Inf")] == 1
    assert all(worker in ("parse", "embed") for _, worker, _ in values)


def test_a_child_that_does_not_answer_is_left_out() -> None:
    assert merge_expositions({}) == b""


def test_free_ports_are_distinct() -> None:
    ports = free_ports(4, "127.0.0.1")
    assert len(set(ports)) == 4 and all(p > 0 for p in ports)


def test_concurrency_is_sized_to_where_each_stage_works() -> None:
    local = load_settings()
    assert {s: sized_concurrency(local, s) for s in ("parse", "chunk", "embed")} == {
        "parse": 1,
        "chunk": 1,
        "embed": 1,
    }  # micro-batches; the CPU work is in the stages' pools
    remote = load_settings(
        services={
            "llamaparse": {"mode": "real", "max_jobs_in_flight": 12},
            "openai": {"mode": "hybrid"},
        },
    )
    assert sized_concurrency(remote, "parse") == 18  # every job slot busy, and records between
    assert sized_concurrency(remote, "embed") == REMOTE_EMBED_CONCURRENCY
    assert sized_concurrency(remote, "chunk") == 1
