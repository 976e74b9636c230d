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
`Parser` port through its `JobTracker` (`ragstream.providers.parse.jobs`): many jobs in flight,
each followed by a task of its own, so a caller never sits in a poll loop. A job past
`job_timeout_s` fails with `RetryableError`; a FAILED or CANCELLED job with
`PermanentError` carrying the job's error message. HTTP errors are translated as for OpenAI:
429 (retry_after from `retry-after`), 408, 409, 5xx and lost connections are retryable; 402
(no credits left) and other 4xx are permanent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import httpx
import structlog

from ragstream import tracing
from ragstream.cost.meter import Meter, metered
from ragstream.errors import ConfigError, PermanentError, RagstreamError, RetryableError
from ragstream.providers.parse.jobs import JobState, JobStatus, JobTracker, job_failed
from ragstream.providers.parse.port import Parser, ParseResult, page_marker
from ragstream.providers.ratelimit import retry_after_from
from ragstream.settings import LlamaParseSettings

log = structlog.get_logger(__name__)

PROVIDER: Final = "llamaparse"
API: Final = "/api/v2/parse"
REQUEST_TIMEOUT_S: Final = 120.0
_HEADING: Final = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


# v2 names, and v1's (SUCCESS, ERROR, CANCELED) for servers that still answer with them.
_STATES: Final = {
    **{state.value: state for state in JobState},
    "SUCCESS": JobState.COMPLETED,
    "ERROR": JobState.FAILED,
    "CANCELED": JobState.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class LlamaParseResult(ParseResult):
    """A `ParseResult` with what the bill needs: the job and the credits it used."""

    job_id: str = ""
    credits: float | None = None


# -- the REST client ---------------------------------------------------------------------------


class LlamaParseParser(Parser):
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
                billed = result if isinstance(result, LlamaParseResult) else None
                if span is not None:
                    span.set_attribute("llamaparse.job_id", billed.job_id if billed else "")
                    span.set_attribute("llamaparse.pages", result.page_count)
            credits = billed.credits if billed else None
            if credits is None:
                credits = result.page_count * self.credits_per_page
            bill.report(credits, request_id=billed.job_id if billed else None)
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
                raise PermanentError(job_failed(status, None))
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
