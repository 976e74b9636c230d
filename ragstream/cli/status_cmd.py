"""`ragstream status [--group G] [--watch] [--json]`: groups, lag, throughput, DLQ, services."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from ragstream.admin import Member
from ragstream.cli.common import console, run, settings_or_exit
from ragstream.cost.budget import usd
from ragstream.settings import Settings
from ragstream.status import (
    GroupSpec,
    GroupStatus,
    ServiceStatus,
    Status,
    StatusReader,
    read_status,
    resolve_groups,
)
from ragstream.topology import Topology


def status(
    group: Annotated[
        list[str],
        typer.Option(
            "--group", "-g", help="Only this group: parse, chunk, embed or cost (repeatable)."
        ),
    ] = [],  # noqa: B006
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", "-n", min=0.5, help="Seconds between refreshes.")
    ] = 2.0,
    sample: Annotated[
        float,
        typer.Option(
            min=0,
            help="Without --watch: seconds between the two samples of committed offsets that "
            "give records/s (0: one sample, no rate).",
        ),
    ] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON (one object per refresh).")] = False,
    partitions: Annotated[
        bool, typer.Option("--partitions", help="Also a row per partition (its offsets and lag).")
    ] = False,
) -> None:
    """Per consumer group: members and their partitions, lag, records/s; the DLQ's depth; per
    paid service: mode, circuit, throttle state and spend against budget."""
    settings = settings_or_exit()
    if watch:
        run(_watch, settings, group, interval, as_json, partitions)
        return
    result = run(read_status, settings, group, sample_s=sample)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        console.print(render(result, partitions=partitions))


async def _watch(
    settings: Settings, names: list[str], interval: float, as_json: bool, partitions: bool
) -> None:
    specs: list[GroupSpec] = resolve_groups(Topology(settings.kafka.topic_prefix), names)
    async with StatusReader(settings, specs) as reader:
        previous = await reader.sample()
        await asyncio.sleep(min(interval, 1.0))
        current, previous = await reader.snapshot(previous)
        if as_json:
            while True:
                print(json.dumps(current.to_json()), flush=True)
                await asyncio.sleep(interval)
                current, previous = await reader.snapshot(previous)
        else:
            shown = render(current, partitions=partitions)
            with Live(shown, console=console, refresh_per_second=4) as live:
                while True:
                    await asyncio.sleep(interval)
                    current, previous = await reader.snapshot(previous)
                    live.update(render(current, partitions=partitions))


# -- rendering ---------------------------------------------------------------------------------


def render(status: Status, *, partitions: bool = False) -> Group:
    """The status as tables: groups, members, the DLQ, paid services; with `partitions`, a row
    per partition too."""
    rate_note = (
        f"records/s over {status.sample_s:.1f}s" if status.sample_s else "records/s not sampled"
    )
    title = (
        f"{status.prefix} on {status.bootstrap} at {status.taken_at:%Y-%m-%d %H:%M:%S} UTC "
        f"({rate_note})"
    )
    dlq = (
        f"dead letters: {status.dlq_depth} in {status.dlq_topic}"
        if status.dlq_depth is not None
        else f"dead letters: no topic {status.dlq_topic}"
    )
    parts: list[Table | str] = [_groups_table(status, title), _members_table(status)]
    if partitions:
        parts.append(_partitions_table(status))
    parts.append(dlq)
    if status.under_replicated:
        shown = ", ".join(
            f"{t}[{p}] {isr}/{n} in sync" for t, p, isr, n in status.under_replicated[:6]
        )
        more = len(status.under_replicated) - 6
        parts.append(
            f"under-replicated partitions: {len(status.under_replicated)} ({shown}"
            + (f", +{more} more)" if more > 0 else ")")
        )
    if status.services:
        parts.append(_services_table(status.services))
    return Group(*parts)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _groups_table(status: Status, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("group", "state", "members", "partitions", "lag", "records/s"):
        table.add_column(col, justify="left" if col in ("group", "state") else "right")
    for g in status.groups:
        table.add_row(
            g.group_id,
            "no such group" if g.state == "Dead" else g.state,
            str(len(g.members)),
            str(sum(p.topic == g.topics[0] for p in g.partitions)),  # its input topic's
            f"{g.lag:,}",
            _rate(g.records_per_s),
        )
    return table


def _labels(group: GroupStatus) -> dict[str, str]:
    """A short name per member: its client id, with the end of its member id when shared."""
    counts = Counter(m.client_id for m in group.members)
    return {
        m.member_id: m.client_id
        if counts[m.client_id] == 1
        else f"{m.client_id}#{m.member_id[-6:]}"
        for m in group.members
    }


def _short(topic: str, prefix: str) -> str:
    """`uploaded`, `retry.parse`, `cost.usage`: the topic without prefix and `documents.`."""
    return topic.removeprefix(f"{prefix}.").removeprefix("documents.")


def _held(member: Member, prefix: str) -> str:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in member.partitions:
        by_topic.setdefault(_short(topic, prefix), []).append(partition)
    return "  ".join(f"{t}:{','.join(map(str, ps))}" for t, ps in by_topic.items()) or "-"


def _members_table(status: Status) -> Table:
    table = Table(title="members", title_justify="left")
    for col in ("group", "member (client id)", "host", "partitions held", "lag"):
        table.add_column(col, justify="right" if col == "lag" else "left")
    for g in status.groups:
        labels = _labels(g)
        for m in g.members:
            table.add_row(
                g.name,
                labels[m.member_id],
                m.host,
                _held(m, status.prefix),
                f"{g.member_lag(m.member_id):,}",
            )
        if not g.members:
            table.add_row(g.name, "[dim]no members[/]", "", "", f"{g.lag:,}")
    return table


def _partitions_table(status: Status) -> Table:
    """Every partition of a group's input topic, and retry partitions that hold records."""
    table = Table(title="partitions", title_justify="left")
    for col in ("group", "topic", "partition", "member", "committed", "log end", "lag", "rec/s"):
        left = col in ("group", "topic", "member")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    for g in status.groups:
        labels = _labels(g)
        for p in g.partitions:
            if p.topic != g.topics[0] and p.log_end == p.log_start and not p.lag:
                continue
            table.add_row(
                g.name,
                _short(p.topic, status.prefix),
                str(p.partition),
                labels.get(p.member_id or "", "-"),
                "-" if p.committed is None else f"{p.committed:,}",
                f"{p.log_end:,}",
                f"{p.lag:,}",
                _rate(p.records_per_s),
            )
    return table


