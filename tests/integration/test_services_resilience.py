"""The pipeline riding out the paid services' bad days, over real HTTP, a real broker and a real
PostgreSQL: LlamaParse jobs longer than `max.poll.interval.ms`, many jobs in flight, an OpenAI
429 storm, an account out of quota, and the OpenAI server going away in hybrid mode."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import pytest
from aiokafka.partitioner import DefaultPartitioner

from consumers.runtime import StageRunner
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.providers.circuit import CircuitBreaker, CircuitState
from ragstream.providers.select import breaker_for
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.store.models import Step
from ragstream.topology import (
    H_ERR_ATTEMPTS,
    H_ERR_CLASS,
    H_ERR_DOCUMENT,
    H_ERR_KIND,
    H_ERR_MESSAGE,
    H_ERR_STAGE,
    Stage,
    Topology,
)
from tests.integration.pipeline_helpers import (
    committed_offsets,
    read_topic,
    rows_per_document,
    status_counts,
    variant,
    wait_for_statuses,
    wait_until,
    workers,
)
from tests.integration.test_failures import dlq_depth
from tests.servers.llamaparse_server import LlamaParseServer
from tests.servers.openai_server import Fault, OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_KEY = "test-key"
EMBEDDED = frozenset({"embedded"})
DEAD = frozenset({"dead-lettered"})
OPEN, HALF_OPEN, CLOSED = CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED


# -- helpers -----------------------------------------------------------------------------------


def real(base_url: str, mode: str = "real", **extra: Any) -> dict[str, Any]:
    """A `services.<name>` section pointing at a local server."""
    return {"mode": mode, "base_url": base_url, "api_key": API_KEY, **extra}


def ids_on_partitions(partitions: Iterable[int], partition_count: int) -> list[str]:
    """Document ids whose records land on the given partitions (the producer's default
    partitioner: murmur2 of the key), so the test knows which records share a partition."""
    choose = DefaultPartitioner()
    every = list(range(partition_count))
    ids = []
    for wanted in partitions:
        while choose((candidate := str(uuid.uuid4())).encode(), every, every) != wanted:
            pass
        ids.append(candidate)
    return ids


def document(n: int, tag: str) -> bytes:
    return (
        f"# Field notes {n} ({tag})\n\nObservations {n} of {tag} about tides and herons.\n\n"
        f"## Method\n\nCounted at dawn, entry {n}, marker {tag}-{n}.\n"
    ).encode()


async def upload_all(
    settings: Settings, tenant: str, document_ids: Sequence[str] | int, tag: str = ""
) -> list[str]:
    ids = (
        [str(uuid.uuid4()) for _ in range(document_ids)]
        if isinstance(document_ids, int)
        else list(document_ids)
    )
    tag = tag or tenant
    async with Uploader(settings) as up:
        for n, doc_id in enumerate(ids):
            await up.upload_bytes(
                document(n, tag), f"notes-{tag}-{n}.md", tenant_id=tenant, document_id=doc_id
            )
    return ids


async def steps(store: Store, document_id: str, stage: str) -> list[Step]:
    journey = await store.journey(document_id)
    assert journey is not None, document_id
    return [s for s in journey.steps if s.stage == stage]


async def embedding_providers(settings: Settings, tenant: str) -> dict[str, set[tuple[str, str]]]:
    """Per document: the (provider, model) pairs of its stored embedding rows."""
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT document_id, provider, model FROM embeddings WHERE tenant_id = $1",
            tenant,
        )
    finally:
        await conn.close()
    out: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r["document_id"], set()).add((r["provider"], r["model"]))
    return out


async def none_lost(settings: Settings, tenant: str, document_ids: Sequence[str]) -> None:
    """Every document embedded, each chunk with exactly one embedding, nothing dead-lettered."""
    assert await status_counts(settings, tenant) == {"embedded": len(document_ids)}
    rows = await rows_per_document(settings, tenant)
    assert sorted(rows) == sorted(document_ids)
    for doc_id, counts in rows.items():
        assert counts["parse_results"] == 1, (doc_id, counts)
        assert counts["chunks"] == counts["embeddings"] > 0, (doc_id, counts)
    assert await dlq_depth(settings) == 0


class Transitions:
    """A circuit breaker listener that keeps every transition with its time."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, CircuitState]] = []

    def __call__(self, _name: str, _old: CircuitState, new: CircuitState) -> None:
        self.seen.append((time.monotonic(), new))

    @property
    def states(self) -> list[CircuitState]:
        return [state for _, state in self.seen]


