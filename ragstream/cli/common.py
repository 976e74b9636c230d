"""Shared pieces of the CLI: consoles, settings, and running an async operation."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar, get_args

import typer
import uvloop
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperArgument, TyperOption

from ragstream import tracing
from ragstream.errors import ConfigError, RagstreamError
from ragstream.logs import configure_logging
from ragstream.scrub import Scrubber, secret_values
from ragstream.settings import Settings, load_settings

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    # One line however long (soft wrap): an error is copied, grepped and pasted whole.
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def progress_bar(label: str) -> Progress:
    """A progress bar on stderr, shown on a terminal only and gone when done (stdout keeps
    the tables). `label` is a rich.progress TextColumn format, e.g. "{task.description}"."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def settings_or_exit(*, quiet: bool = True, traced: bool = False) -> Settings:
    """Build the settings once and configure logging. Operator commands are `quiet` (warnings
    and errors only, so tables and progress bars stay readable); workers log at the configured
    level. Commands that publish or handle documents are `traced`: spans are exported when
    `observability.otlp_endpoint` is set (ragstream.tracing)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    level = settings.observability.log_level
    if quiet and level in ("DEBUG", "INFO"):
        level = "WARNING"
    configure_logging(level, settings.observability.log_format, secrets=secret_values(settings))
    if quiet:
        # An operator command reports a broker it cannot reach, or a coordinator moving, as
        # one line of its own; the client library's retries in between are noise here.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if traced:
        tracing.configure(settings.observability)
    scrub = Scrubber.from_settings(settings)
    # Whatever a command prints (tables, JSON, errors) passes through the scrubber: a dead
    # letter's message or a journey's detail may quote what an upstream service echoed.
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, ScrubbedStream):
            setattr(sys, name, ScrubbedStream(stream, scrub))
    return settings


class ScrubbedStream:
    """A text stream whose writes are scrubbed of secrets; everything else is the stream's."""

    def __init__(self, stream: TextIO, scrub: Scrubber) -> None:
        self._stream = stream
        self._scrub = scrub

    def write(self, text: str) -> int:
        self._stream.write(self._scrub(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def run(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run an async operation; turn ragstream's errors into one line and an exit code."""
    try:
        return uvloop.run(fn(*args, **kwargs))  # type: ignore[arg-type]
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    except RagstreamError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def full_document_ids(settings: Settings, keys: Sequence[str]) -> list[str]:
    """Each key as a whole document id: itself, or the one id it is the start of (4
    characters or more, as the tables show ids). An ambiguous start is a ConfigError naming
    the candidates; a key that is no document's is kept as it is."""
    from ragstream.store import Store

    if not keys:
        return []
    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=1) as store:
        return [await store.document_id(key) or key for key in keys]


# -- option placeholders ------------------------------------------------------------------------

_PLACEHOLDERS: dict[object, str] = {str: "TEXT", int: "N", float: "NUMBER", Path: "PATH"}


def _plain_placeholder(self: TyperOption | TyperArgument, ctx: Any) -> str | None:
    """A parameter's placeholder in --help as operators read them (TEXT, N, PATH; none for a
    flag; a choice's values), instead of the Python type (`<list[str]>`, `<bool>`)."""
    if self.metavar is not None:
        return str(self.metavar)
    if getattr(self, "is_flag", False):
        return None
    desc = self.type_descriptor
    if desc.is_choice:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    annotation: object = get_args(desc.annotation)[0] if desc.is_list else desc.annotation
    if annotation not in _PLACEHOLDERS:
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
    return _PLACEHOLDERS.get(annotation, "VALUE")


TyperOption.display_type_rich = _plain_placeholder  # type: ignore[method-assign]
TyperArgument.display_type_rich = _plain_placeholder  # type: ignore[method-assign,assignment]
