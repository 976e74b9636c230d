"""Starting Kafka clients so that a failed start leaves nothing open behind it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar


class _Client(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


C = TypeVar("C", bound=_Client)


async def started(make: Callable[[], C]) -> C:
    """A client made and started; one that fails to start is stopped (no unclosed sockets)
    and the error raised, so `until_available(..., lambda: started(make), ...)` makes a fresh
    one per attempt."""
    client = make()
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise
    return client