def watched(settings: Settings, service: str) -> tuple[CircuitBreaker, Transitions]:
    breaker = breaker_for(settings, service)
    transitions = Transitions()
    breaker.add_listener(transitions)
    return breaker, transitions


def circuit_gauge(runners: Sequence[StageRunner], service: str) -> float | None:
    """The worker's exported circuit state: 0 closed, 1 half-open, 2 open."""
    return runners[0].metrics.registry.get_sample_value(
        "ragstream_circuit_state", {"service": service}
    )


def runner(runners: Sequence[StageRunner], stage: Stage) -> StageRunner:
    (found,) = [r for r in runners if r.stage is stage]
    return found


# -- LlamaParse: long jobs, many jobs ----------------------------------------------------------


async def test_parse_jobs_longer_than_max_poll_interval_cause_no_rebalance(
    settings: Settings,
) -> None:
    max_poll_ms, job_s = 6000, 8.0
    with LlamaParseServer(job_duration_s=job_s) as server:
        settings = variant(
            settings,
            # session.timeout.ms may not go below the broker's group.min.session.timeout.ms
            # (6 s); max.poll.interval.ms, checked by the client, is set as low
            kafka={"max_poll_interval_ms": max_poll_ms, "session_timeout_ms": 6000},
            services={"llamaparse": real(server.url, poll_interval_s=0.2)},
        )
        tenant = settings.kafka.topic_prefix
        await ensure_topics(settings)
        ids = ids_on_partitions(range(3), settings.kafka.partitions)  # one slow job each
        async with workers(settings) as runners:
            assignments = {r.stage: set(r.assignment) for r in runners}
            for r in runners:
                r.assigned.clear()  # set again by any later assignment: a rebalance
            started = time.monotonic()
            await upload_all(settings, tenant, ids)
            async with await Store.connect(settings.postgres.dsn()) as store:
                await wait_for_statuses(store, ids, 60, statuses=EMBEDDED)
                elapsed = time.monotonic() - started
                parse_steps = {d: await steps(store, d, "parse") for d in ids}
            reassigned = [r.stage.value for r in runners if r.assigned.is_set()]
            assert {r.stage: set(r.assignment) for r in runners} == assignments
            parse_runner = runner(runners, Stage.PARSE)
            assert (parse_runner.stats.processed, parse_runner.stats.retried) == (3, 0)
        parse_group = Topology(settings.kafka.topic_prefix).group(Stage.PARSE)
        committed = await committed_offsets(settings, parse_group)

    assert reassigned == [], f"partitions were assigned again (a rebalance) in {reassigned}"
    for doc_id, found in parse_steps.items():
        (step,) = found  # handled once: never handed back and parsed again
        assert (step.outcome, step.attempt, step.detail["parser"]) == ("ok", 1, "llamaparse")
        assert step.duration_ms > max_poll_ms, (doc_id, step.duration_ms)
    assert len(server.uploads) == 3  # one job per document
    assert server.max_running() == 3  # the three jobs ran side by side
    uploaded = Topology(settings.kafka.topic_prefix).uploaded
    assert sum(off for tp, off in committed.items() if tp.topic == uploaded) == 3
    await none_lost(settings, tenant, ids)
    slowest = max(s.duration_ms for (s,) in parse_steps.values()) / 1000
    print(
        f"\nslow parse: jobs of {job_s:g}s, parse steps up to {slowest:.1f}s against "
        f"max.poll.interval.ms={max_poll_ms}; 3 documents embedded in {elapsed:.1f}s; "
        "no partition assigned twice"
    )


