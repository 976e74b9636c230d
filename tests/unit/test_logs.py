"""Log lines: a client library's retry loop is logged once per interval."""

from __future__ import annotations

import logging

from ragstream.logs import OncePer


def test_a_client_librarys_repeated_lines_are_logged_once_per_interval() -> None:
    once = OncePer(30.0)

    def record(msg: str, at: float) -> logging.LogRecord:
        rec = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, ("x",), None)
        rec.created = at
        return rec

    seen = [once.filter(record("Unable connect to %s", t)) for t in (0.0, 0.1, 5.0, 29.9, 30.5)]
    assert seen == [True, False, False, False, True]
    assert once.filter(record("Failed fetch messages from %s", 0.2))  # another message
