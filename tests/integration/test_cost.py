"""Cost accounting against the real broker, PostgreSQL and the local OpenAI server: usage
events, the ledger, budgets, throttle events, and stages that obey them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from typer.testing import CliRunner, Result

from consumers.runtime import StageRunner
from producers.upload import Uploader
from ragstream.admin import ensure_topics
from ragstream.cli import app
from ragstream.codec import Codec
from ragstream.control import ControlFollower, ControlState, publish_control, throttle_key
from ragstream.cost.pricing import PriceTable
from ragstream.events import CostUsage, DocumentEmbedded, ThrottleEvent, ThrottleState
from ragstream.settings import Mode, Settings
from ragstream.store import Store
from ragstream.topology import COST, Stage, Topology
from tests.integration.pipeline_helpers import (
    caught_up,
    count_loops,
    uncommitted,
    variant,
    wait_until,
)
from tests.integration.pipeline_helpers import workers as stage_workers
from tests.integration.test_dlq_tools import cli_env
from tests.integration.test_failures import read_all, wait_status
from tests.servers.llamaparse_server import LlamaParseServer
from tests.servers.openai_server import OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Dear tokens, so a few cents buy a handful of documents: $100 per million, $0.0001 a token.
PRICES = """
[openai."text-embedding-3-small"]
unit = "tokens"
usd_per_million = "100"
as_of = "2026-11-01"

[llamaparse]
unit = "credits"
usd_per_thousand = "1.25"
as_of = "2026-06-12"

