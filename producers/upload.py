"""Publishing uploads: files and directories to `<prefix>.documents.uploaded`.

Bytes go to the tenant's area of the blob store (the local one, or the S3 bucket
`blobs.store` names) and the event carries a claim check (`source_uri` + `sha256`); files up to
`blobs.inline_limit_bytes` travel inline. Every event is
checked against the rules the parse stage enforces at the door (`ragstream.validation`) before
anything is stored or published. Other Python systems use `Uploader`; systems in other
languages follow `schemas/README.md`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiokafka.errors import KafkaError

from ragstream import kafkaio, tracing
from ragstream.blobs import blob_writer, sha256_hex
from ragstream.codec import Codec
from ragstream.content_types import detect_content_type
from ragstream.errors import InvalidEvent, PermanentError
from ragstream.events import DocumentUploaded
from ragstream.kafka_clients import unreachable
from ragstream.settings import Settings
from ragstream.topology import Topology
from ragstream.validation import check_upload, shown

log = structlog.get_logger(__name__)


class UploadRejected(PermanentError):
    """A file that will not be published: missing, empty, too large, of an unknown type, or
    breaking a rule of the door (a tenant or document id, a NUL byte, a field too long)."""


@dataclass(frozen=True)
class UploadReceipt:
    filename: str
    document_id: str
    correlation_id: str
    tenant_id: str
    sha256: str
    size_bytes: int
    content_type: str
    inline: bool


@dataclass(frozen=True)
class Rejection:
    path: str
    reason: str


def printable(path: Path) -> str:
    """A path as text to print: bytes of a name that are not UTF-8 shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def collect_files(
    paths: Iterable[Path], include: Iterable[str] = ()
) -> tuple[list[Path], list[Rejection]]:
    """Expand directories recursively (hidden files skipped), keeping names that match `include`."""
    patterns = list(include)
    files: list[Path] = []
    missing: list[Rejection] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if child.is_file() and not any(p.startswith(".") for p in rel.parts):
                    if not patterns or any(fnmatch.fnmatch(child.name, p) for p in patterns):
                        files.append(child)
        elif path.is_file():
            files.append(path)
        else:
            missing.append(
                Rejection(printable(path), f"{printable(path)}: no such file or directory")
            )
    return files, missing


