"""ARCHITECTURE.md names real places: every path it shows in backticks exists, so the map
cannot drift from the code when modules move."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `consumers/runtime.py`, `ragstream/dlq/`, `parse/{port,local}.py` (under ragstream/providers)
PATH = re.compile(r"`([\w./]+(?:\{[\w,]+\})?(?:\.py|\.toml|\.md|/))`")
BASES = (ROOT, ROOT / "ragstream", ROOT / "ragstream" / "providers")


def _expand(token: str) -> list[str]:
    match = re.search(r"\{([\w,]+)\}", token)
    if not match:
        return [token]
    return [token.replace(match.group(0), part) for part in match.group(1).split(",")]


def test_every_path_architecture_md_names_exists() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = [p for token in PATH.findall(text) for p in _expand(token)]
    assert len(named) > 40  # the map names the modules, not a handful
    missing = [p for p in named if not any((base / p).exists() for base in BASES)]
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_consumers_module_is_on_the_map() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    modules = sorted(p.name for p in (ROOT / "consumers").glob("*.py") if p.name != "__init__.py")
    absent = [m for m in modules if f"consumers/{m}" not in text]
    assert not absent, f"consumer modules ARCHITECTURE.md does not place: {absent}"
