"""The embed port: texts -> vectors. OpenAI and the local embedder both fit it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: list[list[float]]
    token_count: int  # as the provider counts them (the local one counts words)
    provider: str  # who produced the vectors (a hybrid embedder may fall back)
    model: str


class Embedder(Protocol):
    """The embed port. A provider that subclasses it gets `current` (itself) and `aclose`
    (nothing to close); a mode switch (`ragstream.providers.modes`) answers `current` with the
    embedder of the mode in force, so one document is embedded by one provider."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def dimensions(self) -> int: ...

    async def embed(self, texts: list[str]) -> EmbedResult: ...

    def current(self) -> Embedder:
        """The embedder serving now."""
        return self

    async def aclose(self) -> None:
        """Release what the embedder holds (HTTP clients)."""
        return None
