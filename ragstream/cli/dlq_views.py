"""How `ragstream dlq` shows dead letters: header values as text or hex, payload fields,
JSON for `show --json`, and the tables of a redrive or a purge."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from ragstream.dlq import DlqRecord, PurgePlan, ShownRecord
from ragstream.operator_input import format_ms
from ragstream.topology import H_ERR_FIRST_FAILURE, H_ERR_LAST_FAILURE, H_ERR_TIMESTAMP

HEX_PREVIEW = 64
_TIME_HEADERS = (H_ERR_TIMESTAMP, H_ERR_FIRST_FAILURE, H_ERR_LAST_FAILURE)


def snippet(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def text_or_hex(data: bytes | None) -> str | None:
    """UTF-8 text as it is; other bytes as `hex:...`."""
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + data.hex()
    return text if text.isprintable() or not text else "hex:" + data.hex()


def header_text(key: str, value: bytes) -> str:
    text = text_or_hex(value) or ""
    if key in _TIME_HEADERS and text.isdigit():
        text += f"  ({format_ms(int(text))})"
    return text


def hex_preview(data: bytes) -> str:
    head = data[:HEX_PREVIEW]
    lines = [head[i : i + 16].hex(" ") for i in range(0, len(head), 16)]
    more = f"\n… ({len(data)} bytes in all)" if len(data) > HEX_PREVIEW else ""
    return "\n".join(lines) + more


def field_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list | int | float | bool) or value is None:
        return value
    return str(value)


def shown_json(shown: ShownRecord) -> dict[str, Any]:
    r = shown.record
    payload = None
    if shown.event is not None:
        payload = {
            "event_type": shown.event.EVENT_TYPE,
            **{
                f.name: field_text(getattr(shown.event, f.name))
                for f in dataclasses.fields(shown.event)
            },
        }
    return {
        "position": r.position,
        "topic": r.topic,
        "time": format_ms(r.timestamp_ms),
        "key": text_or_hex(r.key),
        "headers": {k: text_or_hex(v) for k, v in r.headers},
        "payload": payload,
        "undecodable": shown.undecodable,
        "value_size": None if r.value is None else len(r.value),
        "value_hex_preview": None
        if shown.event is not None or r.value is None
        else r.value[:HEX_PREVIEW].hex(),
    }


def moves_table(records: list[DlqRecord]) -> Table:
    table = Table(title="would redrive")
    for col in ("at", "stage", "error class", "document", "to topic"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(
            r.position,
            r.stage or "",
            r.error_class or "",
            escape(r.document or ""),
            r.origin_topic or "",
        )
    return table


def plan_table(plan: PurgePlan) -> Table:
    table = Table(title=f"purge of {plan.dlq_topic}")
    for col in ("partition", "first offset", "end offset", "delete before", "records deleted"):
        table.add_column(col, justify="right")
    for p in plan.partitions:
        table.add_row(str(p.partition), str(p.low), str(p.end), str(p.delete_before), str(p.count))
    return table
