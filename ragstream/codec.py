"""The Avro codec: events to Avro single-object encoded bytes and back.

Wire format (Avro spec, "Single-object encoding"): `C3 01`, the writer schema's 8-byte
CRC-64-AVRO fingerprint of its Parsing Canonical Form, little-endian, then the Avro binary body.
A reader finds the writer schema by fingerprint among every version in `schemas/` and resolves
it to the newest version of the same record, so old records keep decoding.

Errors are translated here, at the boundary: bytes that are not a known event raise
`DecodeError` (a poison pill); an event or record that does not fit its schema raises
`PermanentError` naming the field. Nothing from fastavro, struct or EOF escapes.
"""

from __future__ import annotations

import copy
import io
import json
import re
import types
import typing
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from operator import attrgetter
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.types import Schema
from fastavro.validation import ValidationError, validate

from ragstream.errors import ConfigError, DecodeError, PermanentError
from ragstream.events import EVENT_TYPES, Event
from ragstream.headers import event_headers
from ragstream.resources import schemas_dir

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
NAMESPACE = "ragstream.events"
_FILE_NAME = re.compile(r"^(?P<name>[A-Z][A-Za-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    """One version of one record, as loaded from `schemas/<name>.v<version>.avsc`."""

    name: str
    version: int
    path: Path
    raw: dict[str, Any]
    parsed: Schema
    canonical: str
    fingerprint: int  # the unsigned 64-bit CRC-64-AVRO value (Java's parsingFingerprint64)
    header: bytes  # C3 01 + the fingerprint, little-endian
    fields: tuple[str, ...]
    checks: tuple[tuple[str, str, Any], ...]  # (field, logical type, parameter) checked on write

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def single_object_header(schema: Schema) -> bytes:
    """`C3 01` + the CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form."""
    canonical = to_parsing_canonical_form(parse_schema(schema))
    # fastavro's hex string already spells the fingerprint's bytes little-endian (wire order).
    return MAGIC + bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


def load_schema(path: Path) -> SchemaInfo:
    """Parse one `.avsc` file; a wrong name, namespace or schema raises ConfigError."""
    match = _FILE_NAME.match(path.name)
    if match is None:
        raise ConfigError(f"{path}: schema files are named <RecordName>.v<N>.avsc")
    name, version = match["name"], int(match["version"])
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        parsed = parse_schema(raw)
        canonical = to_parsing_canonical_form(parsed)
        header = single_object_header(parsed)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path}: not a valid Avro schema: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("type") != "record":
        raise ConfigError(f"{path}: top-level type must be a record")
    if raw.get("name") != name or raw.get("namespace") != NAMESPACE:
        raise ConfigError(f"{path}: record must be named {name!r} in namespace {NAMESPACE!r}")
    return SchemaInfo(
        name=name,
        version=version,
        path=path,
        raw=raw,
        parsed=parsed,
        canonical=canonical,
        fingerprint=int.from_bytes(header[2:], "little"),
        header=header,
        fields=tuple(f["name"] for f in raw["fields"]),
        checks=tuple(_logical_checks(raw["fields"])),
    )


def _logical_checks(schema_fields: list[dict[str, Any]]) -> typing.Iterator[tuple[str, str, Any]]:
    """Logical types fastavro would write wrongly or silently: uuid, timestamps, decimal range."""
    for f in schema_fields:
        branches = f["type"] if isinstance(f["type"], list) else [f["type"]]
        for t in branches:
            logical = t.get("logicalType") if isinstance(t, dict) else None
            if logical == "decimal":
                limit = Decimal(10) ** (t["precision"] - t.get("scale", 0))
                yield f["name"], logical, (t.get("scale", 0), limit)
            elif logical in ("uuid", "timestamp-millis", "timestamp-micros"):
                yield f["name"], logical, None


def _enum_fields(cls: type[Event]) -> tuple[tuple[str, type[StrEnum]], ...]:
    """Fields typed as a StrEnum (or StrEnum | None): Avro gives str, the class wants the enum."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is typing.ClassVar:
            continue
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, StrEnum):
                out.append((name, arg))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _EventBinding:
    cls: type[Event]
    schema: SchemaInfo
    getter: attrgetter[tuple[Any, ...]]
    enums: tuple[tuple[str, type[StrEnum]], ...]


