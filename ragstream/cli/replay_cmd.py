"""`ragstream replay STAGE ...`: process one stage's input again (see ragstream.replay).

The plan (partitions, offsets, record counts) is printed before anything moves; `--dry-run`
prints it and stops. Arguments are parsed inside the async function `run` calls, so a bad one is
an InvalidInput: one line and exit code 2; a reset refused while the group runs exits 1.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ragstream.cli.common import (
    console,
    err_console,
    full_document_ids,
    progress_bar,
    run,
    settings_or_exit,
)
from ragstream.replay import (
    ReplayPlan,
    ReplayReport,
    ReplayRequest,
    plan_replay,
    run_replay,
)
from ragstream.settings import Settings
from ragstream.topology import H_REPLAY

StageArg = Annotated[str, typer.Argument(help="The stage to replay: parse | chunk | embed.")]
FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="From the first record at or after this time: ISO 8601 (UTC when it has no zone, "
        "e.g. 2026-11-24T10:00) or an age before now (2h, -2h, 1h30m, 7d).",
    ),
]
EarliestOpt = Annotated[
    bool, typer.Option("--earliest", help="From each partition's first record.")
]
ShiftOpt = Annotated[
    int | None,
    typer.Option(
        "--shift-by",
        help="Offset reset only: move the group's committed offsets back this many records "
        "per partition (negative, e.g. -100).",
    ),
]
OffsetsOpt = Annotated[
    str | None,
    typer.Option(
        "--offsets",
        help="PARTITION:START[-END][,...] of the input topic; an END (exclusive) needs --live; "
        "partitions not named are left alone.",
    ),
]
UntilOpt = Annotated[
    str | None,
    typer.Option(
        "--until",
        help="--live only: stop before the first record at or after this time "
        "(default: the log end when the replay starts).",
    ),
]
LiveOpt = Annotated[
    bool,
    typer.Option(
        "--live",
        help="Republish the range to the input topic with a replay header while the workers "
        "run (default: reset the offsets of the stopped group).",
    ),
]
TenantOpt = Annotated[
    list[str], typer.Option("--tenant", "-t", help="--live: only this tenant (repeatable).")
]
DocumentOpt = Annotated[
    list[str],
    typer.Option(
        "--document",
        "-d",
        help="--live: only this document (repeatable): its id, or the start of it the tables show.",
    ),
]
CorrelationOpt = Annotated[
    list[str],
    typer.Option("--correlation-id", help="--live: only this correlation id (repeatable)."),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show the plan and the record counts; move nothing.")
]


def replay(
    stage: StageArg,
    from_: FromOpt = None,
    earliest: EarliestOpt = False,
    shift_by: ShiftOpt = None,
    offsets: OffsetsOpt = None,
    until: UntilOpt = None,
    live: LiveOpt = False,
    tenant: TenantOpt = [],  # noqa: B006
    document: DocumentOpt = [],  # noqa: B006
    correlation_id: CorrelationOpt = [],  # noqa: B006
    dry_run: DryRunOpt = False,
) -> None:
    """Process a stage's input again, from a time or an offset range.

    Without --live, the stage's consumer group (which must be stopped) gets new committed
    offsets and reprocesses from there when its workers start, like `kafka-consumer-groups
    --reset-offsets`. With --live, the range is read from the input topic and the records
    (of a tenant, document or correlation id, if asked) are written back to it with the
    `ragstream.replay` header, so the running workers process them again.
    """
    settings = settings_or_exit()
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its errors reach us as one line

    async def make_plan() -> ReplayPlan:
        request = ReplayRequest.build(
            stage,
            live=live,
            from_=from_,
            earliest=earliest,
            shift_by=shift_by,
            offsets=offsets,
            until=until,
            tenants=tenant,
            documents=await full_document_ids(settings, document),
            correlation_ids=correlation_id,
        )
        return await plan_replay(settings, request)

    plan = run(make_plan)
    if plan.request.live:
        _live(settings, plan, dry_run)
    else:
        _reset(settings, plan, dry_run)


def _reset(settings: Settings, plan: ReplayPlan, dry_run: bool) -> None:
    console.print(_reset_table(plan))
    group = plan.group.group_id
    if not plan.moving:
        console.print(
            f"nothing to replay: group {group} has not yet gone past that point on any "
            "partition (a replay never moves a group forward)",
            highlight=False,
        )
        return
    moved = f"{len(plan.moving)} partition(s) of {plan.topic}"
    again = f"{plan.again} record(s) again ({plan.records} to read up to the log end)"
    if dry_run:
        console.print(
            f"dry run: would reset {moved}; group {group} would process {again}; nothing moved",
            highlight=False,
        )
        return
    run(run_replay, settings, plan)
    console.print(
        f"reset {moved}; group {group} processes {again} when its workers start",
        highlight=False,
    )


def _live(settings: Settings, plan: ReplayPlan, dry_run: bool) -> None:
    group = plan.group
    taken = f"records taken: {escape(plan.request.filter.describe())}"
    if not dry_run or plan.records == 0:  # a dry run shows its plan with the counts it reads
        console.print(_live_table(plan, None))
        console.print(taken, highlight=False)
    if not group.members:
        err_console.print(
            f"[yellow]note:[/] group {group.group_id} has no live members: the copies wait on "
            f"{plan.topic} until its workers run",
            highlight=False,
        )
    if plan.records == 0:
        console.print("nothing to replay: the range holds no records")
        return
    progress = progress_bar("reading" if dry_run else "replaying")
    task = progress.add_task("replay", total=plan.records)

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        report: ReplayReport = run(run_replay, settings, plan, dry_run=dry_run, on_progress=advance)
    if dry_run:
        console.print(_live_table(plan, report))
        console.print(taken, highlight=False)
    for reason, count in sorted(report.skipped.items()):
        console.print(f"left out {count}: {reason}", highlight=False)
    if dry_run:
        console.print(
            f"dry run: would republish {report.taken} of {report.read} record(s) to "
            f"{plan.topic}; nothing written",
            highlight=False,
        )
    else:
        console.print(
            f"republished {report.sent} record(s) to {plan.topic} with {H_REPLAY}: "
            f"{plan.replay_id}; group {group.group_id} processes them again",
            highlight=False,
        )


def _title(plan: ReplayPlan, how: str) -> str:
    return (
        f"replay of {plan.stage.value} {plan.request.describe_start()}: {how} "
        f"(group {plan.group.group_id}, {plan.group.state.lower()}, "
        f"{len(plan.group.members)} member(s))"
    )


def _reset_table(plan: ReplayPlan) -> Table:
    table = Table(title=_title(plan, f"offset reset on {plan.topic}"))
    for col in (
        "partition",
        "first offset",
        "end offset",
        "committed",
        "new offset",
        "processed again",
        "to read",
    ):
        table.add_column(col, justify="right")
    for p in plan.partitions:
        table.add_row(
            str(p.partition),
            str(p.low),
            str(p.end),
            "-" if p.committed is None else str(p.committed),
            str(p.start) if p.moves else f"{p.start} (unchanged)",
            str(p.again),
            str(p.records),
        )
    table.add_row("all", "", "", "", "", str(plan.again), str(plan.records), style="bold")
    return table


def _live_table(plan: ReplayPlan, report: ReplayReport | None) -> Table:
    table = Table(title=_title(plan, f"republish to {plan.topic}"))
    columns = ["partition", "first offset", "end offset", "from offset", "range end", "in range"]
    if report is not None:
        columns.append("to republish")
    for col in columns:
        table.add_column(col, justify="right")
    for p in plan.partitions:
        row = [str(p.partition), str(p.low), str(p.end), str(p.start), str(p.stop), str(p.records)]
        if report is not None:
            row.append(str(report.matched.get(p.partition, 0)))
        table.add_row(*row)
    total = ["all", "", "", "", "", str(plan.records)]
    if report is not None:
        total.append(str(report.taken))
    table.add_row(*total, style="bold")
    return table
