"""The `ragstream` command: parse arguments, build settings, call an async function.

Every operator-facing failure is a RagstreamError: it prints one clear line and exits non-zero,
never a stack trace.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ragstream.cli import (
    backup_cmd,
    config_cmd,
    cost_cmd,
    dlq_cmd,
    pipeline_cmd,
    replay_cmd,
    rollback_cmd,
    services_cmd,
    stack_cmd,
    status_cmd,
    topics_cmd,
)
from ragstream.cli.common import EXIT_CONFIG, EXIT_FAILURE, err_console
from ragstream.errors import ConfigError, RagstreamError

app = typer.Typer(
    name="ragstream",
    help="Documents to embedded, searchable chunks, as a stream over Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version as installed

        typer.echo(f"ragstream {installed('ragstream')}")
        raise typer.Exit(0)


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Extra TOML file over the defaults (RAGSTREAM_CONFIG)."
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print ragstream's version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    if config is not None:
        os.environ["RAGSTREAM_CONFIG"] = str(config)


app.add_typer(config_cmd.app, name="config")
app.add_typer(topics_cmd.app, name="topics")
app.add_typer(services_cmd.app, name="services")
app.add_typer(stack_cmd.app, name="stack")
app.command("demo")(stack_cmd.demo)
app.command("worker")(pipeline_cmd.worker)
app.command("upload")(pipeline_cmd.upload)
app.command("doc")(pipeline_cmd.doc)
app.command("search")(pipeline_cmd.search)
app.add_typer(pipeline_cmd.db_app, name="db")
app.add_typer(dlq_cmd.app, name="dlq")
app.command("replay")(replay_cmd.replay)
app.add_typer(rollback_cmd.app, name="rollback")
app.command("status")(status_cmd.status)
app.command("exporter")(status_cmd.exporter)
app.add_typer(cost_cmd.app, name="cost")
app.command("backup")(backup_cmd.backup)
app.command("restore")(backup_cmd.restore)
app.command("prune")(backup_cmd.prune)


def main() -> None:
    try:
        app()
    except RagstreamError as exc:  # raised outside run(), e.g. while building an argument
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE)
