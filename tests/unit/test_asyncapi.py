"""schemas/asyncapi.yaml: a valid AsyncAPI 3 document (the AsyncAPI parser says so) that
describes every topic, header key, consumer group and Avro schema the code has, and no other.

The document is written by hand; `problems()` holds it to the code (`ragstream/topology.py`,
the groups `ragstream status` reads, `schemas/*.avsc`), so a topic, header or group added to
the code and not to the document fails here, named.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ragstream import topology as topology_module
from ragstream.events import EVENT_TYPES
from ragstream.settings import KafkaSettings
from ragstream.status import GroupSpec, flow_groups
from ragstream.topology import (
    CONTROL_CIRCUIT,
    CONTROL_MODE,
    CONTROL_THROTTLE,
    H_ATTEMPT,
    H_DUE_AT,
    H_ERR_PREFIX,
    TopicSpec,
    Topology,
)

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "schemas" / "asyncapi.yaml"
TOOL = ROOT / "tools" / "asyncapi"
AVRO = "application/vnd.apache.avro;version=1.9.0"
PREFIX = "{prefix}"

Doc = dict[str, Any]


@dataclass(frozen=True)
class Expected:
    """What the code says the document must describe."""

    topology: Topology
    topics: tuple[TopicSpec, ...]
    groups: tuple[GroupSpec, ...]
    headers: dict[str, str]  # header key -> the constant's name in ragstream/topology.py
    control_kinds: frozenset[str]
    schema_files: frozenset[str]
    records: frozenset[str]
    bootstrap: str

    @classmethod
    def from_code(cls) -> Expected:
        kafka = KafkaSettings()
        topology = Topology(kafka.topic_prefix)
        headers = {
            value: name
            for name, value in vars(topology_module).items()
            if name.startswith("H_") and name != "H_ERR_PREFIX" and isinstance(value, str)
        }
        return cls(
            topology=topology,
            topics=tuple(topology.topics(kafka.partitions)),
            groups=tuple(flow_groups(topology)),
            headers=headers,
            control_kinds=frozenset({CONTROL_THROTTLE, CONTROL_MODE, CONTROL_CIRCUIT}),
            schema_files=frozenset(p.name for p in (ROOT / "schemas").glob("*.avsc")),
            records=frozenset(EVENT_TYPES),
            bootstrap=kafka.bootstrap_servers,
        )


# -- reading the document ----------------------------------------------------------------------


def resolve(doc: Doc, node: Any) -> Any:
    """`node`, or what its local `$ref` (`#/...`) points at, followed to the end; {} where it
    points at nothing (the parser reports that; here it reads as an empty object)."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if not ref.startswith("#/"):
            return node
        node = doc
        for part in ref[2:].split("/"):
            key = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or key not in node:
                return {}
            node = node[key]
    return node


def header_names(doc: Doc, schema: Any) -> set[str]:
    """The header keys a headers schema names, through `allOf`."""
    schema = resolve(doc, schema)
    if not isinstance(schema, dict):
        return set()
    names = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        names |= header_names(doc, part)
    return names


def header_schema(doc: Doc, schema: Any, name: str) -> dict[str, Any] | None:
    schema = resolve(doc, schema)
    if not isinstance(schema, dict):
        return None
    if name in schema.get("properties", {}):
        found: dict[str, Any] = schema["properties"][name]
        return found
    for part in schema.get("allOf", []):
        if (found_in_part := header_schema(doc, part, name)) is not None:
            return found_in_part
    return None


def address(doc: Doc, channel: dict[str, Any], prefix: str) -> str:
    return str(channel.get("address", "")).replace(PREFIX, prefix)


