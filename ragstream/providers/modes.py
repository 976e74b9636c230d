"""Providers that follow the control topic: the mode an operator sets is used from the next
document on, in every running worker, with no restart.

The provider of each mode is built once, on first use, and kept (with its circuit breaker), so
switching back and forth costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from ragstream.control import ControlState
from ragstream.providers.embed.port import Embedder, EmbedResult
from ragstream.providers.parse.port import Parser, ParseResult
from ragstream.settings import Mode


class _Provider(Protocol):
    async def aclose(self) -> None: ...


T = TypeVar("T", bound=_Provider)


class ModeSwitch(Generic[T]):
    def __init__(self, state: ControlState, service: str, build: Callable[[Mode], T]) -> None:
        self.state = state
        self.service = service
        self._build = build
        self._by_mode: dict[Mode, T] = {}

    def current(self) -> T:
        mode = Mode(self.state.mode(self.service))
        if mode not in self._by_mode:
            self._by_mode[mode] = self._build(mode)
        return self._by_mode[mode]

    async def aclose(self) -> None:
        for provider in self._by_mode.values():
            await provider.aclose()


class SwitchingEmbedder(ModeSwitch[Embedder]):
    """An Embedder whose every property and call goes to the current mode's embedder."""

    @property
    def name(self) -> str:
        return self.current().name

    @property
    def model(self) -> str:
        return self.current().model

    @property
    def dimensions(self) -> int:
        return self.current().dimensions

    async def embed(self, texts: list[str]) -> EmbedResult:
        return await self.current().embed(texts)


class SwitchingParser(ModeSwitch[Parser]):
    """A Parser whose every call goes to the current mode's parser."""

    @property
    def name(self) -> str:
        return self.current().name

    async def parse(self, data: bytes, *, filename: str, content_type: str) -> ParseResult:
        return await self.current().parse(data, filename=filename, content_type=content_type)
