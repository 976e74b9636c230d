"""Rollback: point documents back at a chunker version or an embedding model they still hold.

    request = RollbackRequest.build("chunker", "md-1:cl100k_base:t200:o20", tenants=["acme"])
    request = RollbackRequest.build("embedding", "text-embedding-3-small:1536")
    report = await rollback(settings, request)          # or dry_run=True: counts, no change

Older chunker versions and embedding models stay in PostgreSQL beside the current ones, so
going back is a change of pointers, not work: no stage parses, chunks or embeds anything, and
the very next search reads the target's rows. All documents of the scope move in one
statement (see `ragstream.store._versions`). A document lacking the target's rows is counted
and left as it is; `RollbackReport.fill_command` is the replay that gives it them.

A target that no document of the scope holds raises `RollbackRefused` (exit code 1 on the CLI),
naming the versions they do hold; operator input that cannot be used raises `InvalidInput`
(exit code 2).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from enum import StrEnum

from ragstream.errors import RagstreamError
from ragstream.operator_input import InvalidInput
from ragstream.settings import Settings
from ragstream.store import Store, VersionMove
from ragstream.store._versions import LACKING_NAMED


class Kind(StrEnum):
    CHUNKER = "chunker"
    EMBEDDING = "embedding"


# The stage whose replay makes a kind's results.
_STAGE = {Kind.CHUNKER: "chunk", Kind.EMBEDDING: "embed"}


class RollbackRefused(RagstreamError):
    """The target was never produced for the documents asked (or there are none)."""


@dataclass(frozen=True, slots=True)
class RollbackRequest:
    kind: Kind
    version: str  # the chunker version, or the embedding model
    dimensions: int | None = None  # the embedding's dimensions
    tenants: tuple[str, ...] = ()
    documents: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        kind: str,
        to: str,
        *,
        tenants: tuple[str, ...] | list[str] = (),
        documents: tuple[str, ...] | list[str] = (),
    ) -> RollbackRequest:
        """A request from operator text; InvalidInput names what cannot be used."""
        try:
            chosen = Kind(kind)
        except ValueError:
            raise InvalidInput(f"unknown kind {kind!r}; choose one of {', '.join(Kind)}") from None
        if not to.strip():
            raise InvalidInput("--to: name the version to go back to")
        if chosen is Kind.CHUNKER:
            return cls(chosen, to, None, tuple(tenants), tuple(documents))
        model, _, dims = to.rpartition(":")
        if not model or not dims.isdigit() or not 1 <= int(dims) <= 16000:
            raise InvalidInput(
                f"--to {to!r}: expected MODEL:DIMS, dimensions 1..16000 "
                "(e.g. text-embedding-3-small:1536)"
            )
        return cls(chosen, model, int(dims), tuple(tenants), tuple(documents))

    @property
    def target(self) -> str:
        if self.kind is Kind.CHUNKER:
            return f"chunker version {self.version}"
        return f"embedding {self.version}:{self.dimensions}"

    def scope(self) -> str:
        parts = []
        if self.tenants:
            parts.append(
                ("tenant " if len(self.tenants) == 1 else "tenants ") + ", ".join(self.tenants)
            )
        if self.documents:
            parts.append(
                f"document {self.documents[0]}"
                if len(self.documents) == 1
                else f"{len(self.documents)} documents asked"
            )
        return " and ".join(parts) or "every tenant"


@dataclass(frozen=True, slots=True)
class RollbackReport:
    request: RollbackRequest
    move: VersionMove
    dry_run: bool
    seconds: float  # the statement's time, as the client saw it

    def fill_command(self) -> str | None:
        """The replay that gives the documents lacking the target's rows them, when the
        workers run with the target's settings; None when none lacks them."""
        move = self.move
        if not move.lacking:
            return None
        words = ["ragstream", "replay", _STAGE[self.request.kind], "--live", "--earliest"]
        if move.lacking <= LACKING_NAMED:
            words += [w for d in move.lacking_ids for w in ("--document", d)]
        elif len(move.lacking_tenants) <= LACKING_NAMED:
            words += [w for t in move.lacking_tenants for w in ("--tenant", t)]
        return shlex.join(words)

    def fill_settings(self) -> str:
        """What the workers must run with for that replay to make the target's rows."""
        if self.request.kind is Kind.CHUNKER:
            return f"the chunk workers with the chunk settings of {self.request.version}"
        return (
            f"the embed workers with model {self.request.version} at "
            f"{self.request.dimensions} dimensions"
        )


async def rollback(
    settings: Settings, request: RollbackRequest, *, dry_run: bool = False
) -> RollbackReport:
    """Point the documents of the request's scope at its target where they hold its rows."""
    async with await Store.connect(settings.postgres.dsn(), min_size=1, max_size=1) as store:
        started = time.perf_counter()
        if request.kind is Kind.CHUNKER:
            move = await store.point_at_chunker_version(
                request.version,
                tenants=request.tenants,
                documents=request.documents,
                dry_run=dry_run,
            )
        else:
            assert request.dimensions is not None
            move = await store.point_at_embedding(
                request.version,
                request.dimensions,
                tenants=request.tenants,
                documents=request.documents,
                dry_run=dry_run,
            )
        seconds = time.perf_counter() - started
        if not move.documents:
            raise RollbackRefused(f"no documents to roll back: none of {request.scope()}")
        if not move.produced:
            kept = await store.kept_versions(
                request.kind.value, tenants=request.tenants, documents=request.documents
            )
            held = ", ".join(f"{v} ({n} documents)" for v, n in kept.items()) or "none"
            raise RollbackRefused(
                f"{request.target} was never produced for {request.scope()}; kept there: {held}"
            )
    return RollbackReport(request, move, dry_run, seconds)
