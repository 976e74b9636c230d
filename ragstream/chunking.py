"""Chunk stage logic: Markdown -> token-bounded chunks that remember their heading path.

The document is cut at headings first; a section too long for one chunk is cut at its blocks
(paragraphs, lists, tables, code fences), then list items or table/code lines, then sentences,
then words, and only as a last resort inside a word. Pieces are packed greedily back into
chunks of at most `max_tokens` (counted exactly with the tokenizer), and each chunk after the
first in a section starts `overlap_tokens` (or fewer) before the end of the one before it,
preferably at a sentence start.

Every chunk's text is a slice of the Markdown, `markdown[char_start:char_end]`, never empty.
A chunk's page comes from the `<!-- page N -->` markers the parser writes (None without them).
A section with nothing but its heading is folded into its first subsection, so a parent
heading does not become a chunk of its own. The output depends only on the input, the
settings and the tokenizer, which `Chunker.version` names.

Chunking is CPU-bound and, on hostile input, slow: a 30 MB document takes some 15 s, and a
long run of text with no space in it grows with the square of its length (256 KB: 14 s). The
chunk stage calls `achunk`, which runs `chunk` in a child process of the chunker's own pool
(`ragstream.isolation`), killed past `chunk.timeout_s`, `chunk.cpu_s` or `chunk.memory_mb`;
the chunker's owner calls `aclose()`.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from ragstream.isolation import LimitedPool
from ragstream.providers.parse.port import PAGE_MARKER_RE
from ragstream.settings import ChunkSettings
from ragstream.tokens import Tokenizer

ALGORITHM: Final = "md-1"

_ATX: Final = re.compile(r" {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*")
_FENCE: Final = re.compile(r" {0,3}(`{3,}|~{3,})")
_TABLE: Final = re.compile(r" {0,3}\|")
_SETEXT: Final = re.compile(r" {0,3}(=+|-{2,})[ \t]*")
_LIST_ITEM: Final = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+", re.MULTILINE)
_SENTENCE_END: Final = re.compile(r"[.!?][\"')\]]*\s+")
_WORD: Final = re.compile(r"\S+")
_BOUNDARY: Final = re.compile(r"[.!?][\"')\]]*\s+|\n\s*")


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    text: str
    heading_path: list[str]
    token_count: int
    char_start: int
    char_end: int
    page: int | None = None


@dataclass(slots=True)
class _Block:
    kind: str  # heading | fence | table | text | page
    start: int
    end: int
    level: int = 0  # heading level, or page number for a page marker
    title: str = ""


@dataclass(slots=True)
class _Section:
    path: list[str]
    level: int
    units: list[_Block] = field(default_factory=list)

    @property
    def heading_only(self) -> bool:
        return all(unit.kind == "heading" for unit in self.units)


class Chunker:
    """Markdown-aware, token-bounded, overlapping, deterministic."""

    def __init__(self, settings: ChunkSettings, tokenizer: Tokenizer) -> None:
        if not 0 <= settings.overlap_tokens < settings.max_tokens:
            raise ValueError("overlap_tokens must be in [0, max_tokens)")
        self.settings = settings
        self.max_tokens = settings.max_tokens
        self.overlap_tokens = settings.overlap_tokens
        self.tokenizer = tokenizer
        self._pool = LimitedPool("chunk", settings)

    @property
    def version(self) -> str:
        """Changes whenever a setting, the tokenizer or the algorithm changes."""
        return f"{ALGORITHM}:{self.tokenizer.name}:t{self.max_tokens}:o{self.overlap_tokens}"

    async def achunk(self, markdown: str) -> list[Chunk]:
        """`chunk`, in a child process under the `chunk.*` limits (a `PermanentError` names
        the one passed). Only the spans travel back; the texts are cut here."""
        spans = await self._pool.run(
            _spans,
            self.settings,
            self.tokenizer,
            markdown,
            what=f"chunking a document of {len(markdown)} characters",
        )
        return [
            Chunk(i, markdown[start:end], list(path), tokens, start, end, page)
            for i, (start, end, path, tokens, page) in enumerate(spans)
        ]

    async def aclose(self) -> None:
        """Kill the chunking processes (a chunking in flight fails) and stop the pool."""
        await self._pool.aclose()

    def chunk(self, markdown: str) -> list[Chunk]:
        blocks = _blocks(markdown)
        pages = [(b.start, b.level) for b in blocks if b.kind == "page"]
        chunks: list[Chunk] = []
        for section in _sections(blocks):
            pieces = [
                p
                for unit in section.units
                for p in self._fit(markdown, unit.start, unit.end, unit.kind)
            ]
            for start, end, tokens in self._pack(markdown, pieces):
                chunks.append(
                    Chunk(
                        index=len(chunks),
                        text=markdown[start:end],
                        heading_path=list(section.path),
                        token_count=tokens,
                        char_start=start,
                        char_end=end,
                        page=_page_at(pages, start),
                    )
                )
        return chunks

    # -- splitting: every piece ends up at most max_tokens long ---------------------------------

    def _count(self, markdown: str, start: int, end: int) -> int:
        return self.tokenizer.count(markdown[start:end])

    def _fit(self, md: str, start: int, end: int, kind: str) -> Iterator[tuple[int, int, int]]:
        tokens = self._count(md, start, end)
        if tokens <= self.max_tokens:
            yield start, end, tokens
            return
        splitters: list[Callable[[str, int, int], list[tuple[int, int]]]]
        if kind in ("table", "fence"):
            splitters = [_lines]
        else:
            splitters = [_list_items, _sentences, _lines, _words]
        for split in splitters:
            parts = split(md, start, end)
            if len(parts) > 1:
                for a, b in parts:
                    yield from self._fit(md, a, b, "text")
                return
        yield from self._hard_windows(md, start, end)

    def _hard_windows(self, md: str, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Last resort for a single over-long word: the longest prefixes that fit."""
        while start < end:
            lo, hi = start + 1, end  # find the largest cut with count <= max_tokens
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._count(md, start, mid) <= self.max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            yield start, lo, self._count(md, start, lo)
            start = lo

    # -- packing: greedy, exact, with overlap ----------------------------------------------------

    def _pack(self, md: str, pieces: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, int]]:
        i = 0
        previous: tuple[int, int] | None = None
        while i < len(pieces):
            first_start, first_end, first_tokens = pieces[i]
            start = first_start
            if previous is not None and self.overlap_tokens:
                budget = min(self.overlap_tokens, self.max_tokens - first_tokens - 1)
                start = self._overlap_start(md, previous[0], previous[1], budget, first_start)
            j, estimate = i, self._count(md, start, first_end)
            while j + 1 < len(pieces):  # add pieces while the sum of counts fits, then exactly
                if estimate + pieces[j + 1][2] + 1 <= self.max_tokens:
                    estimate += pieces[j + 1][2] + 1
                elif (exact := self._count(md, start, pieces[j + 1][1])) <= self.max_tokens:
                    estimate = exact
                else:
                    break
                j += 1
            while True:  # a sum of counts is not a count: the exact count decides
                tokens = self._count(md, start, pieces[j][1])
                if tokens <= self.max_tokens or j == i:
                    break
                j -= 1
            if tokens > self.max_tokens:  # the overlap pushed the first piece over: drop it
                start = first_start
                tokens = self._count(md, start, pieces[j][1])
            yield start, pieces[j][1], tokens
            previous = (start, pieces[j][1])
            i = j + 1

    def _overlap_start(
        self, md: str, chunk_start: int, chunk_end: int, budget: int, fallback: int
    ) -> int:
        """The earliest word start inside the previous chunk (not its first) whose tail fits
        `budget` tokens; `fallback` (no overlap) when none does."""
        if budget <= 0:
            return fallback
        starts = [m.start() for m in _WORD.finditer(md, chunk_start + 1, chunk_end)]
        lo, hi = 0, len(starts)  # smallest k with count(starts[k]:chunk_end) <= budget
        while lo < hi:
            mid = (lo + hi) // 2
            if self._count(md, starts[mid], chunk_end) <= budget:
                hi = mid
            else:
                lo = mid + 1
        if lo == len(starts):
            return fallback
        best = starts[lo]
        tail = md[best:chunk_end]
        for m in _BOUNDARY.finditer(tail):  # prefer a line or sentence start in the first half
            if m.end() > len(tail) // 2:
                break
            if m.end() < len(tail) and self._count(md, best + m.end(), chunk_end) * 2 >= budget:
                return best + m.end()
        return best


