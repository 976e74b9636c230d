"""What operators type: times, ages, stages, positions and offset ranges, read one way by every
command, and refused with the option and its forms named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ragstream.errors import ConfigError
from ragstream.operator_input import (
    InvalidInput,
    OffsetRange,
    epoch_ms,
    format_ms,
    parse_offsets,
    parse_position,
    parse_stage,
    parse_time,
    parse_when,
)
from ragstream.topology import Stage

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def test_invalid_input_is_a_config_error_so_the_cli_exits_2() -> None:
    assert issubclass(InvalidInput, ConfigError)


# -- times -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        ("1h30m", NOW - timedelta(hours=1, minutes=30)),
        ("45S", NOW - timedelta(seconds=45)),
        ("0m", NOW),
        ("2025-04-30T08:15:00Z", datetime(2025, 4, 30, 8, 15, tzinfo=UTC)),
        ("2025-04-30T10:15:00+02:00", datetime(2025, 4, 30, 8, 15, tzinfo=UTC)),
        ("2025-04-30 08:15", datetime(2025, 4, 30, 8, 15, tzinfo=UTC)),  # naive → UTC
        ("2025-04-30", datetime(2025, 4, 30, tzinfo=UTC)),
    ],
)
def test_times_are_iso_8601_or_an_age(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "2x", "h", "yesterday", "-2h", "2025-13-01", "2 h 3"])
def test_a_malformed_time_names_the_option(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"--since .*ISO 8601.*30m, 2h, 7d"):
        parse_time(text, option="--since", now=NOW)


def test_a_start_is_a_time_or_an_age_with_or_without_a_minus() -> None:
    assert parse_when("2025-05-01T10:00", now=NOW) == datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    assert parse_when("2025-05-01T11:00+01:00", now=NOW) == datetime(2025, 5, 1, 10, tzinfo=UTC)
    assert parse_when("2h", now=NOW) == parse_when("-2h", now=NOW) == NOW - timedelta(hours=2)
    assert parse_when(" 1h30m ", now=NOW) == NOW - timedelta(minutes=90)


@pytest.mark.parametrize("text", ["2025-05-01T12:00:01", "2026-01-01"])
def test_a_start_after_now_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"--from .* is in the future \(.*; now is 2025"):
        parse_when(text, now=NOW)
    assert parse_when("0s", now=NOW) == NOW  # now itself is fine


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-", "01-05-2025 10:00", "2x"])
def test_a_malformed_start_names_the_option_and_the_forms(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"--from .*ISO 8601.*2h"):
        parse_when(text, now=NOW)


def test_epoch_milliseconds_and_back() -> None:
    assert epoch_ms(NOW) == 1_746_100_800_000
    assert format_ms(epoch_ms(NOW)) == "2025-05-01T12:00:00Z"
    assert format_ms(None) == ""


# -- stages, positions, offsets ----------------------------------------------------------------


def test_stages() -> None:
    assert parse_stage(" Parse ") is Stage.PARSE
    with pytest.raises(InvalidInput, match=r"--stage 'upload': unknown stage; choose one of parse"):
        parse_stage("upload")
    with pytest.raises(InvalidInput, match=r"^stage 'x'"):
        parse_stage("x", option="stage")


@pytest.mark.parametrize(
    ("text", "expected"), [("0:42", (0, 42)), (" 2 : 7 ", (2, 7)), ("11:0", (11, 0))]
)
def test_positions(text: str, expected: tuple[int, int]) -> None:
    assert parse_position(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0:", ":4", "a:1", "0:-1", "0:1:2", "0;1"])
def test_a_malformed_position_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="expected PARTITION:OFFSET"):
        parse_position(text)


def test_offset_ranges_per_partition_end_exclusive_and_optional() -> None:
    assert parse_offsets("0:100-200, 2:5") == {0: OffsetRange(100, 200), 2: OffsetRange(5, None)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0:10-5", "END 5 is before START 10"),
        ("0:1,0:2", "partition 0 is given twice"),
        ("0-10", "expected PARTITION:START"),
        ("a:1", "expected PARTITION:START"),
        ("", "expected PARTITION:START"),
    ],
)
def test_bad_offset_ranges_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_offsets(text)


def test_position_lists_are_offsets_without_ends() -> None:
    assert parse_offsets("0:5,2:9", option="--up-to", ends=False) == {
        0: OffsetRange(5),
        2: OffsetRange(9),
    }
    with pytest.raises(InvalidInput, match="partition 0 is given twice"):
        parse_offsets("0:5,0:9", option="--up-to", ends=False)
    with pytest.raises(InvalidInput, match=r"--up-to '0:5,': expected PARTITION:OFFSET\["):
        parse_offsets("0:5,", option="--up-to", ends=False)
    with pytest.raises(InvalidInput, match=r"--up-to '0:5-9': expected PARTITION:OFFSET\["):
        parse_offsets("0:5-9", option="--up-to", ends=False)
