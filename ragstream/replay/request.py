"""What an operator asked a replay for, checked: `ReplayRequest.build(...)` from the CLI's text."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from ragstream.errors import RagstreamError
from ragstream.events import DocumentEvent
from ragstream.operator_input import (
    InvalidInput,
    OffsetRange,
    epoch_ms,
    format_ms,
    parse_offsets,
    parse_stage,
    parse_time,
    parse_when,
)
from ragstream.topology import Stage


class ReplayRefused(RagstreamError):
    """The replay cannot run as asked right now (an offset reset while the group has members)."""


class Mode(StrEnum):
    RESET = "reset"
    LIVE = "live"


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records a live replay takes; empty takes all. Fields combine with AND, values of
    one field with OR."""

    tenants: frozenset[str] = frozenset()
    documents: frozenset[str] = frozenset()
    correlation_ids: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.tenants or self.documents or self.correlation_ids)

    def matches(self, event: DocumentEvent) -> bool:
        if self.tenants and event.tenant_id not in self.tenants:
            return False
        if self.documents and event.document_id not in self.documents:
            return False
        return not self.correlation_ids or event.correlation_id in self.correlation_ids

    def describe(self) -> str:
        parts = [
            f"{name} {', '.join(sorted(values))}"
            for name, values in (
                ("tenant", self.tenants),
                ("document", self.documents),
                ("correlation id", self.correlation_ids),
            )
            if values
        ]
        return "; ".join(parts) or "every record"


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What an operator asked for, checked: one stage, one way to start, a mode, a filter."""

    stage: Stage
    mode: Mode
    from_ms: int | None = None  # from the first record at or after this time
    earliest: bool = False  # from each partition's first record
    shift_by: int | None = None  # reset only: this many records back (negative)
    offsets: Mapping[int, OffsetRange] | None = None  # given partitions only
    until_ms: int | None = None  # live only: up to the first record at or after this time
    filter: RecordFilter = RecordFilter()

    @property
    def live(self) -> bool:
        return self.mode is Mode.LIVE

    @classmethod
    def build(
        cls,
        stage: str,
        *,
        live: bool = False,
        from_: str | None = None,
        earliest: bool = False,
        shift_by: int | None = None,
        offsets: str | None = None,
        until: str | None = None,
        tenants: Iterable[str] = (),
        documents: Iterable[str] = (),
        correlation_ids: Iterable[str] = (),
        now: datetime | None = None,
    ) -> ReplayRequest:
        """A request from operator text; InvalidInput names the option that cannot be used."""
        now = now or datetime.now(UTC)
        parsed_stage = parse_stage(stage, option="stage")
        starts = [
            name
            for name, given in (
                ("--from", from_ is not None),
                ("--earliest", earliest),
                ("--shift-by", shift_by is not None),
                ("--offsets", offsets is not None),
            )
            if given
        ]
        if len(starts) != 1:
            given = f" (got {' and '.join(starts)})" if starts else ""
            raise InvalidInput(
                "say where the replay starts with one of --from TIME, --earliest, "
                f"--shift-by -N or --offsets P:START[-END]{given}"
            )
        flt = RecordFilter(
            tenants=_values(tenants),
            documents=_values(documents),
            correlation_ids=_values(correlation_ids),
        )
        ranges = parse_offsets(offsets) if offsets is not None else None
        if not live:
            if not flt.empty:
                raise InvalidInput(
                    "--tenant, --document and --correlation-id pick single records, and an "
                    "offset reset moves whole partitions: add --live to republish only the "
                    "matching records while the workers run"
                )
            if until is not None:
                raise InvalidInput(
                    "--until needs --live: after an offset reset the group reads on to the "
                    "end of the log"
                )
            if ranges and any(r.stop is not None for r in ranges.values()):
                raise InvalidInput(
                    f"--offsets {offsets!r}: an END offset needs --live; an offset reset sets "
                    "where the group starts and it reads on to the end of the log"
                )
        elif shift_by is not None:
            raise InvalidInput(
                "--shift-by moves a group's committed offsets (an offset reset); with --live "
                "give --from, --earliest or --offsets"
            )
        if shift_by is not None and shift_by >= 0:
            raise InvalidInput(
                f"--shift-by {shift_by}: a replay moves offsets back, so give a negative "
                "number of records (for example --shift-by -100)"
            )
        from_ms = epoch_ms(parse_when(from_, now=now)) if from_ is not None else None
        until_ms = (
            epoch_ms(parse_time(until, option="--until", now=now)) if until is not None else None
        )
        if from_ms is not None and until_ms is not None and until_ms <= from_ms:
            raise InvalidInput(f"--until {until!r} is not after --from {from_!r}")
        return cls(
            stage=parsed_stage,
            mode=Mode.LIVE if live else Mode.RESET,
            from_ms=from_ms,
            earliest=earliest,
            shift_by=shift_by,
            offsets=ranges,
            until_ms=until_ms,
            filter=flt,
        )

    def describe_start(self) -> str:
        if self.from_ms is not None:
            return f"from {format_ms(self.from_ms)}"
        if self.earliest:
            return "from the earliest record"
        if self.shift_by is not None:
            return f"{-self.shift_by} record(s) back"
        return "from the given offsets"


def _values(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip() for v in values if v and v.strip())
