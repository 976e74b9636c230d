"""The Markdown chunker: bounded, overlapping, heading-aware, faithful to offsets, deterministic."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import string
import time

import pytest

from ragstream.chunking import Chunk, Chunker
from ragstream.errors import PermanentError
from ragstream.providers.parse.local import LocalParser
from ragstream.providers.parse.port import PAGE_MARKER_RE
from ragstream.samples import sample_dir, sample_manifest
from ragstream.settings import ChunkSettings, ParseSettings
from ragstream.tokens import get_tokenizer

TOKENIZER = get_tokenizer()


def _chunker(max_tokens: int = 400, overlap_tokens: int = 40) -> Chunker:
    return Chunker(ChunkSettings(max_tokens=max_tokens, overlap_tokens=overlap_tokens), TOKENIZER)


def _parsed() -> dict[str, str]:
    async def parse_all() -> dict[str, str]:
        parser = LocalParser(ParseSettings())
        out = {}
        for entry in sample_manifest():
            data = (sample_dir() / entry["filename"]).read_bytes()
            result = await parser.parse(
                data, filename=entry["filename"], content_type=entry["content_type"]
            )
            out[entry["filename"]] = result.markdown
        return out

    return asyncio.run(parse_all())


SAMPLES = _parsed()
SETTINGS = [(400, 40), (64, 16), (32, 0), (16, 4)]


def _check_invariants(markdown: str, chunks: list[Chunk], max_tokens: int, overlap: int) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    covered = [False] * len(markdown)
    for chunk in chunks:
        assert chunk.text.strip(), "empty chunk"
        assert chunk.text == markdown[chunk.char_start : chunk.char_end]
        assert chunk.token_count == TOKENIZER.count(chunk.text) <= max_tokens
        for k in range(chunk.char_start, chunk.char_end):
            covered[k] = True
    for previous, chunk in itertools.pairwise(chunks):
        assert chunk.char_start > previous.char_start and chunk.char_end > previous.char_end
        if chunk.char_start < previous.char_end:  # overlap: same section, bounded
            assert chunk.heading_path == previous.heading_path
            assert TOKENIZER.count(markdown[chunk.char_start : previous.char_end]) <= overlap
    markers = {k for m in PAGE_MARKER_RE.finditer(markdown) for k in range(m.start(), m.end())}
    missed = [
        k for k, c in enumerate(markdown) if not c.isspace() and not covered[k] and k not in markers
    ]
    assert not missed, f"text not in any chunk: {markdown[missed[0] : missed[0] + 40]!r}"


@pytest.mark.parametrize(("max_tokens", "overlap"), SETTINGS)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_chunk_within_bounds_and_cover_the_text(
    name: str, max_tokens: int, overlap: int
) -> None:
    markdown = SAMPLES[name]
    chunks = _chunker(max_tokens, overlap).chunk(markdown)
    assert chunks
    _check_invariants(markdown, chunks, max_tokens, overlap)


def test_overlap_is_present_between_chunks_of_one_section() -> None:
    markdown = SAMPLES["kafka-consumer-groups.pdf"]
    chunks = _chunker(64, 16).chunk(markdown)
    pairs = [(a, b) for a, b in itertools.pairwise(chunks) if a.heading_path == b.heading_path]
    assert len(pairs) >= 5
    overlaps = [TOKENIZER.count(markdown[b.char_start : a.char_end]) for a, b in pairs]
    assert all(0 < n <= 16 for n in overlaps), overlaps
    assert sum(overlaps) / len(overlaps) >= 8  # close to the budget, not a token or two
    across = [(a, b) for a, b in itertools.pairwise(chunks) if a.heading_path != b.heading_path]
    assert all(b.char_start >= a.char_end for a, b in across)  # never across sections


def test_no_overlap_when_set_to_zero() -> None:
    chunks = _chunker(32, 0).chunk(SAMPLES["lisbon-weekend-guide.pdf"])
    assert all(b.char_start >= a.char_end for a, b in itertools.pairwise(chunks))


def test_heading_paths_follow_the_outline() -> None:
    faq = _chunker(400, 40).chunk(SAMPLES["backup-service-faq.md"])
    title = "Nimbus Backup: Frequently Asked Questions"
    assert [c.heading_path for c in faq] == [
        [title],
        [title, "Accounts and billing", "How is Nimbus Backup priced?"],
        [title, "Accounts and billing", "Can I change plans or cancel at any time?"],
        [title, "Accounts and billing", "Do you offer discounts for schools and charities?"],
        [title, "Backups", "What is backed up by default?"],
        [title, "Backups", "Is my data encrypted?"],
        [title, "Backups", "Does backing up slow down my computer?"],
        [title, "Restore", "How do I restore a deleted file?"],
        [title, "Restore", "How long does a full restore take?"],
    ]
    # a heading with nothing of its own is folded into its first subsection, not a chunk alone
    assert faq[1].text.startswith("## Accounts and billing\n\n### How is Nimbus Backup priced?")
    lisbon = _chunker(400, 40).chunk(SAMPLES["lisbon-weekend-guide.pdf"])
    assert ["A Weekend in Lisbon", "Where to eat", "Evening"] in [c.heading_path for c in lisbon]


def test_setext_headings_in_plain_text_and_preamble_without_heading() -> None:
    notes = _chunker(400, 40).chunk(SAMPLES["release-notes-2-4.txt"])
    assert [c.heading_path[-1] for c in notes] == [
        "Harbor Sync 2.4 release notes",
        "New features",
        "Changes",
        "Fixed issues",
        "Upgrade notes",
    ]
    (only,) = _chunker(400, 40).chunk("Just a paragraph.\n\nAnd another one.\n")
    assert only.heading_path == [] and only.text == "Just a paragraph.\n\nAnd another one."


def test_headings_inside_code_fences_are_not_headings() -> None:
    md = "# Real\n\n```bash\n# a comment, not a heading\necho hi\n```\n\nAfter the fence.\n"
    (chunk,) = _chunker(400, 40).chunk(md)
    assert chunk.heading_path == ["Real"]


def test_code_fences_and_tables_stay_whole_when_they_fit() -> None:
    runbook = SAMPLES["postgres-failover-runbook.md"]
    chunks = _chunker(64, 8).chunk(runbook)
    fences = [m.span() for m in re.finditer(r"```.*?\n```", runbook, re.DOTALL)]
    assert len(fences) == 3
    for start, end in fences:
        assert any(c.char_start <= start and end <= c.char_end for c in chunks), runbook[start:end]


def test_big_tables_split_between_rows_only() -> None:
    rows = "".join(f"| {i} | item number {i} | {i * 7} units in stock |\n" for i in range(60))
    md = "## Stock\n\n| id | name | stock |\n|---|---|---|\n" + rows
    chunks = _chunker(48, 12).chunk(md)
    assert len(chunks) > 5
    for chunk in chunks:
        table_lines = [line for line in chunk.text.split("\n") if line.startswith("|")]
        assert all(line.endswith("|") for line in table_lines), chunk.text
        assert chunk.text.split("\n")[0] in ("## Stock",) or chunk.text.startswith("| ")


def test_pages_come_from_the_page_markers() -> None:
    kafka = _chunker(64, 16).chunk(SAMPLES["kafka-consumer-groups.pdf"])
    assert [c.page for c in kafka] == sorted(c.page or 0 for c in kafka)
    assert {c.page for c in kafka} == {1, 2, 3, 4}
    sizing = [c for c in kafka if c.heading_path[-1] == "Sizing a group"]
    assert sizing and all(c.page == 4 for c in sizing)
    assert all(c.page is None for c in _chunker().chunk(SAMPLES["espresso-at-home.md"]))


def test_long_sentences_and_words_are_cut_as_a_last_resort() -> None:
    sentence = " ".join(f"word{i}" for i in range(400))  # one sentence, no punctuation
    blob = "x" * 3000 + "Y" * 3000  # one "word" with no spaces at all
    for md in (sentence, blob):
        chunks = _chunker(32, 0).chunk(md)
        _check_invariants(md, chunks, 32, 0)
        assert "".join(c.text for c in chunks).replace(" ", "") == md.replace(" ", "")
    overlapping = _chunker(32, 8).chunk(sentence)
    _check_invariants(sentence, overlapping, 32, 8)


def test_empty_input_gives_no_chunks() -> None:
    assert _chunker().chunk("") == []
    assert _chunker().chunk("\n\n  \n") == []


def test_deterministic() -> None:
    markdown = SAMPLES["pgvector-hnsw-indexes.pdf"]
    first = _chunker(48, 12).chunk(markdown)
    assert first == _chunker(48, 12).chunk(markdown) == _chunker(48, 12).chunk(markdown)


def test_version_names_algorithm_tokenizer_and_settings() -> None:
    base = _chunker(400, 40).version
    assert base == "md-1:cl100k_base:t400:o40"
    assert _chunker(400, 40).version == base
    assert len({base, _chunker(300, 40).version, _chunker(400, 0).version}) == 3


# -- in child processes, under chunk.* limits --------------------------------------------------


async def test_achunk_in_a_child_gives_what_chunk_gives() -> None:
    chunker = _chunker(64, 16)
    try:
        for name in ("kafka-consumer-groups.pdf", "espresso-at-home.md"):
            assert await chunker.achunk(SAMPLES[name]) == chunker.chunk(SAMPLES[name])
    finally:
        await chunker.aclose()


async def test_a_long_run_without_spaces_is_stopped_at_the_chunk_time_limit() -> None:
    # Cutting one space-less "word" into windows costs the square of its length: 256 KB of
    # it takes some 14 s, 1 MB minutes.
    run = "".join(random.Random(3).choices(string.ascii_letters, k=1024 * 1024))
    chunker = Chunker(ChunkSettings(timeout_s=1.0), TOKENIZER)
    try:
        started = time.monotonic()
        with pytest.raises(PermanentError) as info:
            await chunker.achunk(run)
        assert str(info.value) == (
            "chunking a document of 1048576 characters took longer than the limit "
            "chunk.timeout_s=1.0"
        )
        assert time.monotonic() - started < 1.0 + 1.5
        small = SAMPLES["espresso-at-home.md"]
        assert await chunker.achunk(small) == chunker.chunk(small)
    finally:
        await chunker.aclose()
