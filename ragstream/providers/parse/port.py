"""The parse port: document bytes -> Markdown. LlamaParse and the local parser both fit it.

Parsed Markdown carries a `<!-- page N -->` marker line before each page of a paged document
(invisible when rendered), so the chunker knows each chunk's page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Protocol

LOCAL_PARSER_VERSION: Final = "local-1"
PAGE_MARKER_RE: Final = re.compile(r"^<!-- page (\d+) -->$", re.MULTILINE)


def page_marker(number: int) -> str:
    """The line that opens page `number` (1-based) in parsed Markdown."""
    return f"<!-- page {number} -->"


@dataclass(frozen=True, slots=True)
class ParseResult:
    markdown: str
    page_count: int
    title: str | None
    pages: list[str] = field(default_factory=list)
    parser: str = "local"
    parser_version: str = LOCAL_PARSER_VERSION

    def __post_init__(self) -> None:
        # PostgreSQL text cannot hold NUL: no text field of any parser's result carries one
        # (a PDF's title metadata may).
        object.__setattr__(self, "markdown", _no_nul(self.markdown))
        object.__setattr__(self, "title", None if self.title is None else _no_nul(self.title))
        object.__setattr__(self, "pages", [_no_nul(p) for p in self.pages])


class Parser(Protocol):
    """The parse port. A provider that subclasses it gets `current` (itself) and `aclose`
    (nothing to close); a mode switch (`ragstream.providers.modes`) answers `current` with the
    parser of the mode in force."""

    @property
    def name(self) -> str: ...

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult: ...

    def current(self) -> Parser:
        """The parser serving now."""
        return self

    async def aclose(self) -> None:
        """Release what the parser holds (child processes, HTTP clients, pollers)."""
        return None


def _no_nul(text: str) -> str:
    return text.replace("\x00", "") if "\x00" in text else text
