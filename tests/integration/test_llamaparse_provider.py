"""The LlamaParse provider, real HTTP against a local server that speaks LlamaParse's v2 API."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import SecretStr

from ragstream.errors import PermanentError, RetryableError
from ragstream.providers.circuit import CircuitBreaker, CircuitState
from ragstream.providers.parse.jobs import FIRST_POLL_S, JobState, JobStatus
from ragstream.providers.parse.llamaparse import LlamaParseParser, LlamaParseResult
from ragstream.providers.parse.local import LocalParser
from ragstream.providers.select import GuardedParser, parser_for
from ragstream.settings import LlamaParseSettings, Mode, ServicesSettings, Settings
from tests.integration.pipeline_helpers import wait_until
from tests.servers.llamaparse_server import LlamaParseServer

DOC = b"# Field guide\n\nFirst page.\f## Second\n\nSecond page.\fThird page."


def llamaparse_settings(server: LlamaParseServer, **overrides: object) -> LlamaParseSettings:
    values: dict[str, object] = {
        "mode": Mode.REAL,
        "base_url": server.url,
        "api_key": SecretStr("test-key"),
        "poll_interval_s": 0.05,
        "job_timeout_s": 10.0,
        "max_jobs_in_flight": 32,
        **overrides,
    }
    return LlamaParseSettings.model_validate(values)


@pytest.fixture
def server() -> Iterator[LlamaParseServer]:
    with LlamaParseServer(job_duration_s=0.2) as running:
        yield running


@pytest.fixture
async def parser(server: LlamaParseServer) -> AsyncIterator[LlamaParseParser]:
    parser = LlamaParseParser(llamaparse_settings(server))
    yield parser
    await parser.aclose()


async def test_pages_credits_and_markdown_are_read(
    server: LlamaParseServer, parser: LlamaParseParser
) -> None:
    result = await parser.parse(DOC, filename="guide.md", content_type="text/markdown")
    assert isinstance(result, LlamaParseResult)
    assert result.page_count == 3
    assert result.credits == 9.0  # 3 pages at the server's 3 credits a page
    assert result.pages == [
        "# Field guide\n\nFirst page.",
        "## Second\n\nSecond page.",
        "Third page.",
    ]
    assert result.markdown.startswith("<!-- page 1 -->\n\n# Field guide")
    assert "<!-- page 3 -->\n\nThird page.\n" in result.markdown
    assert result.title == "Field guide"
    assert (result.parser, result.parser_version) == ("llamaparse", "llamaparse-v2-cost_effective")
    assert result.job_id == server.uploads[0].job_id
    upload = server.uploads[0]
    assert (upload.filename, upload.content_type, upload.size) == (
        "guide.md",
        "text/markdown",
        len(DOC),
    )
    assert upload.configuration == {"tier": "cost_effective", "version": "latest"}


async def test_submit_poll_result_separately(
    server: LlamaParseServer, parser: LlamaParseParser
) -> None:
    job_id = await parser.submit(DOC, filename="guide.md", content_type="text/markdown")
    first = await parser.poll(job_id)
    assert first.job_id == job_id and first.state in (JobState.PENDING, JobState.RUNNING)
    assert not first.done

    async def finished() -> JobStatus | None:
        status = await parser.poll(job_id)
        return status if status.done else None

    done = await wait_until(finished, 10, "the job to finish")
    assert done.state is JobState.COMPLETED
    result = await parser.result(job_id)
    assert result.page_count == 3 and result.credits == 9.0


@pytest.mark.slow
async def test_twenty_jobs_of_two_seconds_complete_in_about_one_duration() -> None:
    with LlamaParseServer(job_duration_s=2.0) as server:
        parser = LlamaParseParser(llamaparse_settings(server, poll_interval_s=0.1))
        started = time.monotonic()
        try:
            futures = [
                await parser.tracker.submit(
                    f"document {i}".encode(), filename=f"doc-{i}.txt", content_type="text/plain"
                )
                for i in range(20)
            ]
            submitted = time.monotonic() - started
            assert parser.tracker.in_flight == 20
            results = await asyncio.gather(*futures)
        finally:
            await parser.aclose()
        elapsed = time.monotonic() - started
    assert submitted < 1.0  # submitting returns at once; nobody waits on a job here
    assert elapsed < 3.5  # about one duration (2 s), far from 20 x 2 s
    assert server.max_running() == 20
    assert sorted(r.pages[0] for r in results) == sorted(f"document {i}" for i in range(20))
    assert parser.tracker.in_flight == 0


# -- polling: soon after submit, then backing off -----------------------------------------------

DEFAULT_POLL_INTERVAL_S = LlamaParseSettings().poll_interval_s


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("job_s", [0.3, 2.0])
async def test_a_job_is_seen_complete_soon_after_it_completes(job_s: float) -> None:
    with LlamaParseServer(job_duration_s=job_s) as server:
        parser = LlamaParseParser(
            llamaparse_settings(server, poll_interval_s=DEFAULT_POLL_INTERVAL_S)
        )
        started = time.monotonic()
        try:
            await parser.parse(b"text", filename="a.txt", content_type="text/plain")
        finally:
            await parser.aclose()
        elapsed = time.monotonic() - started
    (job,) = server.jobs.values()
    seen_done = job.poll_times[-1]  # the poll that found it complete, after its upload
    assert job_s <= seen_done < job_s + 0.4, job.poll_times
    assert elapsed < job_s + 0.6
    assert job.poll_times[0] < 0.4  # the first poll comes soon after submit


@pytest.mark.slow
async def test_polls_back_off_while_a_long_job_runs() -> None:
    job_s = 10.0
    with LlamaParseServer(job_duration_s=job_s) as server:
        parser = LlamaParseParser(
            llamaparse_settings(server, poll_interval_s=DEFAULT_POLL_INTERVAL_S, job_timeout_s=60)
        )
        try:
            await parser.parse(b"text", filename="a.txt", content_type="text/plain")
        finally:
            await parser.aclose()
    (job,) = server.jobs.values()
    waits = gaps(job.poll_times)
    assert all(b > a - 0.1 for a, b in itertools.pairwise(waits)), waits  # never shorter
    assert waits[-1] > 2.5 * waits[0], waits
    # at the pace of the first polls, 10 s would take 40
    assert job.polls < 0.7 * job_s / FIRST_POLL_S, job.poll_times
    assert job.poll_times[-1] < job_s * 1.15


async def test_polls_are_never_further_apart_than_poll_interval_s() -> None:
    with LlamaParseServer(job_duration_s=3.0) as server:
        parser = LlamaParseParser(llamaparse_settings(server, poll_interval_s=0.4))
        try:
            await parser.parse(b"text", filename="a.txt", content_type="text/plain")
        finally:
            await parser.aclose()
    (job,) = server.jobs.values()
    assert max(gaps(job.poll_times)) < 0.4 + 0.15, job.poll_times


async def test_a_retry_after_on_the_status_answer_paces_the_polls() -> None:
    with LlamaParseServer(job_duration_s=2.5, status_retry_after_s=1.0) as server:
        parser = LlamaParseParser(
            llamaparse_settings(server, poll_interval_s=DEFAULT_POLL_INTERVAL_S)
        )
        try:
            await parser.parse(b"text", filename="a.txt", content_type="text/plain")
        finally:
            await parser.aclose()
    (job,) = server.jobs.values()
    # polled at about 0.25 s, then once a second as asked: 1.25, 2.25, 3.25
    assert job.polls == 4, job.poll_times
    assert all(0.95 < gap < 1.4 for gap in gaps(job.poll_times)), job.poll_times


async def test_a_429_on_a_poll_holds_polling_back_for_its_retry_after() -> None:
    with LlamaParseServer(job_duration_s=0.1) as server:
        server.inject_http(429, on="get", retry_after_s=0.6)
        parser = LlamaParseParser(
            llamaparse_settings(server, poll_interval_s=DEFAULT_POLL_INTERVAL_S)
        )
        try:
            result = await parser.parse(b"text", filename="a.txt", content_type="text/plain")
        finally:
            await parser.aclose()
    assert result.page_count == 1
    (job,) = server.jobs.values()
    # the first poll (about 0.25 s) was refused; the next waited its 0.6 s
    assert job.poll_times[0] > 0.8, job.poll_times


async def test_jobs_beyond_the_limit_wait_for_a_slot() -> None:
    with LlamaParseServer(job_duration_s=0.3) as server:
        parser = LlamaParseParser(llamaparse_settings(server, max_jobs_in_flight=2))
        try:
            results = await asyncio.gather(
                *(
                    parser.parse(b"text", filename=f"{i}.txt", content_type="text/plain")
                    for i in range(6)
                )
            )
        finally:
            await parser.aclose()
    assert len(results) == 6
    assert server.max_running() == 2


async def test_failed_job_is_permanent_with_its_error_message(
    server: LlamaParseServer, parser: LlamaParseParser
) -> None:
    server.fail_next_jobs("FAILED", "the PDF is password-protected")
    with pytest.raises(PermanentError) as info:
        await parser.parse(b"%PDF-1.7", filename="locked.pdf", content_type="application/pdf")
    message = str(info.value)
    assert "FAILED" in message and "the PDF is password-protected" in message
    assert "locked.pdf" in message
    assert parser.tracker.in_flight == 0


async def test_cancelled_job_is_permanent(
    server: LlamaParseServer, parser: LlamaParseParser
) -> None:
    server.fail_next_jobs("CANCELLED", "cancelled by the user")
    with pytest.raises(PermanentError, match="CANCELLED: cancelled by the user"):
        await parser.parse(b"text", filename="a.txt", content_type="text/plain")


async def test_job_timeout_is_retryable() -> None:
    with LlamaParseServer(job_duration_s=30) as server:
        parser = LlamaParseParser(llamaparse_settings(server, job_timeout_s=0.4))
        started = time.monotonic()
        try:
            with pytest.raises(RetryableError, match="did not finish within") as info:
                await parser.parse(b"text", filename="slow.txt", content_type="text/plain")
        finally:
            await parser.aclose()
    assert info.value.retryable
    assert time.monotonic() - started < 2
    assert parser.tracker.in_flight == 0


async def test_upload_429_is_retryable_with_retry_after(
    server: LlamaParseServer, parser: LlamaParseParser
) -> None:
    server.inject_http(429, on="upload", retry_after_s=7)
    with pytest.raises(RetryableError, match="HTTP 429") as info:
        await parser.parse(b"text", filename="a.txt", content_type="text/plain")
    assert info.value.retry_after == 7
    assert parser.tracker.in_flight == 0
    assert (await parser.parse(b"text", filename="a.txt", content_type="text/plain")).page_count


async def test_upload_500_is_retryable(server: LlamaParseServer, parser: LlamaParseParser) -> None:
    server.inject_http(500, on="upload")
    with pytest.raises(RetryableError, match="HTTP 500"):
        await parser.parse(b"text", filename="a.txt", content_type="text/plain")


@pytest.mark.parametrize(("status", "hint"), [(401, "api_key"), (402, "credits"), (400, "")])
async def test_client_errors_are_permanent(
    server: LlamaParseServer, parser: LlamaParseParser, status: int, hint: str
) -> None:
    server.inject_http(status, on="upload")
    with pytest.raises(PermanentError, match=f"HTTP {status}") as info:
        await parser.parse(b"text", filename="a.txt", content_type="text/plain")
    assert hint in str(info.value)


async def test_poll_errors_are_ridden_out_until_the_job_completes(
    server: LlamaParseServer, parser: LlamaParseParser
) -> None:
    server.inject_http(503, times=3, on="get")
    server.inject_http(429, times=2, on="get")
    result = await parser.parse(DOC, filename="guide.md", content_type="text/markdown")
    assert result.page_count == 3


async def test_unreachable_service_is_retryable(server: LlamaParseServer) -> None:
    parser = LlamaParseParser(llamaparse_settings(server))
    server.stop()
    try:
        with pytest.raises(RetryableError, match="connection failed"):
            await parser.parse(b"text", filename="a.txt", content_type="text/plain")
    finally:
        await parser.aclose()


async def test_oversized_document_is_refused_before_upload(server: LlamaParseServer) -> None:
    parser = LlamaParseParser(llamaparse_settings(server), max_bytes=10)
    try:
        with pytest.raises(PermanentError, match=r"over the limit parse\.max_bytes=10"):
            await parser.parse(b"x" * 11, filename="big.txt", content_type="text/plain")
    finally:
        await parser.aclose()
    assert server.uploads == []


async def test_hybrid_parser_falls_back_to_local_and_comes_back(
    server: LlamaParseServer,
) -> None:
    llamaparse = llamaparse_settings(server).model_copy(update={"mode": Mode.HYBRID})
    settings = Settings(services=ServicesSettings(llamaparse=llamaparse))
    transitions: list[CircuitState] = []
    now = [0.0]  # the breaker's clock, moved by hand: the cooldown passes when the test says
    breaker = CircuitBreaker(
        "llamaparse",
        failure_threshold=1,
        cooldown_s=0.3,
        listener=lambda _name, _old, new: transitions.append(new),
        clock=lambda: now[0],
    )
    parser = parser_for(settings, breaker=breaker)
    assert isinstance(parser, GuardedParser) and parser.name == "hybrid"
    text = b"# Notes\n\nSome text."
    try:
        real = await parser.parse(text, filename="n.md", content_type="text/markdown")
        assert real.parser == "llamaparse"

        server.stop()
        fallback = await parser.parse(text, filename="n.md", content_type="text/markdown")
        # Opened by the failure (read from the transitions: the local fallback may outlast
        # the cooldown, and reading the state then moves it on to half-open).
        assert transitions == [CircuitState.OPEN]
        assert fallback == await LocalParser(settings.parse).parse(
            text, filename="n.md", content_type="text/markdown"
        )
        assert fallback.parser == "local"

        server.start()
        now[0] += 0.3
        back = await parser.parse(text, filename="n.md", content_type="text/markdown")
        assert back.parser == "llamaparse"
        assert transitions == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
    finally:
        await parser.aclose()


async def test_local_mode_is_the_local_parser(server: LlamaParseServer) -> None:
    settings = Settings(services=ServicesSettings(llamaparse=llamaparse_settings(server)))
    assert isinstance(parser_for(settings, Mode.LOCAL), LocalParser)
    real = parser_for(settings)
    assert isinstance(real, GuardedParser) and real.name == "llamaparse"
    await real.aclose()