async def test_parse_stage_keeps_up_to_max_jobs_in_flight(settings: Settings) -> None:
    partitions, cap, job_s = 6, 4, 1.5
    with LlamaParseServer(job_duration_s=job_s) as server:
        settings = variant(
            settings,
            kafka={"partitions": partitions},
            services={"llamaparse": real(server.url, poll_interval_s=0.1, max_jobs_in_flight=cap)},
        )
        tenant = settings.kafka.topic_prefix
        await ensure_topics(settings)
        # eight documents over six partitions, one partition handled per slot of --concurrency
        ids = ids_on_partitions([0, 1, 2, 3, 4, 5, 0, 1], partitions)
        async with workers(settings, concurrency=partitions):
            started = time.monotonic()
            await upload_all(settings, tenant, ids)
            async with await Store.connect(settings.postgres.dsn()) as store:
                await wait_for_statuses(store, ids, 60, statuses=EMBEDDED)
            elapsed = time.monotonic() - started
    assert server.max_running() == cap  # as many jobs at once as allowed, and no more
    assert len(server.uploads) == len(ids)
    serial_s = len(ids) * job_s
    assert elapsed < serial_s, f"{elapsed:.1f}s: no faster than one job at a time"
    await none_lost(settings, tenant, ids)
    print(
        f"\nparse concurrency: {len(ids)} jobs of {job_s:g}s, at most {server.max_running()} "
        f"running at once (max_jobs_in_flight={cap}), all embedded in {elapsed:.1f}s "
        f"(one at a time: {serial_s:.0f}s)"
    )


# -- OpenAI: a 429 storm, no quota ---------------------------------------------------------------