def _spans(
    settings: ChunkSettings, tokenizer: Tokenizer, markdown: str
) -> list[tuple[int, int, tuple[str, ...], int, int | None]]:
    """In a child process: the chunks of `markdown` without their texts."""
    return [
        (c.char_start, c.char_end, tuple(c.heading_path), c.token_count, c.page)
        for c in Chunker(settings, tokenizer).chunk(markdown)
    ]


# -- Markdown structure ------------------------------------------------------------------------


def _blocks(md: str) -> list[_Block]:
    """Headings, code fences, tables, page markers and text runs, with character spans."""
    lines = md.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    text = [line.rstrip("\r\n") for line in lines]

    def span(first: int, last: int) -> tuple[int, int]:
        indent = len(text[first]) - len(text[first].lstrip())
        return offsets[first] + indent, offsets[last] + len(text[last].rstrip())

    def starts_block(k: int) -> bool:
        return bool(
            _ATX.fullmatch(text[k])
            or _FENCE.match(text[k])
            or _TABLE.match(text[k])
            or PAGE_MARKER_RE.fullmatch(text[k].strip())
        )

    blocks: list[_Block] = []
    i, n = 0, len(lines)
    while i < n:
        line = text[i]
        if not line.strip():
            i += 1
            continue
        if marker := PAGE_MARKER_RE.fullmatch(line.strip()):
            blocks.append(_Block("page", *span(i, i), level=int(marker.group(1))))
            i += 1
        elif fence := _FENCE.match(line):
            close = re.compile(
                rf" {{0,3}}{re.escape(fence.group(1)[0])}{{{len(fence.group(1))},}}\s*"
            )
            j = i + 1
            while j < n and not close.fullmatch(text[j]):
                j += 1
            j = min(j, n - 1)
            blocks.append(_Block("fence", *span(i, j)))
            i = j + 1
        elif (atx := _ATX.fullmatch(line)) and atx.group(2).strip():
            blocks.append(_Block("heading", *span(i, i), len(atx.group(1)), atx.group(2).strip()))
            i += 1
        elif _TABLE.match(line):
            j = i
            while j + 1 < n and _TABLE.match(text[j + 1]):
                j += 1
            blocks.append(_Block("table", *span(i, j)))
            i = j + 1
        elif (
            i + 1 < n and (setext := _SETEXT.fullmatch(text[i + 1])) and not _LIST_ITEM.match(line)
        ):
            level = 1 if setext.group(1).startswith("=") else 2
            blocks.append(_Block("heading", *span(i, i + 1), level, line.strip()))
            i += 2
        else:
            j = i
            while j + 1 < n and text[j + 1].strip() and not starts_block(j + 1):
                j += 1
            blocks.append(_Block("text", *span(i, j)))
            i = j + 1
    return blocks