class Uploader:
    """Publishes DocumentUploaded events. Use as `async with Uploader(settings) as up:`."""

    def __init__(
        self, settings: Settings, codec: Codec | None = None, *, window: int = 1000
    ) -> None:
        self.settings = settings
        self.codec = codec or Codec()
        self.topic = Topology(settings.kafka.topic_prefix).uploaded
        self.blobs = blob_writer(settings)
        # No linger: uploads sent while a request is in flight go out together in the next
        # one, and an upload alone is not held back.
        self._producer = kafkaio.producer(settings)
        self.window = window
        self._pending: deque[tuple[UploadReceipt, asyncio.Future[Any]]] = deque()
        self._failed: list[tuple[UploadReceipt, BaseException]] = []

    async def __aenter__(self) -> Uploader:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise await unreachable(self.settings.kafka, exc) from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._producer.stop()

    def check(self, data: bytes, filename: str) -> str:
        """Refuse what cannot be processed; return the content type."""
        if not data:
            raise UploadRejected(f"{filename}: file is empty")
        limit = self.settings.blobs.max_upload_bytes
        if len(data) > limit:
            raise UploadRejected(
                f"{filename}: {len(data)} bytes is over the upload limit of {limit} bytes"
            )
        try:
            return detect_content_type(filename, data)
        except PermanentError as exc:
            raise UploadRejected(f"{filename}: {exc}") from None

    async def upload_bytes(
        self,
        data: bytes,
        filename: str,
        *,
        tenant_id: str,
        metadata: Mapping[str, str] | None = None,
        force: bool = False,
        document_id: str | None = None,
        correlation_id: str | None = None,
        source_system: str | None = "ragstream-cli",
        wait: bool = True,
    ) -> UploadReceipt:
        """Check, store (a claim check over the inline limit) and publish one document.

        `wait`: return once the broker acknowledged it (acks=all). Without, return once it is
        queued, with up to `window` uploads in flight; `flush()` waits for the rest and says
        which the broker did not take."""
        content_type = self.check(data, filename)
        digest = sha256_hex(data)
        inline = len(data) <= self.settings.blobs.inline_limit_bytes
        try:
            event = DocumentUploaded(
                document_id=document_id or str(uuid.uuid4()),
                tenant_id=tenant_id,
                correlation_id=correlation_id or str(uuid.uuid4()),
                filename=filename,
                content_type=content_type,
                size_bytes=len(data),
                sha256=digest,
                source_uri=None if inline else self.blobs.uri_for(tenant_id, digest),
                content=data if inline else None,
                metadata=dict(metadata or {}),
                force=force,
                source_system=source_system,
            )
            check_upload(event, max_size_bytes=self.settings.blobs.max_upload_bytes)
        except InvalidEvent as exc:
            name = filename if filename.isprintable() else shown(filename)
            raise UploadRejected(f"{name}: {exc}") from None
        with tracing.producing("upload") as span:
            if span is not None:
                span.set_attributes(_span_attributes(event, self.topic))
            if not inline:
                await self.blobs.write(data, digest, tenant_id=tenant_id)
            sent = await self._producer.send(  # queued; acknowledged below or by flush()
                self.topic,
                self.codec.encode(event),
                key=event.document_id.encode(),
                headers=tracing.inject(self.codec.headers_for(event)),  # the trace starts here
            )
        receipt = UploadReceipt(
            filename,
            event.document_id,
            event.correlation_id,
            tenant_id,
            digest,
            len(data),
            content_type,
            inline,
        )
        if wait:
            await self._acknowledged(receipt, sent)
            return receipt
        self._pending.append((receipt, sent))
        while len(self._pending) > self.window:
            await self._settle(*self._pending.popleft())
        return receipt

    async def flush(self) -> list[tuple[UploadReceipt, BaseException]]:
        """Wait until every upload sent with `wait=False` is acknowledged; the ones the broker
        did not take (with why), since the last flush."""
        while self._pending:
            await self._settle(*self._pending.popleft())
        failed, self._failed = self._failed, []
        return failed

    async def _acknowledged(self, receipt: UploadReceipt, sent: asyncio.Future[Any]) -> None:
        await sent
        log.info(
            "uploaded",
            document_id=receipt.document_id,
            filename=receipt.filename,
            correlation_id=receipt.correlation_id,
            bytes=receipt.size_bytes,
            inline=receipt.inline,
        )

    async def _settle(self, receipt: UploadReceipt, sent: asyncio.Future[Any]) -> None:
        try:
            await self._acknowledged(receipt, sent)
        except KafkaError as exc:
            log.warning("upload not published", filename=receipt.filename, error=str(exc))
            self._failed.append((receipt, exc))

    async def upload_file(self, path: Path, **kwargs: object) -> UploadReceipt:
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise UploadRejected(
                f"{printable(path)}: the file name is not valid UTF-8 (a document's filename is "
                "text): rename the file"
            ) from None
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise UploadRejected(f"{printable(path)}: no such file") from None
        except OSError as exc:
            raise UploadRejected(f"{printable(path)}: cannot read: {exc.strerror}") from None
        return await self.upload_bytes(data, path.name, **kwargs)  # type: ignore[arg-type]


def _span_attributes(event: DocumentUploaded, topic: str) -> dict[str, str | int | bool]:
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.destination.name": topic,
        "ragstream.document_id": event.document_id,
        "ragstream.tenant_id": event.tenant_id,
        "ragstream.correlation_id": event.correlation_id,
        "ragstream.size_bytes": event.size_bytes,
        "ragstream.inline": event.content is not None,
    }


async def upload_paths(
    settings: Settings,
    paths: Iterable[Path],
    *,
    tenant_id: str,
    metadata: Mapping[str, str] | None = None,
    include: Iterable[str] = (),
    force: bool = False,
) -> tuple[list[UploadReceipt], list[Rejection]]:
    """Upload every file under `paths`; refused files are reported, the rest still go."""
    files, rejected = collect_files(paths, include)
    receipts: list[UploadReceipt] = []
    async with Uploader(settings) as uploader:
        for path in files:
            try:
                receipts.append(
                    await uploader.upload_file(
                        path, tenant_id=tenant_id, metadata=metadata, force=force, wait=False
                    )
                )
            except UploadRejected as exc:
                log.warning("upload refused", path=printable(path), reason=str(exc))
                rejected.append(Rejection(printable(path), str(exc)))
        failed = await uploader.flush()
    lost = {r.document_id for r, _ in failed}
    rejected += [Rejection(r.filename, f"not published: {exc}") for r, exc in failed]
    return [r for r in receipts if r.document_id not in lost], rejected