async def test_a_429_storm_is_ridden_out_and_no_document_is_lost(settings: Settings) -> None:
    with OpenAIServer() as server:
        settings = variant(
            settings,
            services={
                "openai": real(
                    server.base_url, circuit_failures=3, circuit_window_s=10, circuit_open_s=1
                )
            },
            # retries 0.25-0.5 s, 0.5-1 s, then 1-2 s: at least 5.75 s before attempt 8 is used
            retry={"base_s": 0.5, "factor": 2.0, "cap_s": 2.0, "max_attempts": 8},
        )
        tenant = settings.kafka.topic_prefix
        await ensure_topics(settings)
        breaker, transitions = watched(settings, "openai")
        async with workers(settings, breakers={"openai": breaker}) as runners:
            server.fail_for(60, Fault.rate_limit(retry_after_s=0.5))
            storm_started = time.monotonic()
            ids = await upload_all(settings, tenant, 6)
            async with await Store.connect(settings.postgres.dsn()) as store:

                async def all_refused() -> bool:
                    for doc_id in ids:
                        if not any(
                            s.outcome == "retry" for s in await steps(store, doc_id, "embed")
                        ):
                            return False
                    return True

                # The storm lasts until every document has been turned away at least once and
                # the circuit it opened has let a probe through into it, and been opened again.
                await wait_until(all_refused, 30, "every document to be refused by the storm")
                await wait_until(
                    lambda: transitions.states[:3] == [OPEN, HALF_OPEN, OPEN],
                    30,
                    "a probe of the half-open circuit to meet the storm",
                    explain=lambda: transitions.states,
                )
                server.calm()
                calmed = time.monotonic()
                await wait_for_statuses(store, ids, 60, statuses=EMBEDDED)
                recovered = time.monotonic() - calmed

                async def journeys_written() -> bool:  # the step lands after the status
                    found = [await steps(store, d, "embed") for d in ids]
                    return all(any(s.outcome == "ok" for s in f) for f in found)

                await wait_until(journeys_written, 15, "every embed step in the journey")
                embed_steps = {d: await steps(store, d, "embed") for d in ids}
            assert circuit_gauge(runners, "openai") == 0  # closed again
            retried = runner(runners, Stage.EMBED).stats.retried
            registry = runners[0].metrics.registry
            calls = {
                status: registry.get_sample_value(
                    "ragstream_external_calls_total",
                    {"service": "openai", "operation": "embeddings", "status": status},
                )
                or 0
                for status in ("ok", "RetryableError")
            }
            timed = registry.get_sample_value(
                "ragstream_external_call_duration_seconds_count",
                {"service": "openai", "operation": "embeddings"},
            )

    # Every call through the breaker is counted and timed: the storm's refusals and the rest.
    assert calls["ok"] >= len(ids) and calls["RetryableError"] >= 1, calls
    assert timed == calls["ok"] + calls["RetryableError"]
    served_429 = server.refused("injected_rate_limit")
    assert served_429 >= 4  # enough to open the circuit, then a probe refused
    assert all(c.at >= calmed - 0.05 for c in server.ok_calls())  # nothing got through the storm
    for doc_id, found in embed_steps.items():
        *refused, last = found
        assert refused and all(s.outcome == "retry" for s in refused), (doc_id, found)
        assert (last.outcome, last.detail["provider"]) == ("ok", "openai")
        for s in refused:
            error = f"{s.detail['error_class']}: {s.detail['error']}"
            assert "rate limited (429)" in error or "circuit 'openai' is " in error, error
    # Opened by the storm, probed (and reopened) while it lasted, closed by the first success.
    assert transitions.states[-2:] == [HALF_OPEN, CLOSED]
    assert CLOSED not in transitions.states[:-1]
    await none_lost(settings, tenant, ids)
    assert (await embedding_providers(settings, tenant)) == {
        d: {("openai", "text-embedding-3-small")} for d in ids
    }
    print(
        f"\n429 storm: {calmed - storm_started:.1f}s long, {served_429} 429s served, "
        f"{retried} embed retries ({sum(len(s) - 1 for s in embed_steps.values())} in the "
        f"journeys), circuit {' -> '.join(s.value for s in transitions.states)}; "
        f"all {len(ids)} embedded {recovered:.1f}s after the storm"
    )


async def test_insufficient_quota_is_dead_lettered_at_once_with_the_reason(
    settings: Settings,
) -> None:
    with OpenAIServer() as server:
        settings = variant(
            settings,
            # one failure would open the circuit: a quota refusal must not count as one
            services={"openai": real(server.base_url, circuit_failures=1, circuit_open_s=60)},
        )
        tenant = settings.kafka.topic_prefix
        await ensure_topics(settings)
        breaker, transitions = watched(settings, "openai")
        async with workers(settings, breakers={"openai": breaker}):
            server.fail_for(60, Fault.insufficient_quota())
            ids = await upload_all(settings, tenant, 2)
            async with await Store.connect(settings.postgres.dsn()) as store:
                docs = await wait_for_statuses(store, ids, 60, statuses=DEAD)
                embed_steps = {d: await steps(store, d, "embed") for d in ids}
                server.calm()  # the account is topped up: the next document goes through
                (later,) = await upload_all(settings, tenant, 1, tag=f"{tenant}-later")
                await wait_for_statuses(store, [later], 60, statuses=EMBEDDED)

    assert server.refused("insufficient_quota") == 2  # one call each: no retry
    assert transitions.states == []
    for doc_id, doc in docs.items():
        reason = doc.status_reason or ""
        assert reason.startswith("embed: InsufficientQuotaError: openai: insufficient_quota")
        assert "retrying cannot help" in reason
        (step,) = embed_steps[doc_id]
        assert (step.outcome, step.attempt) == ("dead-lettered", 1)
        assert step.detail["error_class"] == "InsufficientQuotaError"
    dlq = await read_topic(settings, Topology(settings.kafka.topic_prefix).dlq, at_least=2)
    assert sorted(r.document_id for r in dlq) == sorted(ids)
    for record in dlq:
        headers = {k: v.decode() for k, v in record.headers.items()}
        assert headers[H_ERR_CLASS] == "InsufficientQuotaError"
        assert (headers[H_ERR_KIND], headers[H_ERR_ATTEMPTS], headers[H_ERR_STAGE]) == (
            "permanent",
            "1",
            "embed",
        )
        assert headers[H_ERR_DOCUMENT] == record.document_id
        assert "insufficient_quota" in headers[H_ERR_MESSAGE]
    assert (await embedding_providers(settings, tenant)) == {
        later: {("openai", "text-embedding-3-small")}
    }


