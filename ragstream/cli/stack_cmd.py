"""`ragstream stack up|down` and `ragstream demo`: the local stack without Docker."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table

from ragstream.cli.common import console, run, settings_or_exit
from ragstream.cli.topics_cmd import topics_table

if TYPE_CHECKING:
    from ragstream.stack import StackInfo

app = typer.Typer(
    help="The local stack: Kafka broker, PostgreSQL + pgvector, workers.", no_args_is_help=True
)


def where_table(info: StackInfo) -> Table:
    table = Table(title="ragstream local stack", show_header=True)
    table.add_column("service")
    table.add_column("where")
    table.add_row("kafka (KRaft)", info.kafka_bootstrap)
    table.add_row("postgresql + pgvector", info.postgres_dsn)
    table.add_row("data directory", info.data_dir)
    return table


@app.command("up")
def up() -> None:
    """Start the broker and PostgreSQL (if not running), create topics, migrate. Leaves them running."""
    from ragstream.stack import stack_up

    settings = settings_or_exit()
    with console.status(
        "starting the local stack (first start resolves Kafka's jars from Maven Central)"
    ):
        info = run(stack_up, settings)
    console.print(where_table(info))
    console.print(
        f"started: {', '.join(info.started) or 'nothing (already running)'}; "
        f"migrations applied: {', '.join(info.migrations) or 'none pending'}"
    )
    console.print("stop it with: ragstream stack down")


@app.command("down")
def down() -> None:
    """Stop the local broker and PostgreSQL."""
    from ragstream.stack import stack_down

    settings = settings_or_exit()
    stopped = stack_down(settings)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def demo() -> None:
    """The main job: local stack, every topic, and a summary; stops what it started."""
    from ragstream.stack import stack_down, stack_up

    settings = settings_or_exit()
    with console.status("starting the local stack"):
        info = run(stack_up, settings)
    try:
        console.print(where_table(info))
        console.print(topics_table(info.topics, "topics"))
    finally:
        stack_down(settings, only=info.started)
