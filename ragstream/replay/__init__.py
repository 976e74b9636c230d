"""Replay: process one stage's input again, from a time or an offset range.

    request = ReplayRequest.build("parse", from_="2h")                 # reset a stopped group
    request = ReplayRequest.build("chunk", live=True, earliest=True, tenants=["acme"])
    plan = await plan_replay(settings, request)                        # reads; moves nothing
    report = await run_replay(settings, plan)                          # or dry_run=True

Two ways to replay a stage, one plan for both:

- **reset** (the default), like `kafka-consumer-groups --reset-offsets` (to a time, to the
  earliest record, by a shift, or to given offsets): the stage's consumer group gets new
  committed offsets on its input topic, and reprocesses from there when its workers start. It
  is refused while the group has live members (a running member would overwrite the offsets
  with its own commits). It moves whole partitions, so it cannot select tenants, documents or
  correlation ids. A replay never moves a group forward: a partition the group has not yet
  reached at the asked position keeps its offset, so a replay never skips a record.
- **live**: the range is read from the stage's input topic (a plain consumer, no group) and each
  record a filter takes is written back to the same topic with its key, value and headers and
  the header `ragstream.replay: <replay id>`, so the running group processes it again. Copies an
  earlier replay wrote are not copied again (their originals are, when in the range), and bytes
  that do not decode are left out (they would only be dead-lettered again). The range ends at
  the log ends captured when the plan is made, so the replay ends while the topic grows.

Downstream every write is an idempotent upsert (see ragstream.store), so a replay adds no
duplicate row; a replayed copy is a journey step of its own (`replay` = the copy's position).

Operator input that cannot be used raises `InvalidInput` (exit code 2 on the CLI); a reset while
the group runs raises `ReplayRefused`; Kafka's errors come out as RetryableError.

    request.py   ReplayRequest (what was asked, checked), RecordFilter
    plan.py      the plan per partition, pure: build_partitions
    run.py       plan_replay (reads the broker, moves nothing), run_replay
"""

from ragstream.replay.plan import (
    GroupState,
    PartitionPlan,
    ReplayPlan,
    build_partitions,
)
from ragstream.replay.request import Mode, RecordFilter, ReplayRefused, ReplayRequest
from ragstream.replay.run import ReplayReport, group_state, plan_replay, run_replay

__all__ = [
    "GroupState",
    "Mode",
    "PartitionPlan",
    "RecordFilter",
    "ReplayPlan",
    "ReplayRefused",
    "ReplayReport",
    "ReplayRequest",
    "build_partitions",
    "group_state",
    "plan_replay",
    "run_replay",
]