def _services_table(services: tuple[ServiceStatus, ...]) -> Table:
    table = Table(title="paid services", title_justify="left")
    for col in ("service", "mode", "circuit", "throttle", "spend / budget", "requests"):
        table.add_column(col)
    for s in services:
        throttle = s.throttle
        if throttle is None:
            state, spend, requests = "no usage yet", "-", "-"
        else:
            state = (
                f"{throttle.state.value} ({throttle.window}, as of {throttle.occurred_at:%H:%M:%S})"
            )
            share = (
                f" ({throttle.spent_usd / throttle.budget_usd:.0%})" if throttle.budget_usd else ""
            )
            spend = f"{usd(throttle.spent_usd)} / {usd(throttle.budget_usd)}{share}"
            requests = f"{throttle.requests} / {throttle.request_budget}"
        if s.tenants:
            state += "; tenants: " + ", ".join(f"{t.tenant_id} {t.state.value}" for t in s.tenants)
        table.add_row(s.service, s.mode, s.circuit.describe(), state, spend, requests)
    return table


def exporter() -> None:
    """Serve every consumer group's lag, committed offsets and members, and the DLQ's depth,
    read from outside the groups, for Prometheus (observability.exporter_port) until
    SIGTERM/SIGINT."""
    from ragstream.exporter import run_exporter

    settings = settings_or_exit(quiet=False)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its errors reach us as one line
    run(run_exporter, settings)