def messages_of(doc: Doc, channel: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for message in channel.get("messages", {}).values():
        yield resolve(doc, message)


def avro_file(doc: Doc, message: dict[str, Any]) -> str | None:
    """The `.avsc` file a message's payload references, or None for another payload."""
    payload = resolve(doc, message.get("payload"))
    if not isinstance(payload, dict) or "schemaFormat" not in payload:
        return None
    ref = str(payload.get("schema", {}).get("$ref", ""))
    return ref.removeprefix("./")


def key_schema(doc: Doc, message: dict[str, Any]) -> dict[str, Any]:
    kafka = resolve(doc, resolve(doc, message.get("bindings", {})).get("kafka", {}))
    found: dict[str, Any] = resolve(doc, kafka.get("key", {}))
    return found


def operations(doc: Doc) -> Iterator[tuple[str, dict[str, Any], set[str], str | None]]:
    """(id, operation, tag names, consumer group id or None) of every operation."""
    for op_id, op in doc.get("operations", {}).items():
        tags = {resolve(doc, t).get("name") for t in op.get("tags", [])}
        kafka = resolve(doc, resolve(doc, op.get("bindings", {})).get("kafka", {}))
        group = resolve(doc, kafka.get("groupId", {})).get("const")
        yield op_id, op, tags, group


# -- the comparison ----------------------------------------------------------------------------


Channels = dict[str, dict[str, Any]]  # topic name (default prefix) -> channel


def problems(doc: Doc, expected: Expected) -> list[str]:
    """Every way the document and the code disagree, each a sentence naming the thing."""
    by_address = {
        address(doc, channel, expected.topology.prefix): channel
        for channel in doc.get("channels", {}).values()
    }
    return [
        *topic_problems(doc, expected, by_address),
        *header_problems(doc, expected, by_address),
        *group_problems(doc, expected),
        *payload_problems(doc, expected, by_address),
    ]


def topic_problems(doc: Doc, expected: Expected, by_address: Channels) -> list[str]:
    """One channel per topic, named with the prefix parameter, with its partitions and
    configuration; a server at the default bootstrap address."""
    out: list[str] = []
    prefix = expected.topology.prefix
    for channel_id, channel in doc.get("channels", {}).items():
        raw = str(channel.get("address", ""))
        if not raw.startswith(PREFIX + "."):
            out.append(f"channel {channel_id}: address {raw!r} does not start with {PREFIX}.")
        param = resolve(doc, channel.get("parameters", {}).get("prefix"))
        if not isinstance(param, dict) or param.get("default") != prefix:
            out.append(f"channel {channel_id}: parameter prefix must default to {prefix!r}")
    for spec in expected.topics:
        topic_channel = by_address.get(spec.name)
        if topic_channel is None:
            out.append(f"topic {spec.name} (ragstream/topology.py) has no channel in the document")
            continue
        kafka = resolve(doc, topic_channel.get("bindings", {})).get("kafka", {})
        if kafka.get("partitions") != spec.partitions:
            out.append(
                f"topic {spec.name}: {kafka.get('partitions')} partitions in the document, "
                f"{spec.partitions} in the code"
            )
        config = {
            k: ",".join(v) if isinstance(v, list) else str(v)
            for k, v in kafka.get("topicConfiguration", {}).items()
        }
        if config != spec.config:
            out.append(
                f"topic {spec.name}: configuration {config} in the document, {spec.config} "
                "in the code"
            )
    for name in sorted(by_address.keys() - {s.name for s in expected.topics}):
        out.append(f"channel address {name} is no topic of ragstream/topology.py")
    hosts = {s.get("host") for s in doc.get("servers", {}).values()}
    if expected.bootstrap not in hosts:
        out.append(f"no server at {expected.bootstrap} (kafka.bootstrap_servers' default)")
    return out


def header_problems(doc: Doc, expected: Expected, by_address: Channels) -> list[str]:
    """Exactly the header keys of ragstream/topology.py; the retry and error headers on the
    retry and dead-letter topics; the failing consumer's names; the control keys' kinds."""
    out: list[str] = []
    topology = expected.topology
    headers: set[str] = set()
    for message in doc.get("components", {}).get("messages", {}).values():
        headers |= header_names(doc, resolve(doc, message).get("headers"))
    for key in sorted(expected.headers.keys() - headers):
        out.append(f"header {key} ({expected.headers[key]}) is in no message's headers")
    for key in sorted(headers - expected.headers.keys()):
        out.append(f"header {key} is described but ragstream/topology.py defines no such key")

    errors = {k for k in expected.headers if k.startswith(H_ERR_PREFIX)}
    must = {topology.dlq: errors} | {
        topology.retry(g.name): {H_ATTEMPT, H_DUE_AT} for g in expected.groups
    }
    for topic, keys in must.items():
        for message in messages_of(doc, by_address.get(topic, {})):
            missing = keys - header_names(doc, message.get("headers"))
            if missing:
                out.append(f"topic {topic}: message {message.get('title')} lacks {sorted(missing)}")

    names = sorted(g.name for g in expected.groups)
    enums = set()
    for message in messages_of(doc, by_address.get(topology.dlq, {})):
        stage = header_schema(doc, message.get("headers"), f"{H_ERR_PREFIX}stage") or {}
        enums.add(tuple(sorted(stage.get("enum", []))))
    if enums != {tuple(names)}:
        out.append(f"header {H_ERR_PREFIX}stage on {topology.dlq}: the enum must be {names}")

    kinds = set()
    for message in messages_of(doc, by_address.get(topology.control, {})):
        kinds.add(str(key_schema(doc, message).get("pattern", "")).lstrip("^").split(":")[0])
    if kinds != expected.control_kinds:
        out.append(
            f"control keys: kinds {sorted(kinds)}, the code has {sorted(expected.control_kinds)}"
        )
    return out


def group_problems(doc: Doc, expected: Expected) -> list[str]:
    """Each group's receive operations (by tag) read exactly its topics under its group id;
    its send operations include its retry topic, the DLQ and its output topic."""
    out: list[str] = []
    topology = expected.topology
    prefix = topology.prefix
    ops = list(operations(doc))
    known = {g.group_id for g in expected.groups}
    for op_id, _op, _tags, group in ops:
        if group is not None and group not in known:
            out.append(f"operation {op_id}: consumer group {group} is no group of the code")
    for g in expected.groups:
        receives, sends = set(), set()
        for op_id, op, tags, group in ops:
            if g.name not in tags:
                continue
            target = address(doc, resolve(doc, op.get("channel")), prefix)
            if op.get("action") == "receive":
                receives.add(target)
                if group != g.group_id:
                    out.append(f"operation {op_id}: groupId {group}, expected {g.group_id}")
            else:
                sends.add(target)
        if receives != set(g.topics):
            out.append(
                f"consumer group {g.group_id} reads {sorted(g.topics)} in the code, "
                f"{sorted(receives)} in the document"
            )
        output = topology.output_topic(g.name)
        should_send = {topology.retry(g.name), topology.dlq} | ({output} if output else set())
        for topic in sorted(should_send - sends):
            out.append(f"consumer group {g.group_id} writes {topic}: no send operation says so")
    return out


def payload_problems(doc: Doc, expected: Expected, by_address: Channels) -> list[str]:
    """Every .avsc file is a payload under its record's name; retry topics carry their input
    topics' records, the DLQ every group's inputs and undecodable bytes."""
    out: list[str] = []
    topology = expected.topology
    referenced: set[str] = set()
    for message_id, raw_message in doc.get("components", {}).get("messages", {}).items():
        message = resolve(doc, raw_message)
        file = avro_file(doc, message)
        if file is None:
            continue
        payload = resolve(doc, message.get("payload"))
        if payload.get("schemaFormat") != AVRO:
            out.append(f"message {message_id}: schemaFormat must be {AVRO}")
        if file not in expected.schema_files:
            out.append(f"message {message_id}: {file} is not in schemas/")
            continue
        referenced.add(file)
        record = file.split(".")[0]
        if message.get("name") != record:
            out.append(f"message {message_id}: name {message.get('name')!r}, record {record}")
    for file in sorted(expected.schema_files - referenced):
        out.append(f"schema {file} is the payload of no message")
    records = {f.split(".")[0] for f in referenced}
    for record in sorted(expected.records - records):
        out.append(f"event {record} (ragstream/events.py) is the payload of no message")

    # Retry and dead-letter topics carry their inputs' records.
    def payloads(*topics: str) -> set[str]:
        """The Avro files of the topics' messages ("bytes" for a payload that is not Avro)."""
        channels = [by_address.get(t, {}) for t in topics]
        return {avro_file(doc, m) or "bytes" for c in channels for m in messages_of(doc, c)}

    all_inputs = {"bytes"}  # a poison pill: the bytes as they came
    for g in expected.groups:
        retry = topology.retry(g.name)
        inputs = payloads(*(t for t in g.topics if t != retry))
        all_inputs |= inputs
        if payloads(retry) != inputs:
            out.append(
                f"topic {retry} carries {sorted(payloads(retry))}, its input {sorted(inputs)}"
            )
    if payloads(topology.dlq) != all_inputs:
        out.append(
            f"topic {topology.dlq} carries {sorted(payloads(topology.dlq))}, the groups' inputs "
            f"and poison pills are {sorted(all_inputs)}"
        )
    return out


# -- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> Doc:
    loaded: Doc = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def expected() -> Expected:
    return Expected.from_code()


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    """Run the AsyncAPI parser (tools/asyncapi/validate.mjs) on `path`."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the AsyncAPI document cannot be validated")
    if not (TOOL / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.fail(f"the AsyncAPI parser is not installed: run `npm ci` in {TOOL} (make tools)")
    return subprocess.run(
        [node, str(TOOL / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_asyncapi_parser_accepts_the_document() -> None:
    result = validate(DOCUMENT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid AsyncAPI 3.0.0" in result.stdout
    said = [line for line in result.stdout.splitlines() if line.startswith(("error", "warning"))]
    assert said == [], result.stdout


def test_the_validator_rejects_a_broken_avro_payload(tmp_path: Path) -> None:
    # The parser converts AsyncAPI 3 Avro payloads without validating them; validate.mjs does.
    for path in (ROOT / "schemas").glob("*.avsc"):
        shutil.copy(path, tmp_path)
    shutil.copy(DOCUMENT, tmp_path)
    broken = json.loads((tmp_path / "CostUsage.v1.avsc").read_text())
    broken["fields"][0]["type"] = "no_such_type"
    (tmp_path / "CostUsage.v1.avsc").write_text(json.dumps(broken))
    result = validate(tmp_path / "asyncapi.yaml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no_such_type" in result.stdout


def test_the_document_matches_the_code(document: Doc, expected: Expected) -> None:
    assert problems(document, expected) == []


def test_the_code_side_is_what_the_document_is_checked_against(expected: Expected) -> None:
    # Guards the guard: the expectations are read from the code, not empty by accident.
    assert len(expected.topics) == 11 and len(expected.groups) == 4
    assert {"ragstream.event-type", "ragstream.redrive.of", H_ATTEMPT} <= expected.headers.keys()
    assert "DocumentUploaded.v2.avsc" in expected.schema_files


def _without_channel(topic: str) -> Callable[[Doc, Expected], tuple[Doc, Expected]]:
    def change(doc: Doc, exp: Expected) -> tuple[Doc, Expected]:
        doc["channels"] = {
            k: v for k, v in doc["channels"].items() if address(doc, v, "ragstream") != topic
        }
        return doc, exp

    return change


def _edit(path: str, value: Any) -> Callable[[Doc, Expected], tuple[Doc, Expected]]:
    def change(doc: Doc, exp: Expected) -> tuple[Doc, Expected]:
        *parents, last = path.split("/")
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value
        return doc, exp

    return change


def _expect(**changes: Any) -> Callable[[Doc, Expected], tuple[Doc, Expected]]:
    def change(doc: Doc, exp: Expected) -> tuple[Doc, Expected]:
        return doc, dataclasses.replace(exp, **{k: f(exp) for k, f in changes.items()})

    return change


DRIFT = {
    "a topic missing from the document": (
        _without_channel("ragstream.retry.cost"),
        "topic ragstream.retry.cost (ragstream/topology.py) has no channel",
    ),
    "a new topic in the code": (
        _expect(topics=lambda e: (*e.topics, TopicSpec("ragstream.documents.summarized", 12, {}))),
        "topic ragstream.documents.summarized (ragstream/topology.py) has no channel",
    ),
    "a new header key in the code": (
        _expect(headers=lambda e: {**e.headers, "ragstream.trace-parent": "H_TRACE_PARENT"}),
        "header ragstream.trace-parent (H_TRACE_PARENT) is in no message's headers",
    ),
    "a header the code does not set": (
        _edit("components/schemas/EventHeaders/properties/ragstream.tenant", {"type": "string"}),
        "header ragstream.tenant is described but ragstream/topology.py defines no such key",
    ),
    "a new consumer group in the code": (
        _expect(
            groups=lambda e: (
                *e.groups,
                GroupSpec("summarize", "ragstream-summarize", ("ragstream.documents.embedded",)),
            )
        ),
        "consumer group ragstream-summarize reads ['ragstream.documents.embedded'] in the code, "
        "[] in the document",
    ),
    "a group id spelled otherwise": (
        _edit("components/operationBindings/chunkGroup/kafka/groupId/const", "chunker"),
        "consumer group chunker is no group of the code",
    ),
    "partitions out of step": (
        _edit("channels/deadLetters/bindings/kafka/partitions", 6),
        "topic ragstream.dlq: 6 partitions in the document, 3 in the code",
    ),
    "a cleanup policy out of step": (
        _edit("channels/control/bindings/kafka/topicConfiguration/cleanup.policy", ["delete"]),
        "topic ragstream.control: configuration",
    ),
    "a schema file no message carries": (
        _expect(schema_files=lambda e: e.schema_files | {"DocumentSummarized.v1.avsc"}),
        "schema DocumentSummarized.v1.avsc is the payload of no message",
    ),
    "a retry topic that lost a version": (
        _edit(
            "channels/parseRetry/messages",
            {"V2": {"$ref": "#/components/messages/RetryDocumentUploadedV2"}},
        ),
        "topic ragstream.retry.parse carries ['DocumentUploaded.v2.avsc'], its input "
        "['DocumentUploaded.v1.avsc', 'DocumentUploaded.v2.avsc']",
    ),
}


@pytest.mark.parametrize("case", DRIFT, ids=list(DRIFT))
def test_drift_between_the_code_and_the_document_is_named(
    case: str, document: Doc, expected: Expected
) -> None:
    change, message = DRIFT[case]
    doc, exp = change(copy.deepcopy(document), expected)
    found = problems(doc, exp)
    assert any(message in p for p in found), found