class Codec:
    """Encodes and decodes ragstream events. Build once (it parses every schema) and share it."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        event_types: Mapping[str, type[Event]] = EVENT_TYPES,
    ) -> None:
        directory = directory or schemas_dir()
        infos = [load_schema(p) for p in sorted(directory.glob("*.avsc"))]
        if not infos:
            raise ConfigError(f"no *.avsc schemas in {directory}")
        self._versions: dict[str, list[SchemaInfo]] = {}
        self._by_fingerprint: dict[bytes, SchemaInfo] = {}
        for info in sorted(infos, key=lambda i: (i.name, i.version)):
            clash = self._by_fingerprint.get(info.header[2:])
            if clash is not None:
                raise ConfigError(f"{info.path} and {clash.path} have the same canonical form")
            self._by_fingerprint[info.header[2:]] = info
            self._versions.setdefault(info.name, []).append(info)
        for name, versions in self._versions.items():
            if [v.version for v in versions] != list(range(1, len(versions) + 1)):
                raise ConfigError(f"{name}: schema versions must run 1..N without gaps")
        self._bindings: dict[str, _EventBinding] = {}
        for name, cls in event_types.items():
            newest = self.newest(name) if name in self._versions else None
            if newest is None:
                raise ConfigError(
                    f"event {cls.__name__} has no schema {name}.v1.avsc in {directory}"
                )
            names = tuple(f.name for f in fields(cls))
            if names != newest.fields:
                raise ConfigError(f"{cls.__name__} fields {names} differ from {newest.label}")
            self._bindings[name] = _EventBinding(cls, newest, attrgetter(*names), _enum_fields(cls))
        # Fields a reader fills from a (shared, mutable) default: copied per decode.
        self._copy_on_resolve: dict[tuple[bytes, int], tuple[tuple[str, Any], ...]] = {}
        for versions in self._versions.values():
            for writer in versions:
                for reader in versions:
                    self._copy_on_resolve[(writer.header[2:], reader.version)] = tuple(
                        (f["name"], f["default"])
                        for f in reader.raw["fields"]
                        if f["name"] not in writer.fields
                        and isinstance(f.get("default"), dict | list)
                    )

    # -- schemas ----------------------------------------------------------------------------

    @property
    def schemas(self) -> list[SchemaInfo]:
        """Every loaded schema, by record name then version."""
        return [info for versions in self._versions.values() for info in versions]

    def versions(self, name: str) -> list[SchemaInfo]:
        try:
            return list(self._versions[name])
        except KeyError:
            raise PermanentError(f"no schema for record {name!r}") from None

    def newest(self, name: str) -> SchemaInfo:
        return self.versions(name)[-1]

    def schema(self, name: str, version: int | None = None) -> SchemaInfo:
        versions = self.versions(name)
        if version is None:
            return versions[-1]
        if not 1 <= version <= len(versions):
            raise PermanentError(f"{name} has versions 1..{len(versions)}, not {version}")
        return versions[version - 1]

    def writer_schema_of(self, data: bytes) -> SchemaInfo:
        """The schema that wrote `data`, from its header alone. DecodeError if there is none."""
        if len(data) < HEADER_LEN:
            what = "empty" if not data else f"{len(data)} bytes, too short"
            raise DecodeError(
                f"not a ragstream event: {what} (the Avro header is {HEADER_LEN} bytes)"
            )
        if data[:2] != MAGIC:
            raise DecodeError(
                f"not a ragstream event: expected Avro single-object magic C3 01, got "
                f"{bytes(data[:2]).hex(' ').upper()}"
            )
        info = self._by_fingerprint.get(bytes(data[2:HEADER_LEN]))
        if info is None:
            fp = int.from_bytes(data[2:HEADER_LEN], "little")
            raise DecodeError(
                f"unknown schema fingerprint 0x{fp:016x} (not one of {len(self._by_fingerprint)} "
                f"known schemas; written by a newer producer, or not a ragstream event)"
            )
        return info

    def event_type_of(self, data: bytes) -> str:
        """The record name (event type) of encoded bytes, without decoding the body."""
        return self.writer_schema_of(data).name

    # -- records ----------------------------------------------------------------------------

    def encode_record(
        self, name: str, record: Mapping[str, Any], version: int | None = None
    ) -> bytes:
        """Encode a plain dict with one version (default the newest) of a record's schema."""
        return self._write(self.schema(name, version), record)

    def decode_record(
        self, data: bytes, *, reader_version: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Decode to (record name, dict), read as `reader_version` (default the newest)."""
        writer = self.writer_schema_of(data)
        reader = self.schema(writer.name, reader_version)
        return writer.name, self._read(data, writer, reader)

    # -- events -----------------------------------------------------------------------------

    def encode(self, event: Event) -> bytes:
        """Encode an event with the newest version of its schema."""
        binding = self._bindings.get(event.EVENT_TYPE)
        if binding is None or type(event) is not binding.cls:
            raise PermanentError(f"{type(event).__name__} is not a registered event type")
        return self._write(
            binding.schema, dict(zip(binding.schema.fields, binding.getter(event), strict=True))
        )

    def decode(self, data: bytes) -> Event:
        """Decode bytes from any known version into the newest event dataclass."""
        writer = self.writer_schema_of(data)
        binding = self._bindings.get(writer.name)
        if binding is None:
            raise DecodeError(f"{writer.label} is a known schema but not an event type")
        record = self._read(data, writer, binding.schema)
        try:
            for name, enum in binding.enums:
                if record[name] is not None:
                    record[name] = enum(record[name])
            return binding.cls(**record)
        except (TypeError, ValueError, KeyError) as exc:
            raise DecodeError(
                f"{writer.label} does not build a {binding.cls.__name__}: {exc}"
            ) from exc

    def headers_for(self, event: Event) -> list[tuple[str, bytes]]:
        """Kafka headers for an event: its type and, where it has one, its correlation id."""
        correlation = getattr(event, "correlation_id", None)
        return event_headers(
            event.EVENT_TYPE, correlation if isinstance(correlation, str) else None
        )

    # -- internals --------------------------------------------------------------------------

    def _write(self, info: SchemaInfo, record: Mapping[str, Any]) -> bytes:
        unknown = record.keys() - set(info.fields)
        if unknown:
            raise PermanentError(f"{info.label} has no field {', '.join(sorted(unknown))}")
        for name, logical, param in info.checks:
            _check_logical(info, name, logical, param, record.get(name))
        out = io.BytesIO()
        out.write(info.header)
        try:
            schemaless_writer(out, info.parsed, dict(record), strict_allow_default=True)
        except Exception as exc:
            raise PermanentError(_explain(info, record, exc)) from exc
        return out.getvalue()

    def _read(self, data: bytes, writer: SchemaInfo, reader: SchemaInfo) -> dict[str, Any]:
        body = io.BytesIO(data)
        body.seek(HEADER_LEN)
        try:
            if reader is writer:
                record = schemaless_reader(body, writer.parsed, None)
            else:
                record = schemaless_reader(body, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeError, ...
            raise DecodeError(
                f"corrupt {writer.label} body ({len(data) - HEADER_LEN} bytes): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        trailing = len(data) - body.tell()
        if trailing:
            raise DecodeError(f"{trailing} trailing bytes after a {writer.label} record")
        if not isinstance(record, dict):
            raise DecodeError(f"{writer.label} body did not decode to a record")
        for name, default in self._copy_on_resolve[(writer.header[2:], reader.version)]:
            record[name] = copy.deepcopy(default)
        return record


def _check_logical(info: SchemaInfo, name: str, logical: str, param: Any, value: Any) -> None:
    where = f"{info.label} field {name}"
    if value is None:
        return
    if logical == "uuid" and not isinstance(value, uuid.UUID):
        try:
            uuid.UUID(str(value))
        except ValueError:
            raise PermanentError(f"{where}: {value!r} is not a UUID") from None
    elif logical.startswith("timestamp") and isinstance(value, datetime) and value.tzinfo is None:
        raise PermanentError(f"{where}: naive datetime {value.isoformat()}; use an aware (UTC) one")
    elif logical == "decimal" and isinstance(value, Decimal):
        scale, limit = param
        exponent = value.as_tuple().exponent
        if not value.is_finite() or abs(value) >= limit:
            raise PermanentError(f"{where}: {value} is out of range (|value| < {limit})")
        if isinstance(exponent, int) and -exponent > scale:
            raise PermanentError(f"{where}: {value} has more than {scale} decimal places")


def _explain(info: SchemaInfo, record: Mapping[str, Any], exc: Exception) -> str:
    """Say which field did not fit, using fastavro's validator to find it."""
    missing = [
        f["name"] for f in info.raw["fields"] if f["name"] not in record and "default" not in f
    ]
    if missing:
        return f"{info.label} is missing required field {', '.join(missing)}"
    try:
        validate(dict(record), info.parsed, raise_errors=True)
    except ValidationError as invalid:
        problems = [
            f"field {(e.field or '?').rsplit('.', 1)[-1]}: {e.datum!r:.80} is not "
            f"{_type_name(e.schema)}"
            for e in invalid.errors
        ]
        return f"{info.label} does not fit its schema: {'; '.join(problems)}"
    except Exception:
        pass
    return f"{info.label} does not fit its schema: {type(exc).__name__}: {exc}"


def _type_name(schema: Any) -> str:
    if isinstance(schema, dict):
        return str(schema.get("logicalType") or schema.get("name") or schema.get("type"))
    if isinstance(schema, list):
        return " | ".join(_type_name(s) for s in schema)
    return str(schema)


__all__ = ["HEADER_LEN", "MAGIC", "Codec", "SchemaInfo", "load_schema", "single_object_header"]
