"""The layers hold: the core package (`ragstream/`) never imports `consumers` or `producers`
(only its CLI, the composition root, puts them together), producers and consumers never import
each other, and no stage probes its providers with `getattr`: what a provider offers is declared
on its port."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragstream.providers.embed.port import Embedder, EmbedResult
from ragstream.providers.parse.port import Parser, ParseResult

ROOT = Path(__file__).resolve().parents[2]
CORE, CLI = ROOT / "ragstream", ROOT / "ragstream" / "cli"
SIDES = ("consumers", "producers")


def modules(package: Path) -> Iterator[Path]:
    yield from sorted(package.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """Every module an import statement in `path` names (lazy imports in functions too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def top(name: str) -> str:
    return name.split(".", 1)[0]


def test_the_walk_sees_the_whole_tree() -> None:
    core = {module_name(p) for p in modules(CORE)}
    assert {"ragstream.cli", "ragstream.cli.pipeline_cmd", "ragstream.control"} <= core
    assert any(top(name) == "consumers" for _, name in imported(CLI / "pipeline_cmd.py"))


def test_only_the_cli_imports_consumers_or_producers() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in modules(CORE)
        if not path.is_relative_to(CLI)
        for line, name in imported(path)
        if top(name) in SIDES
    ]
    assert offenders == []


def test_no_stage_module_is_imported_by_the_core_outside_the_cli() -> None:
    side_modules = {module_name(p) for side in SIDES for p in modules(ROOT / side)}
    assert "consumers.worker" in side_modules and "producers.upload" in side_modules
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in modules(CORE)
        if not path.is_relative_to(CLI)
        for line, name in imported(path)
        if name in side_modules
    ]
    assert offenders == []


@pytest.mark.parametrize(("side", "other"), [SIDES, SIDES[::-1]])
def test_producers_and_consumers_never_import_each_other(side: str, other: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in modules(ROOT / side)
        for line, name in imported(path)
        if top(name) == other
    ]
    assert offenders == []


def port_members() -> set[str]:
    """What the parse and embed ports and their results declare."""
    names = {n for port in (Parser, Embedder) for n in vars(port) if not n.startswith("_")}
    for result in (ParseResult, EmbedResult):
        names |= {f.name for f in dataclasses.fields(result)}
    return names


def test_no_getattr_probes_of_providers_in_consumers() -> None:
    members = port_members()
    assert {"current", "aclose", "name", "provider", "model"} <= members
    probes = []
    for path in modules(ROOT / "consumers"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
            ):
                continue
            attribute = node.args[1]
            probed = attribute.value if isinstance(attribute, ast.Constant) else None
            if probed in members:
                probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id} {probed!r}")
    assert probes == []
