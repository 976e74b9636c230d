"""Logging set-up. Only entry points call `configure_logging`; modules just get a logger.

Lines are JSON (one object per line) when not on a terminal, human-readable on one. Context
bound with `structlog.contextvars.bound_contextvars(...)` (topic, partition, offset, document and
correlation id) appears on every line of one record's handling.

No secret reaches a line: the finished line goes through `ragstream.scrub.Scrubber` (every value
passed as `secrets`, see `secret_values`, and common credential shapes become `***`);
tracebacks carry no local variables.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable
from typing import Any, Literal

import structlog
from pydantic import SecretStr

from ragstream.scrub import Scrubber


class _Redact:
    """The last processor: the scrubber over the rendered line."""

    def __init__(self, secrets: Iterable[str | SecretStr | None]) -> None:
        self._scrub = Scrubber(secrets)

    def __call__(self, logger: Any, method: str, line: Any) -> Any:
        return self._scrub(line) if isinstance(line, str) else line


def _console_tracebacks(colors: bool) -> structlog.typing.ExceptionRenderer:
    formatter = (
        structlog.dev.default_exception_formatter
        if colors
        else structlog.dev.default_monochrome_exception_formatter
    )
    if isinstance(formatter, structlog.dev.RichTracebackFormatter):
        return dataclasses.replace(formatter, show_locals=False)
    return structlog.dev.plain_traceback


_JSON_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure_logging(
    level: str = "INFO",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    secrets: Iterable[str | SecretStr | None] = (),
) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    colors = sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=_console_tracebacks(colors)
        )
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([_JSON_TRACEBACKS] if use_json else []),
            renderer,
            _Redact(secrets),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO about routine coordinator changes.
    for name in ("aiokafka", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # ...and repeat themselves many times a second while a broker is away: one line per kind
    # of message per interval is enough (the runtime logs its own wait for the broker).
    kafka_log = logging.getLogger("aiokafka")
    kafka_log.filters[:] = [f for f in kafka_log.filters if not isinstance(f, OncePer)]
    kafka_log.addFilter(OncePer(REPEAT_INTERVAL_S))


REPEAT_INTERVAL_S = 30.0


class OncePer(logging.Filter):
    """Lets a message through once per `interval_s`, counting by its template (the format
    string before arguments), so a client's retry loop logs once, not ten times a second."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (str(record.msg), record.levelno)
        now = record.created
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True
