"""`ragstream topics create|describe`."""

from __future__ import annotations

import typer
from rich.table import Table

from ragstream.admin import TopicState, describe_topics, ensure_topics
from ragstream.cli.common import console, run, settings_or_exit

app = typer.Typer(help="Create and inspect the Kafka topics.", no_args_is_help=True)


def topics_table(states: list[TopicState], title: str) -> Table:
    table = Table(title=title)
    for col in ("topic", "partitions", "replication", "cleanup.policy", "retention.ms"):
        table.add_column(col, justify="right" if col in ("partitions", "replication") else "left")
    with_action = any(s.action for s in states)
    if with_action:
        table.add_column("action")
    for s in states:
        row = [
            s.name,
            str(s.partitions),
            str(s.replication_factor),
            s.config.get("cleanup.policy", ""),
            s.config.get("retention.ms", ""),
        ]
        table.add_row(*row, *([s.action] if with_action else []))
    return table


@app.command("create")
def create() -> None:
    """Create every topic of the topology that is missing (idempotent)."""
    settings = settings_or_exit()
    states = run(ensure_topics, settings)
    console.print(topics_table(states, f"topics on {settings.kafka.bootstrap_servers}"))


@app.command("describe")
def describe() -> None:
    """Show the topology's topics as the broker sees them."""
    settings = settings_or_exit()
    states = run(describe_topics, settings)
    if not states:
        console.print(
            f"no ragstream topics with prefix {settings.kafka.topic_prefix!r} on "
            f"{settings.kafka.bootstrap_servers}; run `ragstream topics create`"
        )
        raise typer.Exit(1)
    console.print(topics_table(states, f"topics on {settings.kafka.bootstrap_servers}"))
