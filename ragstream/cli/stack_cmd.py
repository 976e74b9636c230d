"""`ragstream stack up|down` and `ragstream demo`: the local stack without Docker."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ragstream.cli.common import console, fail, run, settings_or_exit
from ragstream.errors import RagstreamError

if TYPE_CHECKING:
    from ragstream.stack import StackInfo

app = typer.Typer(
    help="The local stack: Kafka broker, PostgreSQL + pgvector, workers.", no_args_is_help=True
)


def where_table(info: StackInfo) -> Table:
    table = Table(title="ragstream local stack", show_header=True)
    table.add_column("service")
    table.add_column("where")
    table.add_row(
        "kafka (KRaft)",
        info.kafka_bootstrap + ("  SASL_SSL, SCRAM-SHA-512, ACLs" if info.secure_env else ""),
    )
    table.add_row("postgresql + pgvector", info.postgres_dsn)
    table.add_row("data directory", info.data_dir)
    if info.workers_pid:
        table.add_row("worker all (supervisor)", f"pid {info.workers_pid}, log {info.workers_log}")
        for name, pid in sorted(info.worker_processes.items()):
            if name == "exporter":
                table.add_row("  exporter (the groups from outside)", f"pid {pid}")
                continue
            what = "cost accountant" if name == "cost" else f"{name} stage"
            table.add_row(f"  worker {name} ({what})", f"pid {pid}")
    if info.metrics_url:
        table.add_row("worker metrics / readiness", f"{info.metrics_url}  (/ready, /healthz)")
    if info.prometheus_url:
        table.add_row("prometheus (alerts at /alerts)", info.prometheus_url)
    return table


@app.command("up")
def up(
    workers: Annotated[
        bool, typer.Option(help="Also run every stage worker in the background.")
    ] = True,
    prometheus: Annotated[
        bool, typer.Option(help="Also run Debian's prometheus against the workers.")
    ] = False,
    secure: Annotated[
        bool,
        typer.Option(
            help="The broker on SASL_SSL (SCRAM-SHA-512, a CA of its own) with least-privilege "
            "ACLs; clients' settings in <data_dir>/secure.toml, passwords in secure.env."
        ),
    ] = False,
    brokers: Annotated[
        int | None,
        typer.Option(
            help="3: a 3-node KRaft cluster (topics replicated 3 times, min.insync.replicas 2); "
            "the data directory remembers. Default: what the data directory holds, else 1."
        ),
    ] = None,
) -> None:
    """Start whatever part of the stack is not running (broker, PostgreSQL, workers), create
    topics, migrate. Leaves them running."""
    from ragstream.stack import stack_up

    settings = settings_or_exit()
    with console.status(
        "starting the local stack (first start resolves Kafka's jars from Maven Central)"
    ):
        info = run(
            stack_up, settings, workers=workers, prometheus=prometheus, secure=secure,
            brokers=brokers,
        )  # fmt: skip
    console.print(where_table(info))
    if info.secure_env:
        console.print(
            f"secure broker: run commands as admin after `source {info.secure_env}`", soft_wrap=True
        )
    console.print(
        f"started: {', '.join(info.started) or 'nothing (already running)'}; "
        f"migrations applied: {', '.join(info.migrations) or 'none pending'}"
    )
    console.print("stop it with: ragstream stack down")


class Part(StrEnum):
    kafka = "kafka"
    postgres = "postgres"
    workers = "workers"
    prometheus = "prometheus"


@app.command("down")
def down(
    parts: Annotated[
        list[Part] | None,
        typer.Argument(help="Stop only these parts (default: everything). `up` restarts them."),
    ] = None,
    kill: Annotated[
        bool,
        typer.Option(
            "--kill",
            help="Stop as a crash would: SIGKILL (PostgreSQL: its immediate shutdown). "
            "Data is kept either way.",
        ),
    ] = False,
) -> None:
    """Stop the local stack, or some of its parts: workers and prometheus on SIGTERM, the
    broker by controlled shutdown, PostgreSQL by a fast shutdown. Their data stays."""
    from ragstream.stack import stack_down

    settings = settings_or_exit()
    named = [p.value for p in parts] if parts else None
    stopped = stack_down(settings, named, kill=kill)
    idle = [p for p in named or () if p not in stopped]
    line = f"stopped: {', '.join(stopped) or 'nothing was running'}"
    if stopped and idle:
        line += f"; not running: {', '.join(idle)}"
    console.print(line)


def demo(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the documents.")] = 300.0,
) -> None:
    """The main job: local stack, all workers, the bundled samples, a summary; stops what it started."""
    from ragstream.cli.demo import DEMO_QUESTION, hits_table, run_demo, summary_table

    settings = settings_or_exit(traced=True)
    report = run(run_demo, settings, console, timeout)
    console.print(summary_table(report))
    console.print(hits_table(report.hits, DEMO_QUESTION))
    stopped = ", ".join(report.stack.started) or "nothing (the stack was already running)"
    console.print(f"stopped what the demo started: {stopped}")
    if report.statuses.get("embedded", 0) + report.summary["duplicates"] < report.uploaded:
        raise typer.Exit(1)


KAFKA_TOOLS = ("consumer-groups", "topics", "get-offsets", "metadata-quorum", "configs")


@app.command(
    "kafka-tool",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def kafka_tool(
    ctx: typer.Context,
    tool: Annotated[str, typer.Argument(help=f"One of: {', '.join(KAFKA_TOOLS)}.")],
) -> None:
    """Run one of Kafka's own tools (same version as the broker) against kafka.bootstrap_servers.

    Example: ragstream stack kafka-tool consumer-groups --describe --all-groups
    """
    import subprocess
    import tempfile
    from pathlib import Path

    from ragstream.devstack import jars as kafka_jars
    from ragstream.kafka_clients import diagnose, java_client_properties

    mains = {
        "consumer-groups": kafka_jars.CONSUMER_GROUPS,
        "topics": kafka_jars.TOPICS,
        "get-offsets": kafka_jars.GET_OFFSETS,
        "metadata-quorum": kafka_jars.METADATA_QUORUM,
        "configs": kafka_jars.CONFIGS,
    }
    if tool not in mains:
        raise fail(f"unknown Kafka tool {tool!r}; choose one of {', '.join(KAFKA_TOOLS)}")
    settings = settings_or_exit()
    kafka = settings.kafka
    from ragstream.devstack.cluster import local_kafka as stack_kafka

    broker = stack_kafka(settings)
    with tempfile.TemporaryDirectory(prefix="ragstream-tool-") as tmp:
        args = ["--bootstrap-server", kafka.bootstrap_servers]
        if kafka.security_protocol != "PLAINTEXT":
            # Kafka's tools retry a refused login until they give up, then exit 0: say it first.
            refused = run(diagnose, kafka)
            if refused is not None:
                raise fail(str(refused))
            config = Path(tmp) / "client.properties"  # in a 0700 directory: it holds a password
            config.write_text(java_client_properties(kafka))
            args += ["--command-config", str(config)]
        try:
            cmd = broker.tool_command(mains[tool], [*args, *ctx.args])
        except RagstreamError as exc:
            raise fail(str(exc)) from None
        code = subprocess.run(cmd, check=False).returncode
    raise typer.Exit(code)
