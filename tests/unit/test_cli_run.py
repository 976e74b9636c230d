"""`ragstream.cli.common.run`: every command runs on uvloop, and errors become exit codes."""

from __future__ import annotations

import asyncio

import pytest
import typer
import uvloop

from ragstream.cli.common import run
from ragstream.errors import RagstreamError


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


async def _fails() -> None:
    raise RagstreamError("the broker said no")


def test_commands_run_on_uvloop() -> None:
    assert run(_loop_type) is uvloop.Loop


def test_a_ragstream_error_is_one_line_and_exit_code_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as raised:
        run(_fails)
    assert raised.value.exit_code == 1
    err = capsys.readouterr().err
    assert "the broker said no" in err
    assert len(err.strip().splitlines()) == 1
