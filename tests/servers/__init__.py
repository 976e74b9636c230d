"""Local HTTP servers that speak the paid services' APIs, for tests and benchmarks.

Each runs a Starlette app under uvicorn on 127.0.0.1 in its own thread (its own event loop), so
the clients under test talk real HTTP to it from theirs. `stop()` and `start()` again keep the
port, so a test can take a service away and bring it back.

    OpenAIServer       POST /v1/embeddings         (tests/servers/openai_server.py)
    LlamaParseServer   POST /api/v2/parse/upload,  GET /api/v2/parse/{job_id}
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread; start, stop and start again."""

    def __init__(self, app: ASGIApp, *, port: int | None = None) -> None:
        self.app = app
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, timeout_s: float = 10.0) -> Self:
        if self._server is not None:
            return self
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"server-{self.port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the test server on port {self.port} did not start")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the test server on port {self.port} took over {timeout_s}s")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def go_duration(seconds: float) -> str:
    """Seconds in OpenAI's reset-header format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m" + f"{rest:.3f}".rstrip("0").rstrip(".") + "s"


__all__ = ["BackgroundServer", "free_port", "go_duration"]
