"""--help speaks an operator's language: option placeholders are TEXT, N, PATH or a choice's
values, never a Python type (`<list[str]>`, `<bool>`), for every command of every group."""

from __future__ import annotations

import re
from collections.abc import Iterator

import typer.main
from typer.testing import CliRunner

from ragstream.cli import app

PYTHON_TYPE = re.compile(r"<(?:list\[|str|int|float|bool|Path|path)")


def _commands(group: object, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*prefix, name))


def test_no_help_shows_a_python_type_as_a_placeholder() -> None:
    runner = CliRunner()
    commands = list(_commands(typer.main.get_command(app)))
    assert ("dlq", "list") in commands and ("worker",) in commands
    for path in commands:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "160"})
        assert result.exit_code == 0, (path, result.output)
        assert not PYTHON_TYPE.search(result.output), (path, result.output)
    listing = runner.invoke(app, ["dlq", "list", "--help"], env={"COLUMNS": "160"}).output
    assert re.search(r"--limit\s+N \[x>=1\]", listing) and re.search(r"--since\s+TEXT", listing)
