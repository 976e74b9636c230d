"""Logging set-up. Only entry points call `configure_logging`; modules just get a logger.

Lines are JSON (one object per line) when not on a terminal, human-readable on one. Context
bound with `structlog.contextvars.bound_contextvars(...)` (topic, partition, offset, document and
correlation id) appears on every line of one record's handling.

No secret reaches a line: every value passed as `secrets` (see `secret_values`), in plain,
JSON-escaped and URL-quoted form, and any password in a URL or bearer token is replaced with
`***` in the finished line; tracebacks carry no local variables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit

import structlog
from pydantic import SecretStr

if TYPE_CHECKING:
    from ragstream.settings import Settings

MASK = "***"
_MIN_SECRET_LEN = 4  # shorter values would mask common words; URL passwords are masked anyway
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+")


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold: the SecretStr fields and a password inside postgres.url."""
    from ragstream.settings import SECRET_KEYS

    values: list[str] = []
    for dotted in SECRET_KEYS:
        node: Any = settings
        for part in dotted.split("."):
            node = getattr(node, part, None)
        if isinstance(node, SecretStr):
            values.append(node.get_secret_value())
    if settings.postgres.url:
        password = urlsplit(settings.postgres.url).password
        if password:
            values.append(password)
    return values


class _Redact:
    """The last processor: masks secrets in the rendered line."""

    def __init__(self, secrets: Iterable[str | SecretStr | None]) -> None:
        variants: set[str] = set()
        for secret in secrets:
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            if not value or len(value) < _MIN_SECRET_LEN:
                continue
            for form in (value, quote(value, safe="")):  # as is, in a URL, escaped in JSON/repr
                variants |= {form, json.dumps(form)[1:-1], repr(form)[1:-1]}
        ordered = sorted(variants, key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, logger: Any, method: str, line: Any) -> Any:
        if not isinstance(line, str):
            return line
        if self._values is not None:
            line = self._values.sub(MASK, line)
        line = _URL_PASSWORD.sub(r"\1" + MASK + "@", line)
        return _BEARER.sub(r"\1" + MASK, line)


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
