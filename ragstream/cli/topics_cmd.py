"""`ragstream topics create|describe|scale`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ragstream.admin import ScaleResult, TopicState, describe_topics, ensure_topics, scale_topic
from ragstream.cli.common import console, run, settings_or_exit
from ragstream.settings import Settings
from ragstream.topology import Stage, Topology

app = typer.Typer(help="Create, inspect and grow the Kafka topics.", no_args_is_help=True)


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


@app.command("scale")
def scale(
    topic: Annotated[
        str,
        typer.Argument(
            help="A stage (parse | chunk | embed: the topic its group reads) or a topic name."
        ),
    ],
    partitions: Annotated[
        int, typer.Option("--partitions", "-p", min=1, help="The new partition count (more).")
    ],
) -> None:
    """Add partitions to a topic, so its consumer group can run more members. Only grows."""
    settings = settings_or_exit()
    result = run(scale_topic, settings, topic, partitions)
    console.print(f"{result.topic}: {result.before} -> {result.after} partitions")
    for line in scale_notes(settings, result):
        console.print(line, highlight=False)


def scale_notes(settings: Settings, result: ScaleResult) -> list[str]:
    """What changes for the topic's keys, order and consumers."""
    topology = Topology(settings.kafka.topic_prefix)
    readers = [s for s in Stage if topology.input_topic(s) == result.topic]
    notes = [
        f"[yellow]warning:[/] keys move. A key's partition is murmur2(key) mod the partition "
        f"count, so about {result.keys_moved:.0%} of keys (document ids) now map to another "
        "partition. Records already written stay where they are.",
        "Per-document order holds among the records written before the change and among those "
        "written after it, not across: while a document's older records still wait on its old "
        "partition, a newer one on its new partition can be handled first. Let the topic drain "
        "(`ragstream status` shows its lag) before growing it where that matters.",
        f"Running clients see the new partitions within kafka.metadata_max_age_ms "
        f"({settings.kafka.metadata_max_age_ms} ms); the group then rebalances and reads the "
        "new partitions from their earliest offset, so nothing written to them is skipped.",
    ]
    for stage in readers:
        notes.append(
            f"Group {topology.group(stage)} can now run up to {result.after} members "
            f"(`ragstream worker {stage.value}` in more processes)."
        )
    return notes
