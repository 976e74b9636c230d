"""What a backup keeps of Kafka: the groups' committed offsets, the topics' extents, and the
control topic's current state; and how a restore puts them back.

Topics and groups are saved under the backup's prefix and restored under the target's: the
part after the prefix (`documents.uploaded`, the group's stage) says which is which.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from ragstream.admin import admin_client, describe_group
from ragstream.codec import Codec
from ragstream.errors import DecodeError, RagstreamError
from ragstream.kafka_clients import started_or_explained
from ragstream.kafkaio import consumer, kafka_errors, patiently, started_producer
from ragstream.settings import Settings
from ragstream.status import flow_groups
from ragstream.topology import CONTROL_MODE, CONTROL_THROTTLE, Topology

Extents = dict[str, dict[int, tuple[int, int]]]  # topic -> partition -> (first offset, end)
# The control records a restore publishes again: modes and throttle states. Circuit states
# describe worker processes of the old stack, which are gone.
RESTORED_KINDS = (CONTROL_MODE, CONTROL_THROTTLE)


class RestoreRefused(RagstreamError):
    """The target is not one a restore may write to as it is (live workers, data in it)."""


@dataclass
class SavedGroup:
    name: str  # parse | chunk | embed | cost
    group_id: str
    state: str
    members: int
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)  # topic -> partition -> offset

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("name", "group_id", "state", "members")}
        out["offsets"] = {t: {str(p): o for p, o in ps.items()} for t, ps in self.offsets.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SavedGroup:
        offsets = {t: {int(p): int(o) for p, o in ps.items()} for t, ps in data["offsets"].items()}
        return cls(data["name"], data["group_id"], data["state"], data["members"], offsets)


@asynccontextmanager
async def _consumer(settings: Settings, group_id: str | None = None) -> AsyncIterator[Any]:
    client = await started_or_explained(
        settings.kafka, lambda: consumer(settings, group_id=group_id, auto_offset_reset="latest")
    )
    try:
        yield client
    finally:
        await client.stop()


async def read_groups(settings: Settings) -> list[SavedGroup]:
    """Every group of the flow: its state, live members and committed offsets."""
    out = []
    async with admin_client(settings) as admin:
        for spec in flow_groups(Topology(settings.kafka.topic_prefix)):
            with kafka_errors(f"reading consumer group {spec.group_id}"):
                group = await patiently(partial(describe_group, admin, spec.group_id))
                offsets = await patiently(partial(admin.list_consumer_group_offsets, spec.group_id))
            saved = SavedGroup(spec.name, spec.group_id, group.state, len(group.members))
            for tp, meta in sorted(offsets.items()):
                if meta.offset >= 0:
                    saved.offsets.setdefault(tp.topic, {})[tp.partition] = meta.offset
            out.append(saved)
    return out


async def extents(settings: Settings, topics: list[str] | None = None) -> Extents:
    """First and end offsets of every partition of `topics` (default: the flow's topics) that
    exist on the broker."""
    names = topics or [s.name for s in Topology(settings.kafka.topic_prefix).topics(1)]
    async with admin_client(settings) as admin:
        with kafka_errors("listing topics"):
            existing = set(await admin.list_topics())
            wanted = [n for n in names if n in existing]
            described = await admin.describe_topics(wanted) if wanted else []
    tps = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
    if not tps:
        return {}
    async with _consumer(settings) as consumer:
        with kafka_errors("reading the topics' offsets"):
            lows = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
    out: Extents = {}
    for tp in sorted(tps):
        out.setdefault(tp.topic, {})[tp.partition] = (lows[tp], ends[tp])
    return out


# -- the control topic -----------------------------------------------------------------------


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


async def read_control(settings: Settings) -> list[dict[str, Any]]:
    """The control topic's current state: the latest record per key (what compaction keeps),
    as written (key, value and headers in base64) and decoded for a reader of the file."""
    topic = Topology(settings.kafka.topic_prefix).control
    found = await extents(settings, [topic])
    latest: dict[bytes, Any] = {}
    if found:
        async with _consumer(settings) as consumer:
            tps = [TopicPartition(topic, p) for p in found[topic]]
            consumer.assign(tps)
            with kafka_errors(f"reading {topic}"):
                await consumer.seek_to_beginning(*tps)
                while [
                    tp for tp in tps if await consumer.position(tp) < found[topic][tp.partition][1]
                ]:
                    for records in (await consumer.getmany(timeout_ms=1000)).values():
                        for record in records:
                            latest[record.key or b""] = record
    codec = Codec()
    out = []
    for key, record in sorted(latest.items()):
        if record.value is None:  # a tombstone: the key's state was removed
            continue
        entry: dict[str, Any] = {
            "key": key.decode(errors="replace"),
            "key_b64": _b64(key),
            "value_b64": _b64(record.value),
            "headers": [[k, _b64(bytes(v))] for k, v in record.headers or ()],
            "event": None,
        }
        try:
            event = codec.decode(record.value)
            shown = {f.name: getattr(event, f.name) for f in fields(event)}
            entry["event"] = {
                "type": event.EVENT_TYPE,
                **json.loads(json.dumps(shown, default=str)),
            }
        except DecodeError:
            pass
        out.append(entry)
    return out


async def republish_control(settings: Settings, records: list[dict[str, Any]]) -> int:
    """Publish the saved modes and throttle states to the target's control topic, as they
    were written; running workers and the accountant read them like any other. How many."""
    chosen = [r for r in records if r["key"].split(":", 1)[0] in RESTORED_KINDS]
    if not chosen:
        return 0
    producer = await started_producer(settings)
    topic = Topology(settings.kafka.topic_prefix).control
    try:
        with kafka_errors(f"publishing to {topic}"):
            for r in chosen:
                headers = [(k, _unb64(v) or b"") for k, v in r["headers"]]
                await producer.send_and_wait(
                    topic, _unb64(r["value_b64"]), key=_unb64(r["key_b64"]), headers=headers
                )
    finally:
        await producer.stop()
    return len(chosen)


# -- committing the groups' offsets ----------------------------------------------------------


@dataclass(frozen=True)
class Clamped:
    """An offset the restore could not commit as saved: the log no longer holds it."""

    group_id: str
    topic: str
    partition: int
    saved: int
    committed: int | None  # None: the partition does not exist on the target
    why: str


@dataclass
class CommitReport:
    committed: dict[str, dict[TopicPartition, int]] = field(default_factory=dict)
    clamped: list[Clamped] = field(default_factory=list)


def renamed(name: str, old_prefix: str, new_prefix: str) -> str:
    """A topic of the backup's prefix under the target's."""
    return new_prefix + name[len(old_prefix) :] if name.startswith(old_prefix + ".") else name


async def refuse_live_groups(settings: Settings, groups: list[SavedGroup]) -> None:
    """A group's offsets can be set only while it has no members: refuse before changing
    anything when a worker of the target runs."""
    topology = Topology(settings.kafka.topic_prefix)
    async with admin_client(settings) as admin:
        for saved in groups:
            group_id = topology.group(saved.name)
            with kafka_errors(f"describing consumer group {group_id}"):
                group = await patiently(partial(describe_group, admin, group_id))
            if group.members:
                raise RestoreRefused(
                    f"consumer group {group_id} has {len(group.members)} live member(s): stop "
                    "the workers (`ragstream stack down workers`) before restoring; nothing "
                    "was restored"
                )


async def commit_offsets(
    settings: Settings, groups: list[SavedGroup], old_prefix: str
) -> CommitReport:
    """Commit the saved offsets for the target's groups. An offset beyond the log end (the
    topic's records are gone: another cluster, a re-created topic) is committed as the log end,
    so the group neither reads again what the log holds nor skips what is written next; one
    below the first offset (retention deleted the records) as the first offset."""
    topology = Topology(settings.kafka.topic_prefix)
    topics = sorted({renamed(t, old_prefix, topology.prefix) for g in groups for t in g.offsets})
    found = await extents(settings, topics)
    report = CommitReport()
    for saved in groups:
        group_id = topology.group(saved.name)
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for old_topic, partitions in saved.offsets.items():
            topic = renamed(old_topic, old_prefix, topology.prefix)
            for partition, offset in sorted(partitions.items()):
                extent = found.get(topic, {}).get(partition)
                if extent is None:
                    why = "the topic has no such partition"
                    report.clamped.append(Clamped(group_id, topic, partition, offset, None, why))
                    continue
                low, end = extent
                target = min(max(offset, low), end)
                if target != offset:
                    why = "beyond the log end" if offset > end else "below the first offset"
                    report.clamped.append(Clamped(group_id, topic, partition, offset, target, why))
                offsets[TopicPartition(topic, partition)] = OffsetAndMetadata(target, "")
        if not offsets:
            continue
        async with _consumer(settings, group_id) as consumer:
            consumer.assign(list(offsets))
            with kafka_errors(f"committing the offsets of {group_id}"):
                await consumer.commit(offsets)
        report.committed[group_id] = {tp: m.offset for tp, m in offsets.items()}
    return report
