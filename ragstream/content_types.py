"""What kind of document a file is, and its text: content types by magic bytes, extension or a
look at the bytes, and bytes decoded whatever their charset. Pure functions, shared by the
uploader, the door's validation and the local parser.
"""

from __future__ import annotations

import re
from typing import Final

from ragstream.errors import PermanentError

PDF: Final = "application/pdf"
MARKDOWN: Final = "text/markdown"
HTML: Final = "text/html"
TEXT: Final = "text/plain"
SUPPORTED_CONTENT_TYPES: Final = frozenset({PDF, MARKDOWN, HTML, TEXT})

_EXTENSIONS: Final = {
    ".pdf": PDF,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".mdown": MARKDOWN,
    ".html": HTML,
    ".htm": HTML,
    ".xhtml": HTML,
    ".txt": TEXT,
    ".text": TEXT,
}
_ALIASES: Final = {"text/x-markdown": MARKDOWN, "application/xhtml+xml": HTML}
_HTML_SNIFF: Final = re.compile(rb"<(!doctype\s+html|html[\s>]|head[\s>]|body[\s>])", re.IGNORECASE)


def detect_content_type(filename: str, data: bytes) -> str:
    """Content type by magic bytes, then extension, then a look at the bytes."""
    head = data[:1024]
    if b"%PDF-" in head:
        return PDF
    dot = filename.rfind(".")
    by_extension = _EXTENSIONS.get(filename[dot:].lower()) if dot >= 0 else None
    if by_extension is not None:
        return by_extension
    if _HTML_SNIFF.search(head.lstrip()[:256]):
        return HTML
    if data and b"\x00" not in head and _looks_like_text(head):
        return TEXT
    raise PermanentError(
        f"unsupported content type: cannot read {filename!r} as PDF, Markdown, HTML or text"
    )


def normalize_content_type(content_type: str) -> str:
    """`Text/HTML; charset=utf-8` -> `text/html`; known aliases folded."""
    base = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def charset_param(content_type: str) -> str | None:
    """The `charset` parameter of a content type, if it has one."""
    match = re.search(r"charset\s*=\s*\"?([\w.:-]+)", content_type, re.IGNORECASE)
    return match.group(1) if match else None


def decode_text(data: bytes, charset: str | None = None) -> str:
    """Bytes -> str: BOM, declared charset, UTF-8, then cp1252, then latin-1 (never fails)."""
    for bom, codec in (
        (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"),
    ):
        if data.startswith(bom):
            return data.decode(codec, errors="replace")
    for candidate in (charset, "utf-8", "cp1252"):
        if candidate:
            try:
                return data.decode(candidate)
            except (UnicodeDecodeError, LookupError):
                continue
    return data.decode("latin-1")


def _looks_like_text(head: bytes) -> bool:
    sample = head.decode("utf-8", errors="ignore") or head.decode("latin-1")
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in sample)
    return printable >= 0.95 * len(sample)
