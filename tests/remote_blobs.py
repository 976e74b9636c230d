"""Local servers for the remote claim-check tests: moto's S3 in server mode (a real
S3-compatible HTTP server in a thread), and a scripted HTTP(S) server that answers each path as
told: an error, a body that never ends, or nothing at all."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from moto.server import ThreadedMotoServer

from ragstream.devstack.tls import ensure_certificates


@contextlib.contextmanager
def moto_s3(port: int) -> Iterator[str]:
    """moto's S3 on 127.0.0.1:`port`; its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def aws_environment(endpoint: str) -> dict[str, str | None]:
    """The standard AWS variables for a local S3 at `endpoint` (None: unset), so nothing of
    this machine's AWS configuration (profiles, instance metadata) is read."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": None,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def s3_error(code: str, status: int) -> Answer:
    body = f"<Error><Code>{code}</Code><Message>{code} from the test</Message></Error>"
    return Answer(status, {"Content-Type": "application/xml"}, body.encode())


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    endless: bool = False  # a chunked body that never ends
    silent: bool = False  # no answer at all


class ScriptedServer:
    """An HTTP/1.1 server on 127.0.0.1 that answers each path with its `Answer` (404
    otherwise); TLS with the certificate of `tls_dir`'s local CA when given (its `ca_file`
    is what clients trust). `async with ScriptedServer() as server:`."""

    def __init__(self, tls_dir: Path | None = None) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[str] = []
        self.ca_file: Path | None = None
        self._ssl: ssl.SSLContext | None = None
        if tls_dir is not None:
            certs = ensure_certificates(tls_dir)
            self.ca_file = certs.ca_cert
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(certs.broker_keystore)
        self._done = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._ssl)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while not self._done.is_set():
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                self.requests.append(f"{method} {target}")
                await self._answer(writer, self.answers.get(urlsplit(target).path, Answer(404)))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, answer: Answer) -> None:
        if answer.silent:
            await self._done.wait()
            return
        headers: dict[str, Any] = dict(answer.headers)
        if answer.endless:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers.setdefault("Content-Length", len(answer.body))
        lines = [f"HTTP/1.1 {answer.status} Test", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if not answer.endless:
            writer.write(answer.body)
            await writer.drain()
            return
        chunk = b"x" * 65536
        while not self._done.is_set():  # until the client hangs up
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
