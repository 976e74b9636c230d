"""The local parser: every sample parses right; broken, empty and oversized input is permanent."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import re
import time

import pypdf
import pytest
from fpdf import FPDF
from PIL import Image
from pydantic import ValidationError

from ragstream.content_types import (
    SUPPORTED_CONTENT_TYPES,
    decode_text,
    detect_content_type,
    normalize_content_type,
)
from ragstream.errors import PermanentError
from ragstream.providers.parse.local import LocalParser
from ragstream.providers.parse.port import ParseResult, page_marker
from ragstream.samples import SampleInfo, sample_dir, sample_manifest
from ragstream.settings import ParseSettings
from tests.hostile import burning, cpu_bomb_pdf, cpu_seconds, descendants, memory_bomb_text
from tests.unit.test_isolation import _until

MANIFEST = sample_manifest()


def _parser(**limits: float) -> LocalParser:
    return LocalParser(ParseSettings(**limits))


def _bytes(name: str) -> bytes:
    return (sample_dir() / name).read_bytes()


def _pdf(*pages: str, user_password: str | None = None) -> bytes:
    pdf = FPDF()
    pdf.set_creation_date(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    if user_password is not None:
        pdf.set_encryption(owner_password="owner-secret", user_password=user_password)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.set_font("Helvetica", "", 11)
            pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
        else:
            pdf.rect(20, 20, 50, 50)  # a drawing, no text
    return bytes(pdf.output())


def test_sample_set_is_complete_and_small() -> None:
    kinds = [entry["content_type"] for entry in MANIFEST if not entry["duplicate_of"]]
    assert kinds.count("application/pdf") >= 3
    assert kinds.count("text/markdown") >= 3
    assert kinds.count("text/html") >= 3
    assert kinds.count("text/plain") >= 2
    assert sum(entry["bytes"] for entry in MANIFEST) < 300_000
    (duplicate,) = [entry for entry in MANIFEST if entry["duplicate_of"]]
    assert _bytes(duplicate["filename"]) == _bytes(str(duplicate["duplicate_of"]))
    assert duplicate["filename"] != duplicate["duplicate_of"]
    on_disk = {p.name for p in sample_dir().iterdir()} - {"manifest.json"}
    assert on_disk == {entry["filename"] for entry in MANIFEST}


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["filename"] for e in MANIFEST])
async def test_each_sample_parses_with_its_pages_title_and_headings(entry: SampleInfo) -> None:
    data = _bytes(entry["filename"])
    assert detect_content_type(entry["filename"], data) == entry["content_type"]
    result = await _parser().parse(
        data, filename=entry["filename"], content_type=entry["content_type"]
    )
    assert isinstance(result, ParseResult)
    assert (result.parser, result.parser_version) == ("local", "local-1")
    assert result.page_count == entry["pages"]
    assert len(result.pages) == entry["pages"]
    assert result.title == entry["title"]
    assert re.findall(r"^#{1,6} (.+)$", result.markdown, re.MULTILINE) == entry["headings"]
    assert "\r" not in result.markdown and "\x00" not in result.markdown
    if entry["content_type"] == "application/pdf":
        markers = [page_marker(n) for n in range(1, entry["pages"] + 1)]
        assert [m for m in markers if m in result.markdown] == markers
        assert all(page.strip() for page in result.pages)


async def test_pdf_pages_hold_their_own_sections() -> None:
    result = await _parser().parse(
        _bytes("kafka-consumer-groups.pdf"), filename="k.pdf", content_type="application/pdf"
    )
    assert result.page_count == 4
    assert result.pages[0].startswith("# Kafka Consumer Groups in Practice")
    assert "## Rebalancing without stopping the world" in result.pages[1]
    assert "## Sizing a group" in result.pages[3]
    assert "- Order is guaranteed within a partition" in result.pages[0]
    assert "\n\nThe classic assignors are range" in result.pages[0]  # paragraph gap kept


async def test_html_keeps_structure_and_drops_scripts_styles_and_nav() -> None:
    result = await _parser().parse(
        _bytes("solar-panel-buyers-guide.html"), filename="s.html", content_type="text/html"
    )
    md = result.markdown
    assert md.startswith("# Buying Solar Panels for Your Home\n")
    assert "| Type | Typical efficiency | Price per watt | Best for |" in md
    assert "| Monocrystalline | 20\u201323% | \u20ac0.35 |" in md
    assert "- Microinverters sit behind each panel" in md
    for dropped in ("tracking code", "window.analytics", "font-family", "Subscribe"):
        assert dropped not in md


async def test_plain_text_in_latin1_decodes() -> None:
    data = _bytes("houseplant-care.txt")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    result = await _parser().parse(data, filename="h.txt", content_type="text/plain")
    assert "between 18 and 27 °C" in result.markdown
    assert (result.page_count, result.title) == (1, None)


def test_decode_text_fallbacks() -> None:
    assert decode_text("café".encode()) == "café"
    assert decode_text(b"\xef\xbb\xbfBOM") == "BOM"
    assert decode_text("naïve".encode("utf-16")) == "naïve"
    assert decode_text(b"\x93quoted\x94") == "\u201cquoted\u201d"  # cp1252
    assert decode_text(b"\x81\x8d") == "\x81\x8d"  # not cp1252 either: latin-1 never fails
    assert decode_text("€".encode("iso-8859-15"), "iso-8859-15") == "€"


async def test_newlines_and_nuls_are_normalised() -> None:
    result = await _parser().parse(
        b"# T\r\n\r\nline one\rline two\x00\n\n\n\n", filename="x.md", content_type="text/markdown"
    )
    assert result.markdown == "# T\n\nline one\nline two\n"
    assert result.title == "T"


def test_content_type_detection() -> None:
    pdf = _bytes("sourdough-country-loaf.pdf")
    assert detect_content_type("upload.bin", pdf) == "application/pdf"  # magic beats name
    assert detect_content_type("notes.MD", b"# hi") == "text/markdown"
    assert detect_content_type("page.htm", b"<p>x</p>") == "text/html"
    assert detect_content_type("page", b"  <!DOCTYPE html><html><p>x</p>") == "text/html"
    assert detect_content_type("README", b"just some words\n") == "text/plain"
    assert detect_content_type("a.txt", b"words") == "text/plain"
    assert SUPPORTED_CONTENT_TYPES == {
        "application/pdf",
        "text/markdown",
        "text/html",
        "text/plain",
    }
    for name, data in [
        ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
        ("sheet.xlsx", b"PK\x03\x04\x14\x00\x06\x00"),
        ("empty", b""),
    ]:
        with pytest.raises(PermanentError, match="unsupported content type"):
            detect_content_type(name, data)


async def test_content_type_parameters_aliases_and_unknowns() -> None:
    assert normalize_content_type("Text/HTML; charset=UTF-8") == "text/html"
    assert normalize_content_type("text/x-markdown") == "text/markdown"
    parser = _parser()
    result = await parser.parse(
        "<h1>Überblick</h1>".encode("utf-16"),
        filename="u",
        content_type="text/html; charset=utf-16",
    )
    assert result.markdown == "# Überblick\n"
    with pytest.raises(PermanentError, match="corrupt PDF"):  # sniffed as PDF by its magic
        await parser.parse(b"%PDF-broken", filename="x", content_type="application/octet-stream")


async def test_octet_stream_is_sniffed() -> None:
    result = await _parser().parse(
        _bytes("lisbon-weekend-guide.pdf"), filename="blob", content_type="application/octet-stream"
    )
    assert result.page_count == 3
    with pytest.raises(PermanentError, match="unsupported content type 'application/msword'"):
        await _parser().parse(b"x", filename="a.doc", content_type="application/msword")


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.7\n this is not really a PDF at all \x00\x01\x02",
        b"not even the header",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
    ],
)
async def test_corrupt_pdf_is_permanent(data: bytes) -> None:
    with pytest.raises(PermanentError, match="corrupt PDF"):
        await _parser().parse(data, filename="broken.pdf", content_type="application/pdf")


async def test_encrypted_pdf_needs_a_password_but_owner_only_encryption_reads() -> None:
    with pytest.raises(PermanentError, match="encrypted PDF"):
        await _parser().parse(
            _pdf("secret plans", user_password="letmein"),
            filename="locked.pdf",
            content_type="application/pdf",
        )
    result = await _parser().parse(
        _pdf("readable text", user_password=""),
        filename="owner.pdf",
        content_type="application/pdf",
    )
    assert "readable text" in result.markdown


async def test_pdf_without_text_is_permanent() -> None:
    with pytest.raises(PermanentError, match="no extractable text"):
        await _parser().parse(_pdf("", ""), filename="scan.pdf", content_type="application/pdf")


@pytest.mark.parametrize(
    "html",
    [
        b"<html><head><title>Only a title</title><script>var a = 1;</script></head>"
        b"<body><nav>Home | About</nav><div>   </div><style>p{}</style></body></html>",
        b"",
        b"<p>\n\n</p>",
    ],
)
async def test_html_without_text_is_permanent(html: bytes) -> None:
    with pytest.raises(PermanentError, match="no text content"):
        await _parser().parse(html, filename="empty.html", content_type="text/html")


async def test_empty_text_is_permanent() -> None:
    with pytest.raises(PermanentError, match="no text content"):
        await _parser().parse(b" \n\r\n\t", filename="e.txt", content_type="text/plain")


async def test_size_limit_names_the_limit() -> None:
    data = _bytes("espresso-at-home.md")
    with pytest.raises(PermanentError, match=r"parse\.max_bytes=1000") as info:
        await _parser(max_bytes=1000).parse(data, filename="e.md", content_type="text/markdown")
    assert str(len(data)) in str(info.value)
    ok = await _parser(max_bytes=len(data)).parse(
        data, filename="e.md", content_type="text/markdown"
    )
    assert ok.page_count == 1


async def test_page_limit_names_the_limit() -> None:
    data = _bytes("kafka-consumer-groups.pdf")
    with pytest.raises(PermanentError, match=r"4 pages, over the limit parse\.max_pages=3"):
        await _parser(max_pages=3).parse(data, filename="k.pdf", content_type="application/pdf")
    ok = await _parser(max_pages=4).parse(data, filename="k.pdf", content_type="application/pdf")
    assert ok.page_count == 4


async def test_time_limit_names_the_limit() -> None:
    html = ("<html><body>" + "<p>word " * 20_000 + "</body></html>").encode()
    with pytest.raises(PermanentError, match=r"parse\.timeout_s=0\.001"):
        await _parser(timeout_s=0.001).parse(html, filename="big.html", content_type="text/html")


# -- limits: parsing runs in child processes that are killed ------------------------------------

MARKDOWN_DOC = b"# Still here\n\nThe pool parses on.\n"


async def _parses_small_files_at_once(parser: LocalParser) -> None:
    started = time.monotonic()
    result = await parser.parse(MARKDOWN_DOC, filename="ok.md", content_type="text/markdown")
    assert result.title == "Still here"
    assert time.monotonic() - started < 1.0


async def test_a_cpu_bomb_is_killed_at_the_wall_clock_limit_while_other_files_go_on() -> None:
    parser = _parser(timeout_s=1.5, cpu_s=60, workers=2)
    try:
        await _parses_small_files_at_once(parser)  # the pool is warm
        idle = {pid: cpu_seconds(pid) for pid in descendants(os.getpid())}
        started = time.monotonic()
        bomb = asyncio.create_task(
            parser.parse(cpu_bomb_pdf(), filename="x.pdf", content_type="application/pdf")
        )
        await _until(lambda: burning(descendants(os.getpid()), idle), 1.5, "the bomb parsing")
        await _parses_small_files_at_once(parser)  # in the other process, while the bomb runs
        assert not bomb.done()
        with pytest.raises(PermanentError) as info:
            await bomb
        assert str(info.value) == "parsing 'x.pdf' took longer than the limit parse.timeout_s=1.5"
        assert time.monotonic() - started < 1.5 + 1.5
        await _parses_small_files_at_once(parser)  # its process was replaced
    finally:
        await parser.aclose()


async def test_a_cpu_bomb_is_killed_at_the_cpu_limit() -> None:
    parser = _parser(timeout_s=60, cpu_s=1, workers=1)
    try:
        started = time.monotonic()
        with pytest.raises(PermanentError) as info:
            await parser.parse(cpu_bomb_pdf(), filename="x.pdf", content_type="application/pdf")
        assert str(info.value) == (
            "parsing 'x.pdf' used more than the limit parse.cpu_s=1 of CPU time"
        )
        assert time.monotonic() - started < 10
        await _parses_small_files_at_once(parser)
    finally:
        await parser.aclose()


async def test_a_memory_bomb_stops_at_the_memory_limit() -> None:
    parser = _parser(memory_mb=256, workers=1)
    try:
        with pytest.raises(PermanentError) as info:
            await parser.parse(memory_bomb_text(12), filename="m.txt", content_type="text/plain")
        assert str(info.value) == (
            "parsing 'm.txt' needed more memory than the limit parse.memory_mb=256"
        )
        await _parses_small_files_at_once(parser)
        # The limit stopped it, not the file: under a higher one the same file parses.
        roomy = _parser(memory_mb=2048, workers=1)
        try:
            result = await roomy.parse(
                memory_bomb_text(12), filename="m.txt", content_type="text/plain"
            )
            assert result.markdown.startswith("ab\nab\n")
        finally:
            await roomy.aclose()
    finally:
        await parser.aclose()


@pytest.mark.parametrize(
    ("key", "value"),
    [("cpu_s", 0), ("memory_mb", 64), ("workers", 0), ("workers", 65), ("timeout_s", 0)],
)
def test_child_limits_are_validated(key: str, value: int) -> None:
    with pytest.raises(ValidationError, match=key):
        ParseSettings(**{key: value})


# -- a real-world PDF set: encrypted, image-only, odd metadata, wrapped paragraphs --------------


def _rewritten(
    data: bytes,
    *,
    algorithm: str | None = None,
    user_password: str = "",
    title: str | None = None,
) -> bytes:
    """The PDF through pypdf's writer: a title in its metadata, encrypted with `algorithm`."""
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(data))
    if title is not None:
        writer.add_metadata({"/Title": title})
    if algorithm is not None:
        writer.encrypt(user_password=user_password, owner_password="owner", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _image_only_pdf() -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.image(Image.new("RGB", (200, 100), "gray"), x=20, y=20, w=100)
    return bytes(pdf.output())


TEXT = "Consumer groups spread partitions across their members."

PDF_SET: dict[str, tuple[bytes, str | None]] = {
    # name: (bytes, None when it parses, else the start of the reason it is refused)
    "plain": (_pdf(TEXT), None),
    "rc4-128, empty user password": (_rewritten(_pdf(TEXT), algorithm="RC4-128"), None),
    "aes-128, empty user password": (_rewritten(_pdf(TEXT), algorithm="AES-128"), None),
    "aes-256, empty user password": (_rewritten(_pdf(TEXT), algorithm="AES-256"), None),
    "rc4-128, user password": (
        _rewritten(_pdf(TEXT), algorithm="RC4-128", user_password="letmein"),
        "encrypted PDF: a password is needed to read it",
    ),
    "aes-256, user password": (
        _rewritten(_pdf(TEXT), algorithm="AES-256", user_password="letmein"),
        "encrypted PDF: a password is needed to read it",
    ),
    "image only": (_image_only_pdf(), "PDF has no extractable text (scanned pages need OCR)"),
    "NUL in the title": (_rewritten(_pdf(TEXT), title="Quarterly\x00 report"), None),
    "aes-256, NUL in the title": (
        _rewritten(_pdf(TEXT), algorithm="AES-256", title="Quarterly\x00 report"),
        None,
    ),
}


@pytest.mark.parametrize("name", list(PDF_SET))
async def test_real_world_pdf_set_parses_or_is_refused_with_its_reason(name: str) -> None:
    data, refusal = PDF_SET[name]
    parse = _parser().parse(data, filename=f"{name}.pdf", content_type="application/pdf")
    if refusal is not None:
        with pytest.raises(PermanentError) as caught:
            await parse
        assert str(caught.value).startswith(refusal), caught.value
        return
    result = await parse
    assert TEXT in " ".join(result.markdown.split())
    fields = [result.markdown, result.title or "", *result.pages]
    assert not any("\x00" in f for f in fields)
    if "title" in name:
        assert result.title == "Quarterly report"


def _wrapped_paragraphs_pdf() -> bytes:
    """A title, an introduction set larger than the body (long lines that wrap), a section
    heading, and body paragraphs."""
    sentence = "Records of one key stay in order on one partition, and a group spreads them. "
    pdf = FPDF()
    pdf.add_page()

    def heading(size: int, text: str) -> None:
        pdf.set_font("Helvetica", size=size)
        pdf.cell(0, size * 0.6, text, new_x="LMARGIN", new_y="NEXT")

    heading(18, "Consumer groups")
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 6, "In short: " + sentence * 6)
    pdf.ln(3)
    heading(14, "Partitions")
    pdf.set_font("Helvetica", size=10)
    for i in range(3):
        pdf.multi_cell(0, 5, f"Paragraph {i}. " + sentence * 5)
        pdf.ln(3)
    return bytes(pdf.output())


async def test_wrapped_lines_in_a_larger_font_stay_a_paragraph() -> None:
    result = await _parser().parse(
        _wrapped_paragraphs_pdf(), filename="wrapped.pdf", content_type="application/pdf"
    )
    headings = [line for line in result.markdown.splitlines() if line.startswith("#")]
    assert headings == ["# Consumer groups", "## Partitions"], result.markdown
    assert "In short: Records of one key" in result.markdown
