"""The bounded values a metric label or gauge takes, and the histogram buckets."""

from __future__ import annotations

from typing import Final

# Seconds. A stage may wait minutes on a parsing service; a document may take an hour to get
# through a backlog.
STAGE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Milliseconds to hours, no step wider than about 2x, so a quantile resolves a backlog's wait too.
PIPELINE_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2,
    5,
    10,
    20,
    30,
    60,
    120,
    180,
    300,
    450,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
    5400,
    7200,
)
CALL_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

CIRCUIT_STATES: Final = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
THROTTLE_STATES: Final = {"open": 0, "warning": 1, "throttled": 2}
SERVICE_MODES: Final = ("local", "real", "hybrid")
# Every outcome a record can end with, each shown at 0 from the start (so rate() sees its first):
# the stage's own (ok, duplicate, skipped), then the runtime's: retried (to the retry topic),
# waiting (held or parked: budget, open circuit), dead-lettered, poison (undecodable, DLQ).
OUTCOMES: Final = ("ok", "duplicate", "skipped", "retried", "waiting", "dead-lettered", "poison")


def state_value(states: dict[str, int], state: str, what: str) -> int:
    try:
        return states[str(state).lower()]
    except KeyError:
        raise ValueError(f"unknown {what} state {state!r}") from None