def _sections(blocks: list[_Block]) -> Iterator[_Section]:
    """Group blocks under their headings; fold heading-only sections into a subsection."""
    stack: list[tuple[int, str]] = []
    current = _Section(path=[], level=0)
    pending: _Section | None = None
    for block in blocks:
        if block.kind == "page":
            continue
        if block.kind != "heading":
            current.units.append(block)
            continue
        if current.units:  # close the section before this heading
            if current.heading_only:
                pending = current
            else:
                yield current
        while stack and stack[-1][0] >= block.level:
            stack.pop()
        stack.append((block.level, block.title))
        current = _Section(path=[title for _, title in stack], level=block.level, units=[block])
        if pending is not None:
            if block.level > pending.level:
                current.units[:0] = pending.units
            else:
                yield pending
            pending = None
    if current.units:
        yield current


def _page_at(pages: list[tuple[int, int]], offset: int) -> int | None:
    k = bisect.bisect_right([start for start, _ in pages], offset)
    return pages[k - 1][1] if k else None


def _trimmed(md: str, parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in parts:
        piece = md[a:b]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            out.append((a + lead, a + lead + len(stripped)))
    return out


def _cut(md: str, start: int, end: int, cuts: list[int]) -> list[tuple[int, int]]:
    edges = [start, *sorted(c for c in set(cuts) if start < c < end), end]
    return _trimmed(md, list(itertools.pairwise(edges)))


def _lines(md: str, start: int, end: int) -> list[tuple[int, int]]:
    return _cut(md, start, end, [start + m.end() for m in re.finditer(r"\n", md[start:end])])


def _list_items(md: str, start: int, end: int) -> list[tuple[int, int]]:
    return _cut(md, start, end, [start + m.start() for m in _LIST_ITEM.finditer(md[start:end])])


def _sentences(md: str, start: int, end: int) -> list[tuple[int, int]]:
    return _cut(md, start, end, [start + m.end() for m in _SENTENCE_END.finditer(md[start:end])])


def _words(md: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(start + m.start(), start + m.end()) for m in _WORD.finditer(md[start:end])]
