"""The bundled sample set: a dozen small documents on distinct topics in every supported format.

`sample_dir()` holds the files, and `manifest.json` beside it (not in it, so uploading the
directory uploads documents only) says per file what the generator made: content type,
SHA-256, pages, title and headings (and which file is an exact duplicate of which). `python -m ragstream.samples.generate` rebuilds them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict


class SampleInfo(TypedDict):
    filename: str
    content_type: str
    sha256: str
    bytes: int
    pages: int
    title: str | None
    headings: list[str]
    duplicate_of: str | None


def sample_dir() -> Path:
    """The directory of sample documents (inside the installed package)."""
    return Path(__file__).resolve().parent / "docs"


def sample_manifest() -> list[SampleInfo]:
    """What each sample file is, as the generator recorded it."""
    data: list[SampleInfo] = json.loads((sample_dir().parent / "manifest.json").read_text("utf-8"))
    return data
