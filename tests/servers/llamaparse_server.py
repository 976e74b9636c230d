"""A local server speaking LlamaParse's v2 parse API, with job outcomes and faults on demand.

    POST /api/v2/parse/upload   multipart `file` + `configuration` (JSON) -> {id, status, ...}
    GET  /api/v2/parse/{id}     -> {job: {id, status, error_message, ...}}, and with
                                   ?expand=markdown / job_metadata the pages and the usage

A job is PENDING, then RUNNING, then COMPLETED `job_duration_s` after its upload (or FAILED /
CANCELLED with an error message, when injected with `fail_next_jobs`). Its pages are the
uploaded text split at form feeds (`\\f`), or `pages_per_job` generated pages for binary files;
credits are `credits_per_page` per page. `inject_http(status, times, on=...)` answers the next
requests to "upload", "get" or "any" endpoint with that HTTP status instead. With
`status_retry_after_s`, a status answer for a job still under way carries `retry-after` (a
hint for when to poll again). Uploads are kept in `uploads`; each job's `poll_times` says when
it was polled (seconds after its upload); `max_running` tells how many jobs were running at
once at most.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.servers import BackgroundServer

Endpoint = Literal["upload", "get", "any"]


@dataclass
class Upload:
    job_id: str
    filename: str
    content_type: str
    size: int
    configuration: dict[str, object]


@dataclass
class _Job:
    id: str
    created: float
    duration_s: float
    pages: list[str]
    outcome: Literal["COMPLETED", "FAILED", "CANCELLED"] = "COMPLETED"
    error_message: str | None = None
    polls: int = 0
    poll_times: list[float] = field(default_factory=list)  # seconds after the upload
    result_reads: int = 0
    tier: str = "cost_effective"

    def status(self, now: float) -> str:
        elapsed = now - self.created
        if elapsed >= self.duration_s:
            return self.outcome
        return "PENDING" if elapsed < self.duration_s * 0.1 else "RUNNING"


@dataclass(frozen=True)
class _HttpFault:
    status: int
    on: Endpoint
    retry_after_s: float | None


class LlamaParseServer(BackgroundServer):
    """LlamaParse's v2 parse endpoints on 127.0.0.1."""

    def __init__(
        self,
        *,
        job_duration_s: float = 0.5,
        credits_per_page: float = 3.0,
        pages_per_job: int = 2,
        api_key: str = "test-key",
        port: int | None = None,
        status_retry_after_s: float | None = None,
    ) -> None:
        super().__init__(
            Starlette(
                routes=[
                    Route("/api/v2/parse/upload", self._upload, methods=["POST"]),
                    Route("/api/v2/parse/{job_id}", self._get, methods=["GET"]),
                ]
            ),
            port=port,
        )
        self.job_duration_s = job_duration_s
        self.credits_per_page = credits_per_page
        self.pages_per_job = pages_per_job
        self.api_key = api_key
        self.status_retry_after_s = status_retry_after_s
        self.uploads: list[Upload] = []
        self.requests = 0
        self.jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._job_outcomes: deque[tuple[Literal["FAILED", "CANCELLED"], str]] = deque()
        self._http_faults: deque[_HttpFault] = deque()

    def fail_next_jobs(
        self,
        outcome: Literal["FAILED", "CANCELLED"] = "FAILED",
        error_message: str = "could not parse the document",
        times: int = 1,
    ) -> None:
        with self._lock:
            self._job_outcomes.extend([(outcome, error_message)] * times)

    def inject_http(
        self,
        status: int,
        times: int = 1,
        *,
        on: Endpoint = "any",
        retry_after_s: float | None = None,
    ) -> None:
        with self._lock:
            self._http_faults.extend([_HttpFault(status, on, retry_after_s)] * times)

    def max_running(self) -> int:
        """The most jobs that were under way at the same moment."""
        events = sorted(
            [(j.created, 1) for j in self.jobs.values()]
            + [(j.created + j.duration_s, -1) for j in self.jobs.values()]
        )
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        return peak

    # -- endpoints ------------------------------------------------------------------------------

    def _refuse(self, request: Request, endpoint: Endpoint) -> JSONResponse | None:
        self.requests += 1
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"detail": "Invalid API key"}, status_code=401)
        with self._lock:
            for fault in self._http_faults:
                if fault.on in ("any", endpoint):
                    self._http_faults.remove(fault)
                    break
            else:
                return None
        headers = {}
        if fault.retry_after_s is not None:
            headers["retry-after"] = f"{fault.retry_after_s:g}"
        detail = "Too many requests" if fault.status == 429 else "Internal server error"
        return JSONResponse({"detail": detail}, status_code=fault.status, headers=headers)

    async def _upload(self, request: Request) -> JSONResponse:
        refused = self._refuse(request, "upload")
        if refused is not None:
            return refused
        async with request.form() as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return JSONResponse({"detail": "file is required"}, status_code=422)
            data = await upload.read()
            filename, content_type = upload.filename or "document", upload.content_type or ""
            raw_config = form.get("configuration")
        configuration = json.loads(raw_config) if isinstance(raw_config, str) else {}
        job_id = f"pjb-{uuid.uuid4().hex[:20]}"
        job = _Job(
            job_id,
            time.monotonic(),
            self.job_duration_s,
            self._pages(filename, data),
            tier=str(configuration.get("tier", "cost_effective")),
        )
        with self._lock:
            if self._job_outcomes:
                job.outcome, job.error_message = self._job_outcomes.popleft()
            self.jobs[job_id] = job
        self.uploads.append(Upload(job_id, filename, content_type, len(data), configuration))
        return JSONResponse(
            {"id": job_id, "project_id": "prj-test", "status": "PENDING", "error_message": None}
        )

    async def _get(self, request: Request) -> JSONResponse:
        refused = self._refuse(request, "get")
        if refused is not None:
            return refused
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            return JSONResponse({"detail": "Job not found"}, status_code=404)
        now = time.monotonic()
        status = job.status(now)
        expand = set(request.query_params.getlist("expand"))
        body: dict[str, object] = {
            "job": {
                "id": job.id,
                "project_id": "prj-test",
                "status": status,
                "error_message": job.error_message if status in ("FAILED", "CANCELLED") else None,
                "tier": job.tier,
            }
        }
        if expand:
            job.result_reads += 1
        else:
            job.polls += 1
            job.poll_times.append(now - job.created)
        if status == "COMPLETED":
            if "markdown" in expand:
                body["markdown"] = {
                    "pages": [
                        {"page_number": n, "markdown": text, "success": True}
                        for n, text in enumerate(job.pages, 1)
                    ]
                }
            if "job_metadata" in expand:
                body["job_metadata"] = {
                    "job_pages": len(job.pages),
                    "job_credits_usage": len(job.pages) * self.credits_per_page,
                    "job_is_cache_hit": False,
                }
        headers = {}
        if self.status_retry_after_s is not None and status in ("PENDING", "RUNNING"):
            headers["retry-after"] = f"{self.status_retry_after_s:g}"
        return JSONResponse(body, headers=headers)

    def _pages(self, filename: str, data: bytes) -> list[str]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if text.strip() and "\x00" not in text:
            return [page.strip() for page in text.split("\f")]
        return [
            f"# {filename}, page {n}\n\nParsed text of page {n}."
            for n in range(1, self.pages_per_job + 1)
        ]
