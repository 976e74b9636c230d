"""What a chaos run (tests/integration/chaos_driver.py) did to every document: read back from
PostgreSQL, the DLQ and the embedded topic once the pipeline has settled.

Per uploaded document, exactly one of: embedded (with a parse result and, for its current
chunker version and model, a chunk and an embedding per chunk), dead-lettered (its status says
so, or one of its records is in the DLQ: either way the pipeline gave up on it), or lost (no
row at all, a status that never reached a terminal one, or `embedded` with rows missing). A
document whose status and DLQ records disagree is counted as dead-lettered and also as a
disagreement.

Duplicate rows: document rows the run did not upload, one content held by two originals, more
than one parse result per document, and chunk or embedding rows beyond one per document and
chunk index (the primary keys include the chunker version, model and dimensions: those are the
duplicates a primary key cannot catch), plus `Store.duplicate_rows` (natural keys).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from rich.table import Table

from ragstream.dlq import DeadLetters
from ragstream.settings import Settings
from ragstream.store import Store
from ragstream.topology import Stage, Topology
from tests.integration.pipeline_helpers import end_offsets, read_topic

SETTLED = frozenset({"embedded", "dead-lettered", "duplicate"})


@dataclass(frozen=True)
class ChaosEvent:
    at_s: float  # since the chaos window opened
    what: str


@dataclass(frozen=True)
class WorkerExit:
    """A worker process that ended without being killed."""

    at_s: float
    slot: int
    stage: str
    code: int | None
    last_words: str
    log: Path


@dataclass(frozen=True)
class DocumentFault:
    """One document that did not end as it should, with what the store and the DLQ say."""

    document_id: str
    filename: str
    problem: str
    status: str | None
    reason: str | None
    dead_letters: tuple[str, ...]  # "stage ErrorClass (attempts n): message"

    @property
    def kind(self) -> tuple[str, str | None, str | None, tuple[str, ...]]:
        return (self.problem, self.status, self.reason, self.dead_letters)


@dataclass
class ChaosReport:
    title: str
    prefix: str
    tenant: str
    work_dir: Path
    uploaded: int = 0
    upload_retries: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    dead_lettered: int = 0
    missing: int = 0  # uploaded, no document row, not in the DLQ
    stuck: int = 0  # a row whose status is not a terminal one, not in the DLQ
    incomplete: int = 0  # embedded, but rows are missing
    duplicate_rows: dict[str, int] = field(default_factory=dict)
    dlq_depth: int = 0
    dlq_by_class: Counter[tuple[str, str]] = field(default_factory=Counter)
    status_dlq_disagree: int = 0  # in the DLQ but not dead-lettered, or the other way round
    embedded_records: int = 0  # DocumentEmbedded records (more than one a document: redelivery)
    redelivered: int = 0  # documents with more than one DocumentEmbedded record
    retry_records: int = 0  # records written to the stages' retry topics
    kills: int = 0
    exits: list[WorkerExit] = field(default_factory=list)
    stop_codes: list[int] = field(default_factory=list)  # exit codes on the final SIGTERM
    outages: list[tuple[str, float]] = field(default_factory=list)  # (what, seconds down)
    events: list[ChaosEvent] = field(default_factory=list)
    faults: list[DocumentFault] = field(default_factory=list)
    chaos_s: float = 0.0
    settle_s: float = 0.0
    settled: bool = False

    @property
    def lost(self) -> int:
        return self.missing + self.stuck + self.incomplete

    @property
    def embedded(self) -> int:
        return self.statuses.get("embedded", 0)

    @property
    def duplicates(self) -> int:
        return sum(self.duplicate_rows.values())

    def problems(self) -> list[str]:
        """What a chaos run must not show; empty when it went as it should."""
        out = []
        if self.lost:
            out.append(f"{self.lost} lost ({self._lost_parts()})")
        if self.duplicates:
            out.append(f"{self.duplicates} duplicate rows {self._duplicate_parts()}")
        if self.dead_lettered:
            out.append(f"{self.dead_lettered} dead-lettered")
        if self.statuses != Counter({"embedded": self.uploaded}):
            out.append(f"statuses {dict(self.statuses)}, not all {self.uploaded} embedded")
        if self.dlq_depth:
            out.append(f"DLQ holds {self.dlq_depth} records")
        if self.status_dlq_disagree:
            out.append(f"{self.status_dlq_disagree} documents whose status and DLQ disagree")
        return out

    def _lost_parts(self) -> str:
        return (
            f"{self.missing} never registered, {self.stuck} not finished, "
            f"{self.incomplete} embedded with rows missing"
        )

    def _duplicate_parts(self) -> dict[str, int]:
        return {k: v for k, v in self.duplicate_rows.items() if v}

    def rows(self) -> list[tuple[str, str]]:
        outages = ", ".join(f"{what} {secs:.0f}s" for what, secs in self.outages) or "none"
        by_class = ", ".join(f"{s} {c} x{n}" for (s, c), n in sorted(self.dlq_by_class.items()))
        dupes = self._duplicate_parts()
        exit_codes = dict(Counter(e.code for e in self.exits))
        return [
            ("documents uploaded", str(self.uploaded)),
            ("embedded", str(self.embedded)),
            ("dead-lettered", str(self.dead_lettered)),
            ("lost", f"{self.lost} ({self._lost_parts()})"),
            ("duplicate rows", f"{self.duplicates}" + (f" {dupes}" if dupes else "")),
            ("statuses", ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))),
            ("DLQ depth", f"{self.dlq_depth}" + (f" ({by_class})" if by_class else "")),
            ("status and DLQ disagree", str(self.status_dlq_disagree)),
            ("workers SIGKILLed (started again at once)", str(self.kills)),
            (
                "workers that ended on their own",
                f"{len(self.exits)}" + (f" (exit codes {exit_codes})" if self.exits else ""),
            ),
            ("exit codes on the final SIGTERM", str(dict(Counter(self.stop_codes)))),
            ("outages (down for)", outages),
            ("upload sends retried", str(self.upload_retries)),
            ("records sent to retry topics", str(self.retry_records)),
            (
                "DocumentEmbedded records",
                f"{self.embedded_records} ({self.redelivered} documents more than once)",
            ),
            (
                "chaos window / settling",
                f"{self.chaos_s:.0f}s / {self.settle_s:.0f}s"
                + ("" if self.settled else " (did not settle: timed out)"),
            ),
        ]

    def table(self) -> Table:
        table = Table(title=self.title)
        table.add_column("what")
        table.add_column("result", overflow="fold")
        for what, value in self.rows():
            table.add_row(what, value)
        return table

    def details(self, *, examples: int = 5) -> list[str]:
        """The timeline of faults, the workers that ended on their own, and the documents that
        went wrong, grouped by what went wrong (with `examples` of each)."""
        lines = ["timeline:"]
        lines += [f"  {e.at_s:7.1f}s  {e.what}" for e in self.events]
        if self.exits:
            lines.append("workers that ended on their own:")
            lines += [
                f"  {e.at_s:7.1f}s  worker {e.slot} ({e.stage}) exit {e.code}: {e.last_words}"
                f"  [{e.log.name}]"
                for e in self.exits
            ]
        if self.faults:
            groups: dict[tuple[Any, ...], list[DocumentFault]] = {}
            for fault in self.faults:
                groups.setdefault(fault.kind, []).append(fault)
            lines.append(f"documents that went wrong: {len(self.faults)}")
            for (problem, status, reason, dead), faults in groups.items():
                lines.append(
                    f"  {len(faults)} x {problem}; status {status}"
                    + (f" ({reason})" if reason else "")
                )
                lines += [f"      DLQ: {d}" for d in dead]
                lines += [f"      e.g. {f.document_id} {f.filename}" for f in faults[:examples]]
        problems = self.problems()
        lines.append("problems: " + ("; ".join(problems) if problems else "none"))
        return lines

    def describe(self) -> str:
        """Everything, as plain text."""
        width = max(len(w) for w, _ in self.rows())
        lines = [self.title, f"logs and documents: {self.work_dir}"]
        lines += [f"  {w:<{width}}  {v}" for w, v in self.rows()]
        return "\n".join(lines + self.details())


async def examine(report: ChaosReport, settings: Settings, uploaded: Mapping[str, str]) -> None:
    """Fill `report` from the store, the DLQ and the topics. `uploaded`: document id -> filename
    of every document the run published."""
    topology = Topology(settings.kafka.topic_prefix)
    dead: dict[str, list[str]] = {}
    async with DeadLetters(settings) as dlq:
        report.dlq_depth = dlq.total
        async for record in dlq.scan():
            stage, cls = record.stage or "?", record.error_class or "?"
            report.dlq_by_class[(stage, cls)] += 1
            dead.setdefault(record.document or "?", []).append(
                f"{stage} {cls} (attempts {record.attempts}): {record.message[:200]}"
            )
    embedded = Counter(d.document_id for d in await read_topic(settings, topology.embedded))
    report.embedded_records = sum(embedded.values())
    report.redelivered = sum(1 for n in embedded.values() if n > 1)
    for stage in Stage:
        report.retry_records += sum((await end_offsets(settings, topology.retry(stage))).values())

    rows = {r["document_id"]: r for r in await _document_rows(settings, report.tenant)}
    dupes: Counter[str] = Counter()
    dupes["documents the run did not upload"] = len(set(rows) - set(uploaded))
    for doc_id, filename in uploaded.items():
        row = rows.get(doc_id)
        status = None if row is None else str(row["status"])
        if row is not None:
            report.statuses[status or "?"] += 1
            dupes["parse_results"] += max(0, row["parse_rows"] - 1)
            dupes["chunks"] += row["chunk_rows"] - row["chunk_indexes"]
            dupes["embeddings"] += row["embedding_rows"] - row["embedding_indexes"]
        in_dlq = doc_id in dead
        problem = _judge(report, row, status, in_dlq)
        if in_dlq != (status == "dead-lettered"):
            report.status_dlq_disagree += 1
            problem += "; in the DLQ, status not dead-lettered" if in_dlq else "; not in the DLQ"
        if problem:
            reason = None if row is None else row["status_reason"]
            report.faults.append(
                DocumentFault(
                    doc_id, filename, problem, status, reason, tuple(dead.get(doc_id, ()))
                )
            )
    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=2) as store:
        for table, n in (await store.duplicate_rows(report.tenant)).items():
            dupes[f"{table} (natural key)"] += n
    report.duplicate_rows = dict(dupes)


def _judge(report: ChaosReport, row: asyncpg.Record | None, status: str | None, dlq: bool) -> str:
    """Count the document under one heading; what went wrong with it ('' if nothing)."""
    if dlq or status == "dead-lettered":
        report.dead_lettered += 1
        return "dead-lettered"
    if row is None:
        report.missing += 1
        return "lost: never registered"
    if status not in SETTLED:
        report.stuck += 1
        return f"lost: stuck at {status}"
    count = row["chunk_count"]
    complete = (
        row["parse_rows"] >= 1
        and bool(count)
        and row["current_chunks"] == count
        and row["current_embeddings"] == count
    )
    if status == "embedded" and not complete:
        report.incomplete += 1
        return (
            f"lost: embedded with rows missing ({row['parse_rows']} parse results, "
            f"{row['current_chunks']} chunks and {row['current_embeddings']} embeddings "
            f"of {count})"
        )
    return "" if status == "embedded" else f"ended {status}"


async def _document_rows(settings: Settings, tenant: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.postgres.dsn())
    try:
        return list(await conn.fetch(_DOCUMENT_ROWS, tenant))
    finally:
        await conn.close()


_DOCUMENT_ROWS = """
SELECT d.document_id, d.status, d.status_reason, d.chunk_count,
       (SELECT count(*) FROM parse_results p WHERE p.document_id = d.document_id) AS parse_rows,
       (SELECT count(*) FROM chunks c WHERE c.document_id = d.document_id) AS chunk_rows,
       (SELECT count(DISTINCT c.chunk_index) FROM chunks c
         WHERE c.document_id = d.document_id) AS chunk_indexes,
       (SELECT count(*) FROM chunks c WHERE c.document_id = d.document_id
           AND c.chunker_version = d.current_chunker_version) AS current_chunks,
       (SELECT count(*) FROM embeddings e WHERE e.document_id = d.document_id) AS embedding_rows,
       (SELECT count(DISTINCT e.chunk_index) FROM embeddings e
         WHERE e.document_id = d.document_id) AS embedding_indexes,
       (SELECT count(*) FROM embeddings e WHERE e.document_id = d.document_id
           AND e.chunker_version = d.current_chunker_version
           AND e.model = d.current_embedding_model
           AND e.dimensions = d.current_embedding_dimensions) AS current_embeddings
FROM documents d
WHERE d.tenant_id = $1
"""
