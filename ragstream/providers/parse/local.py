"""The local parser: document bytes -> Markdown, with no network and no Kafka.

`LocalParser` reads PDF (pypdf), Markdown, HTML (markdownify) and plain text. PDF pages are
kept apart: the Markdown carries a `<!-- page N -->` marker line before each page (invisible
when rendered), so a chunk knows its page, and `ParseResult.pages` holds each page's text.

Limits come from `ParseSettings`: size is checked before any work, the page count as soon as
the PDF is open. The parse itself runs in a child process of the parser's own pool
(`ragstream.isolation`), killed and replaced when it passes `parse.timeout_s` of wall-clock
time, `parse.cpu_s` of CPU time or `parse.memory_mb` of memory, so a crafted file cannot hold
a thread or the worker. Passing a limit, a corrupt or encrypted file, or a document with no
text is a `PermanentError` (retrying cannot help). The pool starts on the first parse; its
owner calls `aclose()`.
"""

from __future__ import annotations

import io
import itertools
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

import bs4
import markdownify
import pypdf

from ragstream.content_types import (
    HTML,
    MARKDOWN,
    PDF,
    SUPPORTED_CONTENT_TYPES,
    charset_param,
    decode_text,
    detect_content_type,
    normalize_content_type,
)
from ragstream.errors import PermanentError
from ragstream.isolation import LimitedPool
from ragstream.providers.parse.port import LOCAL_PARSER_VERSION, Parser, ParseResult, page_marker
from ragstream.settings import ParseSettings

_DROP_TAGS: Final = ("script", "style", "nav", "noscript", "template", "iframe", "svg", "head")


class LocalParser(Parser):
    """Real local parsing, in child processes bounded by `ParseSettings`."""

    name: Final = "local"
    version: Final = LOCAL_PARSER_VERSION

    def __init__(self, settings: ParseSettings) -> None:
        self.settings = settings
        self._pool = LimitedPool("parse", settings)

    async def aclose(self) -> None:
        """Kill the parsing processes (a parse in flight fails) and stop the pool."""
        await self._pool.aclose()

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult:
        limits = self.settings
        if len(data) > limits.max_bytes:
            raise PermanentError(
                f"document is {len(data)} bytes, over the limit parse.max_bytes={limits.max_bytes}"
            )
        kind = normalize_content_type(content_type)
        if kind in ("", "application/octet-stream", "binary/octet-stream"):
            kind = detect_content_type(filename, data)
        if kind not in SUPPORTED_CONTENT_TYPES:
            raise PermanentError(f"unsupported content type {content_type!r} for {filename!r}")
        charset = charset_param(content_type)
        return await self._pool.run(
            _parse_sync, data, kind, charset, limits.max_pages, what=f"parsing {filename!r}"
        )


def _parse_sync(data: bytes, kind: str, charset: str | None, max_pages: int) -> ParseResult:
    if kind == PDF:
        return _parse_pdf(data, max_pages)
    text = decode_text(data, charset)
    if kind == HTML:
        return _parse_html(text)
    markdown = _clean(text)
    if not markdown.strip():
        raise PermanentError("no text content: the document is empty")
    title = _first_heading(markdown) if kind == MARKDOWN else None
    return ParseResult(markdown=markdown, page_count=1, title=title, pages=[markdown])


