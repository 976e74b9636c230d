"""The dead-letter topic, for operators: list, show, count, redrive and purge its records.

    records = await list_records(settings, DlqFilter.build(stages=["parse"], since="2h"))
    shown = await show_record(settings, 0, 42)            # headers + decoded payload
    stats = await dlq_stats(settings)
    report = await redrive(settings, DlqFilter(), dry_run=True)
    plan = await plan_purge(settings, before=parse_time("7d"))  # ragstream.operator_input
    await purge(settings, plan)

Every read uses a plain consumer (no group: `assign()`, nothing committed) from each partition's
first record up to the end offsets captured when it starts, so it terminates while workers keep
dead-lettering. A DLQ record is what `consumers.runtime` (or the cost accountant) wrote, with
the headers `ragstream.headers.dead_letter_headers` builds: the original key and value bytes and headers, plus
`ragstream.errors.*` headers saying where it came from and why.

Redrive sends a record back to its original topic (`ragstream.errors.topic`) with its original
key, value and headers (without `ragstream.errors.*` and retry bookkeeping), plus
`ragstream.redrive.of: <dlq partition>:<dlq offset>`. It is idempotent: the producer is
idempotent with acks=all, and once the broker has acknowledged a copy the DLQ position is
recorded in PostgreSQL (`dlq_redrives`, ON CONFLICT DO NOTHING); positions recorded there are
never sent again, and an advisory lock keeps two redrives of one DLQ apart. If recording fails
after the acknowledgement, the next run sends those records once more: the stages are
idempotent (upserts keyed by document and content), so a second copy changes nothing.

Operator input that cannot be used raises `InvalidInput` (a ConfigError: exit code 2 on the
CLI); Kafka's errors come out as RetryableError.

    records.py   DlqRecord (a dead letter as read), DlqFilter, poison detection
    read.py      DeadLetters (the topic, read to the ends captured on entry); list, show, stats
    redrive.py   redrive
    purge.py     plan_purge, purge
"""

from ragstream.dlq.purge import PurgePartition, PurgePlan, plan_purge, purge
from ragstream.dlq.read import (
    DeadLetters,
    DlqStats,
    Listing,
    ShownRecord,
    dlq_stats,
    list_records,
    newest_of_document,
    show_record,
)
from ragstream.dlq.records import POISON, DlqFilter, DlqRecord, decode_value, is_poison
from ragstream.dlq.redrive import RedriveReport, redrive

__all__ = [
    "POISON",
    "DeadLetters",
    "DlqFilter",
    "DlqRecord",
    "DlqStats",
    "Listing",
    "PurgePartition",
    "PurgePlan",
    "RedriveReport",
    "ShownRecord",
    "decode_value",
    "dlq_stats",
    "is_poison",
    "list_records",
    "newest_of_document",
    "plan_purge",
    "purge",
    "redrive",
    "show_record",
]
