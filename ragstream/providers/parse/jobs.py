"""Many LlamaParse jobs in flight, and no caller kept waiting.

`JobTracker` holds up to `max_jobs_in_flight` jobs, follows each in a background task of its
own and resolves the job's future, so a caller never sits in a poll loop. A job is polled soon
after it is submitted (every `FIRST_POLL_S` at first), then less and less often: each wait is
`POLL_GROWTH` of the job's age, never longer than `poll_interval_s`. A 2 s job is seen complete
at most 0.25 s after it completes (polling all jobs every 2 s took 3.5 s on average), and a job
of many minutes is polled every `poll_interval_s`. A status answer that carries `retry-after`
(or `retry-after-ms`) sets that job's next wait instead; a 429 holds every job's polls back for
its `retry-after`.

A job past `job_timeout_s` fails with `RetryableError`; a FAILED or CANCELLED job with
`PermanentError` carrying the job's error message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

import structlog

from ragstream.errors import PermanentError, RagstreamError, RetryableError
from ragstream.providers.parse.port import ParseResult

log = structlog.get_logger(__name__)

# Job polling: the first poll this long after submit, then each wait POLL_GROWTH of the job's
# age (at least FIRST_POLL_S, at most services.llamaparse.poll_interval_s). A job is seen done
# within FIRST_POLL_S, or POLL_GROWTH of its duration: 8 polls in its first 2 s, 32 in 20 s
# (then one every poll_interval_s).
FIRST_POLL_S: Final = 0.25
POLL_GROWTH: Final = 0.1
MIN_WAIT_S: Final = 0.05  # the shortest wait a `retry-after` hint can ask for


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_id: str
    state: JobState
    error: str | None = None
    retry_after: float | None = None  # the service's hint for the next poll, in seconds

    @property
    def done(self) -> bool:
        return self.state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class JobBackend(Protocol):
    """What a `JobTracker` drives: LlamaParse, or anything with the same three calls."""

    async def submit(self, data: bytes, *, filename: str, content_type: str) -> str: ...

    async def poll(self, job_id: str) -> JobStatus: ...

    async def result(self, job_id: str) -> ParseResult: ...


def job_failed(status: JobStatus, filename: str | None) -> str:
    about = f" ({filename!r})" if filename else ""
    reason = status.error or "no error message given"
    return f"llamaparse: job {status.job_id}{about} ended {status.state}: {reason}"


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
                self._finish(job, error=PermanentError(job_failed(status, job.filename)))
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