[llamaparse.credits_per_page]
cost_effective = 3
"""
PER_TOKEN = Decimal("0.0001")


def paid_settings(
    settings: Settings, server: OpenAIServer, tmp_path: Path, **budgets: object
) -> Settings:
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    return variant(
        settings,
        services={"openai": {"mode": "real", "base_url": server.base_url, "api_key": "test-key"}},
        budgets={"prices": prices, "evaluate_interval_s": 0.5, **budgets},
    )


@asynccontextmanager
async def workers(
    settings: Settings, stages: list[Stage], *, accountant: bool
) -> AsyncIterator[list[StageRunner]]:
    """The stages in this process, one record at a time, with or without the accountant."""
    await ensure_topics(settings)
    async with stage_workers(settings, stages, concurrency=1, accountant=accountant) as runners:
        yield runners


@asynccontextmanager
async def following(settings: Settings) -> AsyncIterator[ControlState]:
    state = ControlState.from_settings(settings)
    follower = ControlFollower(settings, state)
    await follower.start()
    try:
        yield state
    finally:
        await follower.stop()


async def embed_lag(settings: Settings) -> int:
    """Committed offsets of the embed group against the log end of its input topic."""
    topology = Topology(settings.kafka.topic_prefix)
    return await uncommitted(settings, topology.group(Stage.EMBED), topology.chunked)


async def held_with_its_input_in_reach(settings: Settings, runner: StageRunner) -> None:
    """Parse and chunk have committed everything (every document not embedded waits on the
    embed stage's input topic), and the paused runner has polled twice since: had it not held
    its partitions, it would have fetched those records and called the API by now."""
    await wait_until(
        lambda: caught_up(settings, [Stage.PARSE, Stage.CHUNK]), 30, "parse and chunk to commit"
    )
    loops = count_loops(runner)
    await wait_until(lambda: loops() >= 2, 10, "the embed runner to poll again")


async def cli(settings: Settings, *args: str) -> Result:
    """`ragstream cost ...` in a thread (the command runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, ["cost", *args], env=cli_env(settings))


def text(i: int) -> bytes:
    return (
        f"# Budget {i}\n\nDocument {i} says a few words about stream processing, "
        f"budgets and the price of tokens ({'x' * (i % 5)})."
    ).encode()


async def test_budget_throttles_the_paid_stage_and_raising_it_lets_every_document_through(
    own_database: Settings, tmp_path: Path
) -> None:
    settings = own_database
    with OpenAIServer() as server:
        settings = paid_settings(settings, server, tmp_path, daily_usd=Decimal("0.02"))
        async with (
            workers(settings, list(Stage), accountant=True) as runners,
            following(settings) as control,
            Uploader(settings) as up,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            receipts = [
                await up.upload_bytes(text(i), f"b{i}.md", tenant_id="spend") for i in range(16)
            ]

            def throttled() -> bool:
                event = control.throttles.get(("openai", None))
                return event is not None and event.state is ThrottleState.THROTTLED

            await wait_until(throttled, 45, "a THROTTLED event for openai")
            event = control.throttles[("openai", None)]
            assert event.budget_usd == Decimal("0.02")
            assert "openai" in event.reason and event.window == "day"
            assert event.window_ends_at is not None and event.window_ends_at > datetime.now(UTC)

            # The paid stage stops calling the API; its lag grows; nothing fails.
            (embed_runner,) = [r for r in runners if r.stage is Stage.EMBED]
            await wait_until(lambda: embed_runner.blocked is not None, 10, "embed paused")
            calls = len(server.calls)
            await held_with_its_input_in_reach(settings, embed_runner)
            assert len(server.calls) == calls
            statuses = [(await store.get_document(r.document_id)) for r in receipts]
            waiting = [d for d in statuses if d is not None and d.status != "embedded"]
            assert waiting, "the budget should leave documents waiting"
            assert all(d.status == "chunked" for d in waiting), [d.status for d in waiting]
            assert await embed_lag(settings) >= len(waiting)

            # The ledger equals what the server billed, to the nanodollar; the overspend past
            # the budget is at most one request.
            billed = [c.tokens for c in server.ok_calls()]
            requests, units, cost = (await store.ledger_totals())["openai"]
            assert (requests, units) == (len(billed), sum(billed))
            assert cost == sum(billed) * PER_TOKEN
            largest = max(billed) * PER_TOKEN
            overspend = max(Decimal(0), cost - Decimal("0.02"))
            print(f"\nspent ${cost} of $0.02 with {requests} requests; overspend ${overspend}")
            assert overspend <= largest

            # Raising the budget publishes OPEN; every remaining document completes.
            result = await cli(settings, "budget", "openai", "--daily-usd", "10")
            assert result.exit_code == 0, result.output
            await wait_until(
                lambda: control.throttles[("openai", None)].state is ThrottleState.OPEN,
                15,
                "OPEN after raising the budget",
            )
            for r in receipts:
                assert await wait_status(store, r.document_id, {"embedded"}) == "embedded"
            assert embed_runner.blocked is None
            dupes = await store.duplicate_rows()
            assert not any(dupes.values()), dupes
            billed = [c.tokens for c in server.ok_calls()]
            expected = (len(billed), sum(billed), sum(billed) * PER_TOKEN)

            async def ledger() -> tuple[int, int, Decimal]:
                totals: tuple[int, int, Decimal] = (await store.ledger_totals())["openai"]
                return totals

            # The accountant records the last usage events a moment after their documents.
            await wait_until(
                lambda: _equals(ledger(), expected), 15, "the ledger to hold every call"
            )
            requests, _, cost = expected

            # The report shows it all; a second budget call with a bad value is refused.
            report = await cli(settings, "--json")
            assert report.exit_code == 0, report.output
            data = json.loads(report.output)
            (day,) = [r for r in data["spend"] if r["service"] == "openai"]
            assert (day["tenant_id"], day["requests"]) == ("spend", requests)
            assert Decimal(day["cost_usd"]) == cost
            (line,) = [b for b in data["budgets"] if b["service"] == "openai"]
            assert (Decimal(line["spent_usd"]), Decimal(line["budget_usd"])) == (cost, 10)
            assert line["state"] == line["published_state"] == "OPEN"
            assert Decimal(line["usd_per_hour"]) > 0
            tables = await cli(settings)
            assert tables.exit_code == 0, tables.output
            assert "budgets now" in tables.output and "OPEN" in tables.output
            assert "not before the window resets" in tables.output  # $10 lasts the day
            bad = await cli(settings, "budget", "openai", "--daily-usd", "lots")
            assert bad.exit_code == 2 and "is not a number" in bad.output
            assert "Traceback" not in bad.output


async def test_a_usage_event_delivered_twice_counts_once_and_garbage_is_dead_lettered(
    own_database: Settings, tmp_path: Path
) -> None:
    settings = own_database
    await ensure_topics(settings)
    topology = Topology(settings.kafka.topic_prefix)
    codec = Codec()
    usage = CostUsage(
        service="openai",
        operation="embeddings",
        model="text-embedding-3-small",
        unit="tokens",
        units=1234,
        unit_price_usd=Decimal("0.00000002"),
        cost_usd=Decimal("0.00002468"),
        tenant_id="twice",
        document_ids=["doc-a", "doc-b"],
        stage="embed",
        correlation_id="corr-twice",
    )
    producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
    await producer.start()
    try:
        for value in (codec.encode(usage), b"\x00 not avro", codec.encode(usage)):
            await producer.send_and_wait(topology.cost_usage, value, key=b"doc-a")
    finally:
        await producer.stop()
    async with (
        workers(settings, [], accountant=True),
        await Store.connect(settings.postgres.dsn()) as store,
    ):

        async def one_row() -> bool:
            return (await store.ledger_totals()).get("openai") is not None

        await wait_until(one_row, 30, "the usage event in the ledger")
        dlq = await read_all(settings, topology.dlq, want=1)
        # The duplicate is behind the garbage: once the group has committed all three, it has
        # been handled too.
        await wait_until(lambda: caught_up(settings, [COST]), 30, "the accountant's commit")
        assert (await store.ledger_totals())["openai"] == (1, 1234, Decimal("0.00002468"))
        spend = await store.spend_by_day(datetime.now(UTC) - timedelta(days=1), 86400)
        assert [(r.tenant_id, r.requests) for r in spend] == [("twice", 1)]
    assert dlq[0].value == b"\x00 not avro"
    headers = dict(dlq[0].headers)
    assert headers["ragstream.errors.stage"] == b"cost"
    assert headers["ragstream.errors.topic"] == topology.cost_usage.encode()


async def test_a_worker_started_while_throttled_starts_paused_and_hybrid_falls_back(
    own_database: Settings, tmp_path: Path
) -> None:
    settings = own_database
    with OpenAIServer() as server:
        settings = paid_settings(settings, server, tmp_path)
        await ensure_topics(settings)
        throttle = ThrottleEvent(
            service="openai",
            state=ThrottleState.THROTTLED,
            reason="openai: test budget used up",
            window="day",
            window_ends_at=datetime.now(UTC) + timedelta(hours=1),
            spent_usd=Decimal("5"),
            budget_usd=Decimal("5"),
            requests=1,
            request_budget=100,
        )
        await publish_control(settings, throttle_key("openai"), throttle)
        async with (
            workers(settings, list(Stage), accountant=False) as runners,
            Uploader(settings) as up,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            (embed_runner,) = [r for r in runners if r.stage is Stage.EMBED]
            receipt = await up.upload_bytes(text(1), "paused.md", tenant_id="paused")
            assert await wait_status(store, receipt.document_id, {"chunked"}) == "chunked"
            await held_with_its_input_in_reach(settings, embed_runner)
            assert embed_runner.blocked is not None and "test budget" in embed_runner.blocked
            assert len(server.calls) == 0
            doc = await store.get_document(receipt.document_id)
            assert doc is not None and doc.status == "chunked"

            opened = ThrottleEvent(
                **{
                    **{f: getattr(throttle, f) for f in ("service", "window", "requests")},
                    "state": ThrottleState.OPEN,
                    "reason": "openai: budget raised",
                    "window_ends_at": throttle.window_ends_at,
                    "spent_usd": Decimal("5"),
                    "budget_usd": Decimal("50"),
                    "request_budget": 100,
                }
            )
            await publish_control(settings, throttle_key("openai"), opened)
            assert await wait_status(store, receipt.document_id, {"embedded"}) == "embedded"
            assert len(server.ok_calls()) >= 1
            # Each paid request published its usage, with who it was for.
            topology = Topology(settings.kafka.topic_prefix)
            published = [
                Codec().decode(r.value or b"")
                for r in await read_all(settings, topology.cost_usage, want=len(server.ok_calls()))
            ]
            assert [u.units for u in published if isinstance(u, CostUsage)] == [
                c.tokens for c in server.ok_calls()
            ]
            usage = published[0]
            assert isinstance(usage, CostUsage)
            assert usage.document_ids == [receipt.document_id]
            assert (usage.tenant_id, usage.stage, usage.service) == ("paused", "embed", "openai")
            assert usage.correlation_id == receipt.correlation_id
            assert usage.cost_usd == usage.units * PER_TOKEN

        # Hybrid while throttled: no paid call, the local provider serves, and says so.
        await publish_control(settings, throttle_key("openai"), throttle)
        calls = len(server.calls)
        hybrid = variant(settings, services={"openai": {"mode": "hybrid"}})
        async with (
            workers(hybrid, list(Stage), accountant=False) as runners,
            Uploader(hybrid) as up,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            receipt = await up.upload_bytes(text(2), "hybrid.md", tenant_id="paused")
            assert await wait_status(store, receipt.document_id, {"embedded"}) == "embedded"
            doc = await store.get_document(receipt.document_id)
            assert doc is not None and doc.current_embedding_model != "text-embedding-3-small"
            assert len(server.calls) == calls
            assert all(r.blocked is None for r in runners)


async def test_known_documents_and_a_warm_cache_cost_nothing(
    own_database: Settings, tmp_path: Path
) -> None:
    settings = own_database
    with OpenAIServer() as server:
        settings = paid_settings(settings, server, tmp_path)
        topology = Topology(settings.kafka.topic_prefix)
        async with (
            workers(settings, list(Stage), accountant=True),
            Uploader(settings) as up,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            first = await up.upload_bytes(text(7), "known.md", tenant_id="free")
            assert await wait_status(store, first.document_id, {"embedded"}) == "embedded"
            await wait_until(lambda: len(server.ok_calls()) >= 1, 10, "a paid call")

            async def ledgered() -> tuple[int, int, Decimal]:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    totals = (await store.ledger_totals()).get("openai")
                    if totals and totals[0] == len(server.ok_calls()):
                        return totals
                    await asyncio.sleep(0.2)
                raise AssertionError("the ledger did not catch up with the server")

            before = await ledgered()
            again = await up.upload_bytes(text(7), "known-again.md", tenant_id="free")
            assert await wait_status(store, again.document_id, {"duplicate"}) == "duplicate"

            # Replaying the chunked event through embed: the cache is warm, nothing is paid.
            (record,) = [
                r
                for r in await read_all(settings, topology.chunked, want=1)
                if r.key == first.document_id.encode()
            ]
            producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
            await producer.start()
            try:
                await producer.send_and_wait(
                    topology.chunked, record.value, key=record.key, headers=list(record.headers)
                )
            finally:
                await producer.stop()

            outputs = [
                Codec().decode(r.value or b"")
                for r in await read_all(settings, topology.embedded, want=2)
                if r.key == first.document_id.encode()
            ]
            assert len(outputs) == 2
            again_embedded = outputs[1]
            assert isinstance(again_embedded, DocumentEmbedded)
            assert again_embedded.new_embeddings == 0
            assert again_embedded.cached_embeddings == again_embedded.chunk_count > 0
            # A usage event of the replay would be on the usage topic before its output: the
            # accountant has handled everything there.
            await wait_until(lambda: caught_up(settings, [COST]), 30, "the accountant's commit")
            assert await ledgered() == before
            assert len(server.ok_calls()) == before[0]


def test_the_bundled_price_table_prices_the_defaults() -> None:
    prices = PriceTable.load()
    assert prices.embedding("text-embedding-3-small").cost(1_000_000) == Decimal("0.02")
    assert prices.parse_credit.cost(1000) == Decimal("1.25")


async def test_llamaparse_jobs_are_billed_by_the_credits_they_report(
    own_database: Settings,
) -> None:
    settings = own_database
    with LlamaParseServer(job_duration_s=0.3, credits_per_page=3.0) as server:
        llamaparse = settings.services.llamaparse.model_copy(
            update={
                "mode": Mode.REAL,
                "base_url": server.url,
                "api_key": SecretStr("test-key"),
                "poll_interval_s": 0.1,
            }
        )
        settings = settings.model_copy(
            update={"services": settings.services.model_copy(update={"llamaparse": llamaparse})}
        )
        async with (
            workers(settings, list(Stage), accountant=True),
            Uploader(settings) as up,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            receipts = [
                await up.upload_bytes(
                    ("\f".join(f"# Page {p}\n\nText {i}.{p}." for p in range(i + 1))).encode(),
                    f"pages{i}.md",
                    tenant_id="pages",
                )
                for i in range(3)
            ]
            for r in receipts:
                assert await wait_status(store, r.document_id, {"embedded"}) == "embedded"

            async def ledgered() -> bool:
                return (await store.ledger_totals()).get("llamaparse", (0,))[0] == 3

            await wait_until(ledgered, 20, "three jobs in the ledger")
            requests, credits, cost = (await store.ledger_totals())["llamaparse"]
    reported = sum(len(job.pages) * server.credits_per_page for job in server.jobs.values())
    assert (requests, credits) == (3, reported) == (3, 18)  # 1 + 2 + 3 pages, 3 credits each
    assert cost == Decimal(credits) * Decimal("0.00125")


async def test_the_request_budget_throttles_until_its_window_rolls_over(
    own_database: Settings, tmp_path: Path
) -> None:
    settings = own_database
    with OpenAIServer() as server:
        # Two paid requests per 8-second "hour": the third document waits for the next window.
        settings = paid_settings(settings, server, tmp_path, hourly_requests=2, hour_s=8)
        async with (
            workers(settings, list(Stage), accountant=True),
            following(settings) as control,
            Uploader(settings) as up,
            await Store.connect(settings.postgres.dsn()) as store,
        ):
            states: list[ThrottleState] = []
            control.listeners.append(
                lambda e: (
                    states.append(e.state)
                    if isinstance(e, ThrottleEvent) and e.tenant_id is None
                    else None
                )
            )
            receipts = [
                await up.upload_bytes(text(i), f"w{i}.md", tenant_id="window") for i in range(5)
            ]
            for r in receipts:
                assert await wait_status(store, r.document_id, {"embedded"}, 60) == "embedded"

            async def ledger_windows() -> list[Any]:
                return list(await store.spend_by_day(datetime.now(UTC) - timedelta(minutes=5), 8))

            async def all_recorded() -> bool:  # the last usage lands just after its document
                return sum(w.requests for w in await ledger_windows()) == 5

            await wait_until(all_recorded, 15, "the ledger to hold all five requests")
            windows = await ledger_windows()

            def lifted() -> bool:
                # A throttle ends with its window: the stage goes on at once, and the next
                # round (every 0.5 s) publishes OPEN, unless the new window's requests have
                # filled it by then (THROTTLED again, for that window). With no more usage,
                # OPEN comes at the latest when the last window rolls over (8 s).
                return (
                    ThrottleState.THROTTLED in states
                    and ThrottleState.OPEN in states[states.index(ThrottleState.THROTTLED) :]
                )

            await wait_until(lifted, 15, "OPEN after THROTTLED", explain=lambda: f"seen: {states}")
    assert len(server.ok_calls()) == 5
    # No 8-second window of the ledger holds more than two paid requests.
    per_window = [w.requests for w in windows]
    assert sum(per_window) == 5 and max(per_window) <= 2, per_window


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def test_budget_commands_change_only_what_they_name_and_print_the_limits_in_force(
    own_database: Settings,
) -> None:
    settings = own_database

    async def budget(*args: str) -> str:
        result = await cli(settings, "budget", "openai", *args)
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    async def row() -> tuple[Decimal | None, int | None] | None:
        async with await Store.connect(settings.postgres.dsn()) as store:
            found = [o for o in await store.budget_overrides() if o.service == "openai"]
        return (found[0].daily_usd, found[0].hourly_requests) if found else None

    out = await budget("--daily-usd", "1")
    assert (
        "in force: openai: daily $1.00 (set at runtime), 100 paid requests an hour (config)" in out
    )
    # Setting the hourly limit leaves the lowered daily cap where the operator put it.
    out = await budget("--hourly-requests", "7")
    assert "daily $1.00 (set at runtime), 7 paid requests an hour (set at runtime)" in out
    assert await row() == (Decimal("1"), 7)
    out = await budget("--daily-usd", "0.0001")
    assert "daily $0.0001 (set at runtime), 7 paid requests" in out
    assert await row() == (Decimal("0.0001"), 7)
    out = await budget("--clear-daily")
    assert "daily $5.00 (config), 7 paid requests an hour (set at runtime)" in out
    assert await row() == (None, 7)
    out = await budget("--clear-hourly")
    assert "daily $5.00 (config), 100 paid requests an hour (config)" in out
    assert await row() is None
    await budget("--daily-usd", "2", "--hourly-requests", "3")
    out = await budget("--clear")
    assert "daily $5.00 (config), 100 paid requests an hour (config)" in out
    assert await row() is None
    tenant = await cli(settings, "budget", "openai", "--tenant", "acme", "--hourly-requests", "4")
    assert "openai (tenant acme): daily $5.00 (config), 4 paid requests" in tenant.output


async def test_the_report_names_the_window_that_throttles_and_prints_sub_cent_money(
    own_database: Settings,
) -> None:
    settings = own_database
    await ensure_topics(settings)
    paid = [
        CostUsage(
            service="openai",
            operation="embeddings",
            model="text-embedding-3-small",
            unit="tokens",
            units=500,
            unit_price_usd=Decimal("0.00000002"),
            cost_usd=Decimal("0.00001"),
            tenant_id="r",
            document_ids=[f"d{i}"],
        )
        for i in range(2)
    ]
    assert (await cli(settings, "budget", "openai", "--hourly-requests", "2")).exit_code == 0
    async with await Store.connect(settings.postgres.dsn()) as store:
        await store.record_usage(paid)

    async def openai_line() -> dict[str, Any]:
        report = await cli(settings, "--json")
        assert report.exit_code == 0, report.output
        (line,) = [b for b in json.loads(report.output)["budgets"] if b["service"] == "openai"]
        return dict(line)

    # Two of two requests this hour, spend far from the day's budget: the hour decides.
    line = await openai_line()
    assert (line["state"], line["window"]) == ("THROTTLED", "hour")
    ends = datetime.fromisoformat(line["window_ends_at"])
    assert ends <= datetime.fromisoformat(line["day_ends_at"])  # equal in the day's last hour
    assert ends.minute == ends.second == 0 and ends - datetime.now(UTC) <= timedelta(hours=1)
    tables = await cli(settings)
    assert f"hour, ends {ends:%Y-%m-%d %H:%M} UTC" in " ".join(tables.output.split())
    # A sub-cent daily budget prints as what it is, and with both used up the later window
    # (the day) decides.
    assert (await cli(settings, "budget", "openai", "--daily-usd", "0.00002")).exit_code == 0
    line = await openai_line()
    assert (line["state"], line["window"]) == ("THROTTLED", "day")
    assert line["window_ends_at"] == line["day_ends_at"]
    tables = await cli(settings)
    (row,) = [r for r in tables.output.splitlines() if "openai" in r and "(all)" in r]
    assert "$0.00002 / $0.00002" in row and "$0.00 " not in row


def in_hand(runner: StageRunner) -> float:
    """Records the runner is handling now (its in-flight gauge)."""
    value = runner.metrics.registry.get_sample_value(
        "ragstream_inflight_records", {"stage": runner.name}
    )
    return value or 0.0


async def stopped_calling(runners: list[StageRunner]) -> None:
    """Every runner holds its partitions back with no record in hand, and has polled twice
    since: no paid call is under way, and none is coming while the budget stays spent."""
    await wait_until(
        lambda: all(r.blocked is not None for r in runners), 60, "every member held back"
    )
    await wait_until(lambda: not any(in_hand(r) for r in runners), 30, "the calls in hand")
    loops = [count_loops(r) for r in runners]
    await wait_until(lambda: all(n() >= 2 for n in loops), 10, "every member to poll again")


@pytest.mark.parametrize(
    "budget",
    [{"daily_usd": Decimal("0.012")}, {"hourly_requests": 5}],
    ids=["daily-usd", "hourly-requests"],
)
async def test_one_process_at_concurrency_8_never_crosses_a_budget_a_few_calls_wide(
    own_database: Settings, tmp_path: Path, budget: dict[str, object]
) -> None:
    with OpenAIServer(latency_s=0.4) as server:
        settings = paid_settings(own_database, server, tmp_path, **budget)
        await ensure_topics(settings)
        async with (
            stage_workers(settings, list(Stage), concurrency=8, accountant=True) as runners,
            Uploader(settings) as up,
        ):
            for i in range(24):
                await up.upload_bytes(text(i), f"c{i}.md", tenant_id="conc")
            await stopped_calling([r for r in runners if r.stage is Stage.EMBED])
            billed = [c.tokens for c in server.ok_calls()]
    cost = sum(billed) * PER_TOKEN
    limit = Decimal(str(budget.get("daily_usd", "5.00")))
    hourly = int(str(budget.get("hourly_requests", 100)))
    print(f"\nconcurrency 8: {len(billed)} requests of {hourly}, ${cost} of ${limit}")
    assert cost <= limit and len(billed) <= hourly
    assert len(billed) >= (2 if "daily_usd" in budget else hourly)  # the budget is used


async def test_three_processes_overspend_at_most_the_documented_bound(
    own_database: Settings, tmp_path: Path
) -> None:
    """Three embed members, each with its own control follower and budget guard as separate
    processes have, at concurrency 8 on an untouched budget: each spends at most the room it
    saw, so together at most (3 - 1) x that room past the budget (README, Cost and budgets)."""
    budget = Decimal("0.012")
    with OpenAIServer(latency_s=0.4) as server:
        settings = paid_settings(own_database, server, tmp_path, daily_usd=budget)
        await ensure_topics(settings)
        async with (
            stage_workers(settings, list(Stage), concurrency=8, accountant=True) as runners,
            stage_workers(settings, [Stage.EMBED], concurrency=8) as second,
            stage_workers(settings, [Stage.EMBED], concurrency=8) as third,
            Uploader(settings) as up,
        ):
            for i in range(36):
                await up.upload_bytes(text(i), f"p{i}.md", tenant_id="procs")
            embeds = [r for r in [*runners, *second, *third] if r.stage is Stage.EMBED]
            assert len(embeds) == 3
            await stopped_calling(embeds)
            billed = [c.tokens for c in server.ok_calls()]
    cost = sum(billed) * PER_TOKEN
    overshoot = max(Decimal(0), cost - budget)
    print(
        f"\nthree processes at concurrency 8: {len(billed)} requests, ${cost} of ${budget}, "
        f"overshoot ${overshoot} (bound ${2 * budget})"
    )
    assert overshoot <= 2 * budget