# -- hybrid: the server goes away and comes back -------------------------------------------------


async def test_hybrid_falls_back_while_the_circuit_is_open_and_returns_after_a_probe(
    settings: Settings,
) -> None:
    open_s = 1.5
    with OpenAIServer() as server:
        settings = variant(
            settings,
            services={
                "openai": real(
                    server.base_url,
                    mode="hybrid",
                    circuit_failures=2,
                    circuit_window_s=30,
                    circuit_open_s=open_s,
                )
            },
            retry={"base_s": 0.2, "cap_s": 1.0},
        )
        tenant = settings.kafka.topic_prefix
        await ensure_topics(settings)
        breaker, transitions = watched(settings, "openai")
        async with (
            workers(settings, breakers={"openai": breaker}) as runners,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            before = await upload_all(settings, tenant, 1, tag=f"{tenant}-before")
            await wait_for_statuses(store, before, 30, statuses=EMBEDDED)
            assert circuit_gauge(runners, "openai") == 0

            server.stop()
            stopped = time.monotonic()
            down = await upload_all(settings, tenant, 4, tag=f"{tenant}-down")
            await wait_for_statuses(store, down, 30, statuses=EMBEDDED)
            fell_back = time.monotonic() - stopped
            assert transitions.states[0] is OPEN
            assert CLOSED not in transitions.states  # never closed while down
            assert circuit_gauge(runners, "openai") == 2  # open
            calls_before_restart = len(server.calls)

            server.start()
            await wait_until(
                lambda: breaker.retry_after() == 0, open_s + 1, "the circuit's open time to pass"
            )
            seen_before_probe = len(transitions.seen)
            # One at a time: while the probe is out, a second document would go to local.
            after = []
            for n in range(2):
                after += await upload_all(settings, tenant, 1, tag=f"{tenant}-after{n}")
                await wait_for_statuses(store, after, 30, statuses=EMBEDDED)
            assert circuit_gauge(runners, "openai") == 0
            down_steps = {d: await steps(store, d, "embed") for d in down}

    providers = await embedding_providers(settings, tenant)
    openai, local = ("openai", "text-embedding-3-small"), ("local", "local-hash-v1")
    assert {d: providers[d] for d in before + after} == {d: {openai} for d in before + after}
    assert {d: providers[d] for d in down} == {d: {local} for d in down}
    for doc_id in down:
        assert down_steps[doc_id][-1].detail["provider"] == "local", down_steps[doc_id]
    assert calls_before_restart == 1  # only the first document reached the server
    probe = [s for _, s in transitions.seen[seen_before_probe:]]
    assert probe == [HALF_OPEN, CLOSED]
    assert [c.status for c in server.calls] == [200] * (1 + len(after))  # the probe succeeded
    await none_lost(settings, tenant, before + down + after)
    print(
        f"\nhybrid: circuit {' -> '.join(s.value for s in transitions.states)}; "
        f"{len(down)} documents embedded locally {fell_back:.1f}s after the server stopped; "
        f"after the restart the probe closed the circuit and {len(after)} documents went to "
        "openai"
    )
