"""What operators type, read once for every command: times, stages, positions, offset ranges.

    parse_time("2h")                  an ISO 8601 time (naive means UTC) or an age before now
    parse_when("-2h")                 the same for a start, refused in the future
    parse_stage("parse")              a Stage
    parse_position("0:42")            (partition, offset)
    parse_offsets("0:10-20,1:5")      {partition: OffsetRange}; `ends=False` for P:O lists

Input that cannot be used raises `InvalidInput`, a ConfigError (exit code 2 on the CLI) whose
message names the option and the forms it takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ragstream.errors import ConfigError
from ragstream.topology import Stage


class InvalidInput(ConfigError):
    """An operator's argument cannot be used (unknown stage, malformed time or position, a
    partition or offset the topic does not have). The message names the option."""


# -- times -------------------------------------------------------------------------------------

_AGE = re.compile(r"(?:\d+[smhdw])+")
_AGE_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, *, option: str = "time", now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC) or an age before `now`: `30m`, `2h`, `7d`, `1h30m`."""
    value = text.strip().lower()
    if _AGE.fullmatch(value):
        delta = timedelta()
        for amount, unit in _AGE_PART.findall(value):
            delta += timedelta(**{_UNITS[unit]: int(amount)})
        return (now or datetime.now(UTC)) - delta
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"{option} {text!r}: expected an ISO 8601 time (2025-05-01T12:00:00Z) or an age "
            "like 30m, 2h, 7d"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def parse_when(text: str, *, option: str = "--from", now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC) or an age before now: `2h`, `-2h`, `1h30m`, `7d`.
    A time in the future is refused: nothing has been written after it yet."""
    now = now or datetime.now(UTC)
    value = text.strip()
    moment = parse_time(value[1:] if value.startswith("-") else value, option=option, now=now)
    if moment > now:
        raise InvalidInput(
            f"{option} {text!r} is in the future ({format_ms(epoch_ms(moment))}; now is "
            f"{format_ms(epoch_ms(now))}): nothing has been written after it yet"
        )
    return moment


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def format_ms(ms: int | None) -> str:
    """Epoch milliseconds as a UTC ISO time (seconds), or '' for None."""
    if ms is None:
        return ""
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


# -- stages, positions, offsets ----------------------------------------------------------------


def parse_stage(text: str, *, option: str = "--stage") -> Stage:
    try:
        return Stage(text.strip().lower())
    except ValueError:
        choices = ", ".join(s.value for s in Stage)
        raise InvalidInput(f"{option} {text!r}: unknown stage; choose one of {choices}") from None


POSITION = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")
_RANGE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_POSITIONS = "PARTITION:OFFSET[,PARTITION:OFFSET...], for example 0:42,1:7"
_RANGES = (
    "PARTITION:START[-END][,...], for example 0:100-200,1:50 (END is exclusive; without it, "
    "to the end of the log)"
)


def parse_position(text: str, *, option: str = "position") -> tuple[int, int]:
    """`PARTITION:OFFSET` → (partition, offset)."""
    match = POSITION.fullmatch(text)
    if match is None:
        raise InvalidInput(f"{option} {text!r}: expected PARTITION:OFFSET, for example 0:42")
    return int(match[1]), int(match[2])


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Offsets of one partition: `start` inclusive, `stop` exclusive (None: to the log end)."""

    start: int
    stop: int | None = None


def parse_offsets(
    text: str, *, option: str = "--offsets", ends: bool = True
) -> dict[int, OffsetRange]:
    """`P:START[-END][,P:START[-END]...]` → {partition: OffsetRange}, each partition at most
    once; END is exclusive. With `ends=False` the form is `P:OFFSET[,...]` (no END)."""
    out: dict[int, OffsetRange] = {}
    for item in text.split(","):
        match = _RANGE.fullmatch(item)
        if match is None or (match[3] is not None and not ends):
            raise InvalidInput(f"{option} {text!r}: expected {_RANGES if ends else _POSITIONS}")
        partition, start = int(match[1]), int(match[2])
        stop = int(match[3]) if match[3] is not None else None
        if partition in out:
            raise InvalidInput(f"{option} {text!r}: partition {partition} is given twice")
        if stop is not None and stop < start:
            raise InvalidInput(f"{option} {item.strip()!r}: END {stop} is before START {start}")
        out[partition] = OffsetRange(start, stop)
    return out