# -- text and Markdown -------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Normalise newlines, drop NULs (PostgreSQL text cannot hold them) and trailing blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def _first_heading(markdown: str) -> str | None:
    match = re.search(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", markdown, re.MULTILINE)
    return match.group(1).strip() if match else None


# -- HTML --------------------------------------------------------------------------------------


def _parse_html(text: str) -> ParseResult:
    soup = bs4.BeautifulSoup(text, "html.parser")
    title_tag = soup.find("title")
    title = title_tag.get_text(" ", strip=True) if title_tag else ""
    if not title:
        h1 = soup.find("h1")
        title = h1.get_text(" ", strip=True) if h1 else ""
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    converter = markdownify.MarkdownConverter(
        heading_style=markdownify.ATX, bullets="-", strip=["img"], table_infer_header=True
    )
    markdown = _clean(converter.convert_soup(soup))
    if not re.search(r"\w", markdown):
        raise PermanentError("no text content: the HTML has no readable text")
    return ParseResult(markdown=markdown, page_count=1, title=title or None, pages=[markdown])


# -- PDF ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Line:
    text: str
    size: float  # effective font size, points
    y: float  # baseline, page coordinates (grows upwards)


def _parse_pdf(data: bytes, max_pages: int) -> ParseResult:
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        encrypted = reader.is_encrypted
    except Exception as exc:  # pypdf raises many kinds on broken input
        raise _pdf_error(exc) from exc
    if encrypted:  # owner-password-only PDFs open with the empty user password
        try:
            opened = bool(reader.decrypt(""))
        except Exception as exc:
            raise _pdf_error(exc, "encrypted PDF: cannot decrypt it") from exc
        if not opened:
            raise PermanentError(NEEDS_PASSWORD)
    try:
        page_count = len(reader.pages)
    except Exception as exc:
        raise _pdf_error(exc) from exc
    if page_count == 0:
        raise PermanentError("corrupt PDF: it has no pages")
    if page_count > max_pages:
        raise PermanentError(
            f"PDF has {page_count} pages, over the limit parse.max_pages={max_pages}"
        )
    try:
        page_lines = [_page_lines(page) for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except Exception as exc:
        raise _pdf_error(exc) from exc
    if not any(line.text.strip() for lines in page_lines for line in lines):
        raise PermanentError("PDF has no extractable text (scanned pages need OCR)")
    every_line = [line for lines in page_lines for line in lines]
    levels = _heading_levels(every_line)
    full = _full_line_chars(every_line)
    pages = [_page_markdown(lines, levels, full) for lines in page_lines]
    markdown = _clean("\n\n".join(f"{page_marker(n)}\n\n{text}" for n, text in enumerate(pages, 1)))
    title = str(meta_title).strip() or _first_heading(markdown)
    return ParseResult(markdown=markdown, page_count=page_count, title=title, pages=pages)


NEEDS_PASSWORD = "encrypted PDF: a password is needed to read it"


def _pdf_error(exc: Exception, what: str = "corrupt PDF") -> PermanentError:
    """pypdf's error as the reason a document is refused: a password it needs, a decryption
    it cannot do, or a broken file."""
    if isinstance(exc, pypdf.errors.FileNotDecryptedError | pypdf.errors.WrongPasswordError):
        return PermanentError(NEEDS_PASSWORD)
    if isinstance(exc, pypdf.errors.DependencyError):  # AES without `cryptography` installed
        return PermanentError(f"encrypted PDF: cannot decrypt it here: {exc}")
    return PermanentError(f"{what}: {type(exc).__name__}: {exc}")


def _page_lines(page: pypdf.PageObject) -> list[_Line]:
    """Lines of one page with their font size and height, from pypdf's text visitor."""
    lines: list[_Line] = []
    parts: list[str] = []
    sizes: Counter[float] = Counter()
    y: float | None = None

    def end_line() -> None:
        nonlocal parts, sizes, y
        text = re.sub(r"\s+", " ", "".join(parts).replace("\x00", "")).strip()
        if text:
            lines.append(_Line(text, sizes.most_common(1)[0][0] if sizes else 0.0, y or 0.0))
        parts, sizes, y = [], Counter(), None

    def visit(text: str, cm: Any, tm: Any, font: Any, size: float) -> None:
        nonlocal y
        for n, piece in enumerate(text.split("\n")):
            if n:
                end_line()
            if piece.strip():
                scale = abs(float(tm[3]) * float(cm[3])) or 1.0
                sizes[round(size * scale, 1)] += len(piece.strip())
                if y is None:
                    y = float(tm[5]) * float(cm[3]) + float(cm[5])
            parts.append(piece)

    page.extract_text(visitor_text=visit)
    end_line()
    return lines


def _heading_levels(lines: list[_Line]) -> dict[float, int]:
    """Font sizes clearly above the body size -> Markdown heading levels (largest is 1)."""
    weight: Counter[float] = Counter()
    for line in lines:
        weight[line.size] += len(line.text)
    if not weight:
        return {}
    body = weight.most_common(1)[0][0]
    bigger = sorted((s for s in weight if s >= body * 1.1), reverse=True)
    return {size: min(level, 6) for level, size in enumerate(bigger, 1)}


def _full_line_chars(lines: list[_Line]) -> int:
    """How many characters a line that runs to the margin holds (the 90th percentile)."""
    lengths = sorted(len(line.text) for line in lines)
    return lengths[int(len(lengths) * 0.9)] if lengths else 0


def _page_markdown(lines: list[_Line], levels: dict[float, int], full: int = 0) -> str:
    """Join a page's lines: headings as ATX, a wide vertical gap as a paragraph break.

    A line in a heading's font size is a heading only when it is short: a line that runs to
    the margin (at least 70% of a full line), or the next line of a paragraph in that size
    (just below a line of the same size that was not a heading), is body text, so a paragraph
    set in a larger font stays a paragraph."""
    gaps = [a.y - b.y for a, b in itertools.pairwise(lines) if 0 < a.y - b.y < 3 * b.size]
    usual = statistics.median(gaps) if gaps else 0.0
    out: list[str] = []
    previous: _Line | None = None
    previous_body = False
    for line in lines:
        level = levels.get(line.size) if len(line.text) <= 150 else None
        wrapped = bool(full) and len(line.text) >= 0.7 * full
        continued = (
            previous is not None
            and previous_body
            and previous.size == line.size
            and 0 < previous.y - line.y <= 2 * line.size
        )
        if wrapped or continued:
            level = None
        previous_body = level is None
        if level is not None:
            out.append(f"\n{'#' * level} {line.text}\n")
        elif previous is not None and usual and previous.y - line.y > usual * 1.4:
            out.append(f"\n{line.text}")
        elif line.text.startswith("• "):
            out.append(f"- {line.text[2:]}")
        else:
            out.append(line.text)
        previous = line
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
