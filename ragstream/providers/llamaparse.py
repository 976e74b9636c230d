"""LlamaParse through its REST API (v2), with many jobs in flight and no caller kept waiting.

The v2 endpoints (what the maintained `llama-cloud` SDK calls; v1's `/api/v1/parsing/...` is
the previous generation):

    POST /api/v2/parse/upload       multipart: `file`, `configuration` (JSON: tier, version)
                                    -> {id, project_id, status, ...}
    GET  /api/v2/parse/{job_id}     -> {job: {id, status, error_message, ...}}
         ?expand=markdown&expand=job_metadata
                                    -> + markdown.pages[{page_number, markdown, success}]
                                       + job_metadata {job_pages, job_credits_usage, ...}

Job states: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED. `job_metadata` is a free-form
object in the v2 schema; pages are read from `job_pages` (else the pages returned) and credits
from `job_credits_usage` (else `credits_used`), the names v1 documents.

`LlamaParseParser` has the three calls separately (`submit`, `poll`, `result`) and fits the
`Parser` port through its `JobTracker`: it holds up to `max_jobs_in_flight` jobs, follows each
in a background task of its own and resolves the job's future, so a caller never sits in a
poll loop. A job is polled soon after it is submitted (every `FIRST_POLL_S` at first), then
less and less often: each wait is `POLL_GROWTH` of the job's age, never longer than
`poll_interval_s`. A 2 s job is seen complete at most 0.25 s after it completes (polling all
jobs every 2 s took 3.5 s on average), and a job of many minutes is polled every
`poll_interval_s`. A status answer that carries `retry-after` (or `retry-after-ms`) sets that
job's next wait instead; a 429 holds every job's polls back for its `retry-after`.

A job past `job_timeout_s` fails with `RetryableError`; a FAILED or CANCELLED job with
`PermanentError` carrying the job's error message. HTTP errors are translated as for OpenAI:
429 (retry_after from `retry-after`), 408, 409, 5xx and lost connections are retryable; 402
(no credits left) and other 4xx are permanent.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final, Protocol

import httpx
import structlog

from ragstream import tracing
from ragstream.cost.meter import Meter, metered
from ragstream.errors import ConfigError, PermanentError, RagstreamError, RetryableError
from ragstream.parsing import ParseResult, page_marker
from ragstream.providers.ratelimit import retry_after_from
from ragstream.settings import LlamaParseSettings

log = structlog.get_logger(__name__)

PROVIDER: Final = "llamaparse"
API: Final = "/api/v2/parse"
REQUEST_TIMEOUT_S: Final = 120.0
# Job polling: the first poll this long after submit, then each wait POLL_GROWTH of the job's
# age (at least FIRST_POLL_S, at most services.llamaparse.poll_interval_s). A job is seen done
# within FIRST_POLL_S, or POLL_GROWTH of its duration: 8 polls in its first 2 s, 32 in 20 s
# (then one every poll_interval_s).
FIRST_POLL_S: Final = 0.25
POLL_GROWTH: Final = 0.1
MIN_WAIT_S: Final = 0.05  # the shortest wait a `retry-after` hint can ask for
_HEADING: Final = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# v2 names, and v1's (SUCCESS, ERROR, CANCELED) for servers that still answer with them.
_STATES: Final = {
    **{state.value: state for state in JobState},
    "SUCCESS": JobState.COMPLETED,
    "ERROR": JobState.FAILED,
    "CANCELED": JobState.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_id: str
    state: JobState
    error: str | None = None
    retry_after: float | None = None  # the service's hint for the next poll, in seconds

    @property
    def done(self) -> bool:
        return self.state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class LlamaParseResult(ParseResult):
    """A `ParseResult` with what the bill needs: the job and the credits it used."""

    job_id: str = ""
    credits: float | None = None


class JobBackend(Protocol):
    """What a `JobTracker` drives: LlamaParse, or anything with the same three calls."""

    async def submit(self, data: bytes, *, filename: str, content_type: str) -> str: ...

    async def poll(self, job_id: str) -> JobStatus: ...

    async def result(self, job_id: str) -> ParseResult: ...


# -- the REST client ---------------------------------------------------------------------------


class LlamaParseParser:
    """The parse port over LlamaParse's REST API; `submit`/`poll`/`result` for the stage."""

    name: Final = PROVIDER

    def __init__(
        self,
        settings: LlamaParseSettings,
        *,
        max_bytes: int | None = None,
        client: httpx.AsyncClient | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        meter: Meter | None = None,
        credits_per_page: float = 3.0,
    ) -> None:
        if client is None:
            if settings.api_key is None:
                raise ConfigError(
                    "services.llamaparse.api_key is not set "
                    "(RAGSTREAM_SERVICES__LLAMAPARSE__API_KEY) but LlamaParse is in use"
                )
            client = httpx.AsyncClient(
                base_url=settings.base_url.rstrip("/"),
                headers={"Authorization": f"Bearer {settings.api_key.get_secret_value()}"},
                timeout=request_timeout_s,
            )
        self._client = client
        self._tier = settings.tier
        self._max_bytes = max_bytes
        self.version = f"llamaparse-v2-{settings.tier}"
        self.meter = meter  # prices each job, refuses one over budget, publishes usage
        self.credits_per_page = credits_per_page
        self.tracker = JobTracker(
            self,
            max_jobs_in_flight=settings.max_jobs_in_flight,
            poll_interval_s=settings.poll_interval_s,
            job_timeout_s=settings.job_timeout_s,
            first_poll_s=settings.first_poll_s,
        )

    async def aclose(self) -> None:
        await self.tracker.aclose()
        await self._client.aclose()

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult:
        """Submit, then wait for the tracker to see the job through (no polling here).

        The job is estimated first (pages times the tier's credits per page) and not submitted
        when it would cross the budget; it is billed by the credits the job reports (else its
        pages times credits per page)."""
        estimate = estimate_pages(data, content_type) * self.credits_per_page
        async with metered(self.meter, estimate) as bill:
            job: tracing.Attributes = {"llamaparse.tier": self._tier, "llamaparse.bytes": len(data)}
            with tracing.call("llamaparse job", job) as span:
                result = await self.tracker.parse(
                    data, filename=filename, content_type=content_type
                )
                if span is not None:
                    span.set_attribute("llamaparse.job_id", getattr(result, "job_id", ""))
                    span.set_attribute("llamaparse.pages", result.page_count)
            credits = getattr(result, "credits", None)
            if credits is None:
                credits = result.page_count * self.credits_per_page
            bill.report(credits, request_id=getattr(result, "job_id", None))
            return result

    async def submit(self, data: bytes, *, filename: str, content_type: str) -> str:
        """Upload the document and start a job; its id."""
        if self._max_bytes is not None and len(data) > self._max_bytes:
            raise PermanentError(
                f"document is {len(data)} bytes, over the limit parse.max_bytes={self._max_bytes}"
            )
        configuration = {"tier": self._tier, "version": "latest"}
        body = await self._call(
            "POST",
            f"{API}/upload",
            f"uploading {filename!r}",
            files={"file": (filename, data, content_type or "application/octet-stream")},
            data={"configuration": json.dumps(configuration)},
        )
        job_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise RetryableError(f"llamaparse: the upload of {filename!r} returned no job id")
        log.debug("llamaparse job submitted", job_id=job_id, filename=filename, bytes=len(data))
        return job_id

    async def poll(self, job_id: str) -> JobStatus:
        """The job's state now (one cheap request, no content), with the service's hint for
        when to ask again if its answer carries one (`retry-after`)."""
        what = f"polling job {job_id}"
        response = await self._send("GET", f"{API}/{job_id}", what)
        status = _status(job_id, _json(response, what))
        hint = retry_after_from(response.headers)
        return status if hint is None else replace(status, retry_after=hint)

    async def result(self, job_id: str) -> LlamaParseResult:
        """The finished job's Markdown, page by page, with its page count and credits."""
        body = await self._call(
            "GET",
            f"{API}/{job_id}",
            f"reading the result of job {job_id}",
            params=[("expand", "markdown"), ("expand", "job_metadata")],
        )
        status = _status(job_id, body)
        if status.state is not JobState.COMPLETED:
            if status.done:
                raise PermanentError(_job_failed(status, None))
            raise RetryableError(f"llamaparse: job {job_id} is {status.state}, not complete yet")
        return self._to_result(job_id, body)

    def _to_result(self, job_id: str, body: Mapping[str, Any]) -> LlamaParseResult:
        markdown_part = body.get("markdown") or {}
        raw_pages = markdown_part.get("pages") if isinstance(markdown_part, dict) else None
        if not isinstance(raw_pages, list):
            raise RetryableError(f"llamaparse: job {job_id} result has no markdown pages")
        pages: list[str] = []
        failed: list[str] = []
        for raw in sorted(raw_pages, key=lambda p: int(p.get("page_number", 0))):
            if raw.get("success", True) is False or "markdown" not in raw:
                failed.append(f"page {raw.get('page_number')}: {raw.get('error', 'failed')}")
                pages.append("")
            else:
                pages.append(_clean(str(raw["markdown"])))
        if not any(page.strip() for page in pages):
            detail = f" ({'; '.join(failed[:3])})" if failed else ""
            raise PermanentError(f"llamaparse: job {job_id} produced no text{detail}")
        if failed:
            log.warning("llamaparse pages failed", job_id=job_id, failed=failed[:10])
        meta = body.get("job_metadata") or {}
        page_count = _int(meta.get("job_pages")) or len(pages)
        credits = _float(meta.get("job_credits_usage"))
        if credits is None:
            credits = _float(meta.get("credits_used"))
        markdown = "\n\n".join(f"{page_marker(n)}\n\n{text}" for n, text in enumerate(pages, 1))
        heading = _HEADING.search(markdown)
        return LlamaParseResult(
            markdown=markdown.rstrip("\n") + "\n",
            page_count=page_count,
            title=heading.group(1).strip() if heading else None,
            pages=pages,
            parser=PROVIDER,
            parser_version=self.version,
            job_id=job_id,
            credits=credits,
        )

    async def _call(self, method: str, url: str, what: str, **kwargs: Any) -> Any:
        return _json(await self._send(method, url, what, **kwargs), what)

    async def _send(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise RetryableError(f"llamaparse: {what}: the request timed out") from exc
        except httpx.TransportError as exc:
            raise RetryableError(f"llamaparse: {what}: connection failed: {exc}") from exc
        if response.status_code >= 400:
            raise translate_status(response, what)
        return response


def _json(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise RetryableError(f"llamaparse: {what}: the response is not JSON") from exc


def translate_status(response: httpx.Response, what: str) -> RagstreamError:
    """An HTTP error answer as the ragstream error that says what the caller must do."""
    status = response.status_code
    message = f"llamaparse: {what}: HTTP {status}: {_detail(response)}"
    if status == 429 or status >= 500 or status in (408, 409):
        return RetryableError(message, retry_after=retry_after_from(response.headers))
    if status == 402:
        return PermanentError(message + " (no LlamaParse credits left)")
    if status == 401:
        return PermanentError(message + " (check services.llamaparse.api_key)")
    return PermanentError(message)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("error") or body.get("message")
        if isinstance(detail, dict):
            detail = detail.get("message") or detail
        if detail:
            return str(detail)[:500]
    return str(body)[:200]


def _status(job_id: str, body: Any) -> JobStatus:
    job = body.get("job", body) if isinstance(body, dict) else None
    if not isinstance(job, dict):
        raise RetryableError(f"llamaparse: job {job_id}: unexpected status response")
    raw = str(job.get("status", "")).upper()
    state = _STATES.get(raw)
    if state is None:
        raise RetryableError(f"llamaparse: job {job_id} has an unknown status {raw!r}")
    error = job.get("error_message")
    return JobStatus(job_id=job_id, state=state, error=str(error) if error else None)


def _job_failed(status: JobStatus, filename: str | None) -> str:
    about = f" ({filename!r})" if filename else ""
    reason = status.error or "no error message given"
    return f"llamaparse: job {status.job_id}{about} ended {status.state}: {reason}"


_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def estimate_pages(data: bytes, content_type: str) -> int:
    """Pages a job will bill, before it runs: a PDF's page objects, else one page per 5 kB of
    text (an estimate for the budget check; the bill uses what the job reports)."""
    if content_type == "application/pdf" or data[:5] == b"%PDF-":
        return max(1, len(_PDF_PAGE.findall(data)))
    return max(1, -(-len(data) // 5000))


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


# -- many jobs in flight -----------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Job:
    job_id: str
    filename: str
    started: float
    future: asyncio.Future[ParseResult]
    last_error: RagstreamError | None = None
    polls: int = 0
    follower: asyncio.Task[None] | None = None


class JobTracker:
    """Holds up to `max_jobs_in_flight` jobs and follows each from a task of its own: polled
    `first_poll_s` after submit, then every `growth` of its age, at most `poll_interval_s`."""

    def __init__(
        self,
        backend: JobBackend,
        *,
        max_jobs_in_flight: int = 16,
        poll_interval_s: float = 2.0,
        job_timeout_s: float = 1800.0,
        first_poll_s: float = FIRST_POLL_S,
        growth: float = POLL_GROWTH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self.max_jobs_in_flight = max_jobs_in_flight
        self.poll_interval_s = poll_interval_s
        self.job_timeout_s = job_timeout_s
        self.first_poll_s = first_poll_s
        self.growth = growth
        self._clock = clock
        self._slots = asyncio.Semaphore(max_jobs_in_flight)
        self._jobs: dict[str, _Job] = {}
        self._held_until = 0.0  # a 429 holds every job's polls back until then

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def has_capacity(self) -> bool:
        return len(self._jobs) < self.max_jobs_in_flight

    async def submit(
        self, data: bytes, *, filename: str, content_type: str
    ) -> asyncio.Future[ParseResult]:
        """Start a job (waiting for a free slot first); a future for its result."""
        await self._slots.acquire()
        try:
            job_id = await self._backend.submit(data, filename=filename, content_type=content_type)
        except BaseException:
            self._slots.release()
            raise
        future: asyncio.Future[ParseResult] = asyncio.get_running_loop().create_future()
        job = _Job(job_id, filename, self._clock(), future)
        self._jobs[job_id] = job
        job.follower = asyncio.create_task(self._follow(job), name=f"llamaparse-job-{job_id}")
        # A caller that gives up (cancels the future) frees the slot at once.
        future.add_done_callback(lambda _: self._finish(job) if future.cancelled() else None)
        return future

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult:
        future = await self.submit(data, filename=filename, content_type=content_type)
        return await future

    async def aclose(self) -> None:
        """Stop polling; jobs still in flight fail with a RetryableError."""
        jobs = list(self._jobs.values())
        followers = [job.follower for job in jobs if job.follower is not None]
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        for job in jobs:
            self._finish(job, error=RetryableError(f"llamaparse: job {job.job_id} abandoned"))

    def next_wait(self, age_s: float, hint_s: float | None = None) -> float:
        """Seconds until a job of this age is polled again: the service's hint if it gave one,
        else `growth` of the age, at least `first_poll_s` and at most `poll_interval_s`."""
        if hint_s is not None:
            return max(MIN_WAIT_S, hint_s)
        return min(self.poll_interval_s, max(self.first_poll_s, self.growth * age_s))

    async def _follow(self, job: _Job) -> None:
        wait = min(self.first_poll_s, self.poll_interval_s)
        while job.job_id in self._jobs:
            now = self._clock()
            timeout_at = job.started + self.job_timeout_s
            # Never past the job's deadline, so a timeout is seen when it falls due.
            due = min(max(now + wait, self._held_until), timeout_at)
            await asyncio.sleep(max(0.0, due - now))
            if job.job_id not in self._jobs:
                return
            if self._clock() > timeout_at:
                last = f" (last error: {job.last_error})" if job.last_error else ""
                self._finish(
                    job,
                    error=RetryableError(
                        f"llamaparse: job {job.job_id} ({job.filename!r}) did not finish within "
                        f"services.llamaparse.job_timeout_s={self.job_timeout_s:g}{last}"
                    ),
                )
                return
            wait = await self._check(job)

    async def _check(self, job: _Job) -> float:
        """Poll the job once and finish it if it ended; the wait before the next poll."""
        job.polls += 1
        hint: float | None = None
        try:
            status = await self._backend.poll(job.job_id)
            if status.state is JobState.COMPLETED:
                self._finish(job, result=await self._backend.result(job.job_id))
            elif status.done:
                self._finish(job, error=PermanentError(_job_failed(status, job.filename)))
            hint = status.retry_after
        except RetryableError as exc:  # a passing fault: poll again later, until timeout
            job.last_error = exc
            if exc.retry_after is not None:  # a 429: the whole API key waits
                self._held_until = max(self._held_until, self._clock() + exc.retry_after)
            log.info("llamaparse poll failed, will retry", job_id=job.job_id, error=str(exc))
        except Exception as exc:
            self._finish(job, error=exc)
        return self.next_wait(self._clock() - job.started, hint)

    def _finish(
        self, job: _Job, *, result: ParseResult | None = None, error: BaseException | None = None
    ) -> None:
        if self._jobs.pop(job.job_id, None) is None:
            return
        self._slots.release()
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        elif result is not None:
            job.future.set_result(result)
