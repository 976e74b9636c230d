"""The contracts in schemas/: well-formed, documented, evolvable, and in step with the code."""

from __future__ import annotations

import io
import json
import re
import types
import typing
import uuid
from dataclasses import MISSING, fields
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.validation import validate

from ragstream.codec import Codec, SchemaInfo, load_schema
from ragstream.events import EVENT_TYPES, DocumentEvent, DocumentUploaded, Event, ServiceMode
from ragstream.resources import schemas_dir
from ragstream.settings import Mode
from ragstream.validation import check_key, check_upload

SCHEMAS = schemas_dir()
FILES = sorted(SCHEMAS.glob("*.avsc"))
UUID_T = {"type": "string", "logicalType": "uuid"}
TS_T = {"type": "long", "logicalType": "timestamp-millis"}


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def _strip_docs(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_docs(v) for k, v in schema.items() if k != "doc"}
    if isinstance(schema, list):
        return [_strip_docs(s) for s in schema]
    return schema


# -- every file --------------------------------------------------------------------------------


def test_the_expected_schemas_exist() -> None:
    assert [p.name for p in FILES] == [
        "CircuitStateChanged.v1.avsc",
        "CostUsage.v1.avsc",
        "DocumentChunked.v1.avsc",
        "DocumentEmbedded.v1.avsc",
        "DocumentParsed.v1.avsc",
        "DocumentUploaded.v1.avsc",
        "DocumentUploaded.v2.avsc",
        "ServiceModeChanged.v1.avsc",
        "ThrottleEvent.v1.avsc",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_schema_file_is_well_formed_and_documented(path: Path) -> None:
    info = load_schema(path)
    raw = info.raw
    assert raw["namespace"] == "ragstream.events"
    assert raw.get("doc", "").strip(), f"{path.name}: record has no doc"
    names = [f["name"] for f in raw["fields"]]
    assert len(names) == len(set(names))
    for f in raw["fields"]:
        assert f.get("doc", "").strip(), f"{path.name}: field {f['name']} has no doc"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", f["name"]), f["name"]
        t = f["type"]
        if isinstance(t, dict) and t["type"] == "enum":
            assert t.get("doc"), f"{path.name}: enum {t['name']} has no doc"
            assert t.get("default") in t["symbols"], "enums need a default to add symbols later"
        if isinstance(t, list):
            assert t[0] == "null" and len(t) == 2, f'{f["name"]}: nullable is ["null", T]'
            assert "default" in f and f["default"] is None, (
                f"{f['name']}: nullable defaults to null"
            )
        if "default" in f:
            assert validate(f["default"], parse_schema(t), raise_errors=False), f["name"]
    # every event: its id and time first; every document event: the document reference next
    fields_by_name = {f["name"]: f for f in raw["fields"]}
    assert names[:2] == ["event_id", "occurred_at"]
    assert fields_by_name["event_id"]["type"] == UUID_T
    assert fields_by_name["occurred_at"]["type"] == TS_T
    if info.name.startswith("Document"):
        assert names[2:5] == ["document_id", "tenant_id", "correlation_id"]
        assert all(fields_by_name[n]["type"] == "string" for n in names[2:5])


def test_schema_files_are_pretty_json_ending_in_a_newline() -> None:
    for path in FILES:
        text = path.read_text()
        assert text.endswith("}\n") and json.loads(text)


# -- code and contract -------------------------------------------------------------------------


def test_every_record_has_an_event_class_and_back(codec: Codec) -> None:
    assert {s.name for s in codec.schemas} == set(EVENT_TYPES)
    for name, cls in EVENT_TYPES.items():
        assert cls.EVENT_TYPE == name == cls.__name__
        assert issubclass(cls, DocumentEvent) == name.startswith("Document")


def _python_type(avro: Any) -> Any:
    """The Python type an Avro type maps to in ragstream.events."""
    if isinstance(avro, list):
        (inner,) = [t for t in avro if t != "null"]
        return _python_type(inner) | None
    if isinstance(avro, dict):
        logical = avro.get("logicalType")
        if logical == "uuid":
            return uuid.UUID
        if logical == "timestamp-millis":
            return datetime
        if logical == "decimal":
            return Decimal
        kind = avro["type"]
        if kind == "map":
            return dict[str, _python_type(avro["values"])]  # type: ignore[misc]
        if kind == "array":
            return list[_python_type(avro["items"])]  # type: ignore[misc]
        if kind == "enum":
            return ("enum", tuple(avro["symbols"]))
        return _python_type(kind)
    return {"string": str, "long": int, "int": int, "boolean": bool, "bytes": bytes}[avro]


def _normalise(hint: Any) -> Any:
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return ("enum", tuple(m.value for m in hint))
    if isinstance(hint, types.UnionType):
        return (
            _normalise(typing.get_args(hint)[0]) | None if len(typing.get_args(hint)) == 2 else hint
        )
    return hint


@pytest.mark.parametrize("cls", list(EVENT_TYPES.values()), ids=lambda c: c.__name__)
def test_dataclass_mirrors_its_newest_schema(codec: Codec, cls: type[Event]) -> None:
    newest = codec.newest(cls.EVENT_TYPE)
    assert tuple(f.name for f in fields(cls)) == newest.fields  # names and order
    hints = typing.get_type_hints(cls)
    schema_fields = {f["name"]: f for f in newest.raw["fields"]}
    for f in fields(cls):
        avro = schema_fields[f.name]
        expected = _python_type(avro["type"])
        actual = _normalise(hints[f.name])
        assert actual == expected, f"{cls.__name__}.{f.name}: {actual} vs {avro['type']}"
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        if f.name in ("event_id", "occurred_at"):
            assert has_default and "default" not in avro  # generated, but always on the wire
        else:
            assert has_default == ("default" in avro), f"{cls.__name__}.{f.name} default"
        if "default" in avro:
            value = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            assert value == avro["default"], f"{cls.__name__}.{f.name} default"


def test_service_mode_matches_the_settings_mode() -> None:
    assert [m.value for m in ServiceMode] == [m.value for m in Mode]


# -- evolution ---------------------------------------------------------------------------------


def compatibility_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why `new` is not a backward and forward compatible successor of `old` (empty if it is).

    ragstream's rule is stricter than Avro's: a new version keeps every field with the same
    type and only adds fields that have a default.
    """
    problems = []
    if (old["name"], old.get("namespace")) != (new["name"], new.get("namespace")):
        problems.append("the record's full name changed")
    old_fields = {f["name"]: f for f in old["fields"]}
    new_fields = {f["name"]: f for f in new["fields"]}
    for name, field in old_fields.items():
        if name not in new_fields:
            problems.append(f"field {name} was removed")
        elif _strip_docs(field["type"]) != _strip_docs(new_fields[name]["type"]):
            problems.append(f"field {name} changed type")
        elif field.get("default", MISSING) != new_fields[name].get("default", MISSING):
            problems.append(f"field {name} changed its default")
    for name, field in new_fields.items():
        if name not in old_fields and "default" not in field:
            problems.append(f"field {name} was added without a default")
    return problems


def _sample(avro: Any) -> Any:
    """A non-default value of an Avro type, to push through schema resolution."""
    if isinstance(avro, list):
        return _sample(next(t for t in avro if t != "null"))
    if isinstance(avro, dict):
        logical = avro.get("logicalType")
        if logical == "uuid":
            return uuid.uuid4()
        if logical == "timestamp-millis":
            return datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
        if logical == "decimal":
            return Decimal("1.5")
        kind = avro["type"]
        if kind == "map":
            return {"k": _sample(avro["values"])}
        if kind == "array":
            return [_sample(avro["items"])]
        if kind == "enum":
            return avro["symbols"][-1]
        return _sample(kind)
    return {"string": "s", "long": 7, "int": 7, "boolean": True, "bytes": b"b"}[avro]


def _round_trip(writer: dict[str, Any], reader: dict[str, Any]) -> dict[str, Any]:
    record = {f["name"]: _sample(f["type"]) for f in writer["fields"]}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(writer), record)
    buf.seek(0)
    result = schemaless_reader(buf, parse_schema(writer), parse_schema(reader))
    assert isinstance(result, dict)
    reader_fields = {f["name"]: f for f in reader["fields"]}
    for name, value in result.items():
        expected = record[name] if name in record else reader_fields[name]["default"]
        assert value == expected, name
    assert set(result) == set(reader_fields)
    return result


def _consecutive_pairs() -> list[tuple[SchemaInfo, SchemaInfo]]:
    codec = Codec()
    names = sorted({s.name for s in codec.schemas})
    return [
        (a, b)
        for n in names
        for a, b in zip(codec.versions(n), codec.versions(n)[1:], strict=False)
    ]


PAIRS = _consecutive_pairs()


def test_there_is_at_least_one_evolution_to_check() -> None:
    assert ("DocumentUploaded", 1, 2) in [(a.name, a.version, b.version) for a, b in PAIRS]


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=lambda s: s.label)
def test_consecutive_versions_are_backward_and_forward_compatible(
    old: SchemaInfo, new: SchemaInfo
) -> None:
    assert compatibility_problems(old.raw, new.raw) == []
    assert old.fingerprint != new.fingerprint
    _round_trip(old.raw, new.raw)  # backward: the new reader reads old records
    _round_trip(new.raw, old.raw)  # forward: an old reader reads new records


def _base() -> dict[str, Any]:
    return load_schema(SCHEMAS / "DocumentUploaded.v1.avsc").raw


def test_the_compatibility_check_catches_bad_evolutions() -> None:
    old = _base()
    no_default = _base()
    no_default["fields"].append({"name": "priority", "type": "int", "doc": "d"})
    assert compatibility_problems(old, no_default) == ["field priority was added without a default"]
    retyped = _base()
    next(f for f in retyped["fields"] if f["name"] == "size_bytes")["type"] = "int"  # was long
    assert compatibility_problems(old, retyped) == ["field size_bytes changed type"]
    removed = _base()
    removed["fields"] = [f for f in removed["fields"] if f["name"] != "filename"]
    assert compatibility_problems(old, removed) == ["field filename was removed"]
    renamed = _base()
    renamed["name"] = "DocumentReceived"
    assert compatibility_problems(old, renamed) == ["the record's full name changed"]
    good = _base()
    good["fields"].append({"name": "priority", "type": "int", "doc": "d", "default": 0})
    assert compatibility_problems(old, good) == []


# -- the README --------------------------------------------------------------------------------

README = (SCHEMAS / "README.md").read_text()


def test_readme_fingerprint_table_matches_the_files(codec: Codec) -> None:
    rows = re.findall(
        r"^\| (\w+)\.v(\d+) \| `0x([0-9a-f]{16})` \| `([0-9A-F ]+)` \|$", README, re.M
    )
    documented = {(name, int(v)): (int(fp, 16), bytes.fromhex(hdr)) for name, v, fp, hdr in rows}
    actual = {(s.name, s.version): (s.fingerprint, s.header) for s in codec.schemas}
    assert documented == actual


def test_readme_python_recipe_produces_what_ragstream_decodes(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    (recipe,) = re.findall(r"```python\n(# recipe:.*?)```", README, re.S)
    monkeypatch.chdir(SCHEMAS.parent)
    namespace: dict[str, Any] = {}
    exec(compile(recipe, "schemas/README.md", "exec"), namespace)
    key, value, headers = namespace["encode_upload"](
        b"# Hello\n", "hello.md", "text/markdown", "acme"
    )
    event = codec.decode(value)
    assert isinstance(event, DocumentUploaded)
    assert key == event.document_id.encode()
    assert headers == codec.headers_for(event)
    assert (
        event.content == b"# Hello\n" and event.tenant_id == "acme" and event.source_system == "crm"
    )
    # ...and what the parse stage lets in at the door.
    check_key(key, event.document_id)
    check_upload(event, max_size_bytes=len(b"# Hello\n"))
