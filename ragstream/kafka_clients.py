"""Kafka clients' life at its edges, in one place:

started(make)               a client started, or stopped again if its start fails
diagnose / unreachable      why a client cannot get through: a refused login or TLS
                            handshake (a setting to fix) or a broker not answering
bounded / closing           shutdown steps that never wait long on an absent broker
java_client_properties      the same connection settings for Kafka's own tools
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import structlog
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError, SaslAuthenticationFailed

from ragstream.errors import (
    KAFKA,
    AuthenticationFailed,
    ConfigError,
    InfrastructureUnavailable,
    RagstreamError,
)

if TYPE_CHECKING:
    from ragstream.settings import KafkaSettings

log = structlog.get_logger(__name__)


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


async def diagnose(kafka: KafkaSettings, timeout_s: float = 10.0) -> RagstreamError | None:
    """Why clients cannot get through to the broker, when it is our settings' fault: a refused
    login, a failed TLS handshake. None when the broker is simply not answering (wait for it)."""
    opts = kafka.client_options()
    try:
        host, port = _first_broker(kafka.bootstrap_servers)
        async with asyncio.timeout(timeout_s):
            conn = await create_conn(
                host,
                port,
                client_id=opts["client_id"],
                ssl_context=opts.get("ssl_context"),
                security_protocol=opts["security_protocol"],
                sasl_mechanism=opts.get("sasl_mechanism"),
                sasl_plain_username=opts.get("sasl_plain_username"),
                sasl_plain_password=opts.get("sasl_plain_password"),
            )
            conn.close()
    except SaslAuthenticationFailed:
        return AuthenticationFailed(
            f"kafka.sasl_password: authentication failed for user {kafka.sasl_username!r} "
            f"({kafka.sasl_mechanism}) at {kafka.bootstrap_servers}"
        )
    except ssl.SSLError as exc:
        return ConfigError(
            f"kafka.ssl_cafile: the TLS handshake with {kafka.bootstrap_servers} failed: "
            f"{exc.reason or exc}"
        )
    except Exception:
        return None
    return None


async def unreachable(kafka: KafkaSettings, exc: BaseException) -> RagstreamError:
    """The one error for "a client could not start": a ConfigError naming the setting when the
    broker refused us (login, TLS), else InfrastructureUnavailable with what to check."""
    refused = await diagnose(kafka)
    if refused is not None:
        return refused
    if kafka.security_protocol == "PLAINTEXT" and await _accepts_tcp(kafka.bootstrap_servers):
        return InfrastructureUnavailable(
            f"cannot reach Kafka at {kafka.bootstrap_servers}: it accepts connections but "
            "closes ours; does it require TLS or SASL (kafka.security_protocol, or `source "
            "<data_dir>/secure.env` for the local secure stack)?",
            dependency=KAFKA,
        )
    return InfrastructureUnavailable(
        f"cannot reach Kafka at {kafka.bootstrap_servers} ({type(exc).__name__}): is the broker "
        "running (`ragstream stack up`) and kafka.bootstrap_servers right?",
        dependency=KAFKA,
    )


async def started_or_explained(kafka: KafkaSettings, make: Callable[[], C]) -> C:
    """`started(make)`, with a failure to reach the broker turned into `unreachable(...)`."""
    try:
        return await started(make)
    except KafkaError as exc:
        raise await unreachable(kafka, exc) from exc


def java_client_properties(kafka: KafkaSettings) -> str:
    """The same connection settings as a Java client's properties (Kafka's own tools read them
    with `--command-config`). Holds the password: write it to a 0600 file."""
    lines = [f"security.protocol={kafka.security_protocol}"]
    if kafka.sasl_mechanism:
        module = {
            "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
        }.get(kafka.sasl_mechanism, "org.apache.kafka.common.security.scram.ScramLoginModule")
        password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        quoted = [
            v.replace("\\", "\\\\").replace('"', '\\"')
            for v in (kafka.sasl_username or "", password)
        ]
        lines += [
            f"sasl.mechanism={kafka.sasl_mechanism}",
            f'sasl.jaas.config={module} required username="{quoted[0]}" password="{quoted[1]}";',
        ]
    if kafka.ssl_cafile:
        lines += ["ssl.truststore.type=PEM", f"ssl.truststore.location={kafka.ssl_cafile}"]
    if kafka.ssl_certfile and kafka.ssl_keyfile:
        lines += [
            "ssl.keystore.type=PEM",
            f"ssl.keystore.certificate.chain={_pem_value(kafka.ssl_certfile)}",
            f"ssl.keystore.key={_pem_value(kafka.ssl_keyfile)}",
        ]
    return "\n".join(lines) + "\n"


def _pem_value(path: Path) -> str:
    """A PEM file's text as one properties value (line breaks escaped)."""
    return path.read_text().strip().replace("\n", "\\n")


async def _accepts_tcp(bootstrap: str, timeout_s: float = 2.0) -> bool:
    try:
        host, port = _first_broker(bootstrap)
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return True


SHUTDOWN_STEP_S: Final = 1.0  # a worker's whole shutdown must fit kafka.shutdown_grace_s + 5 s


async def bounded(step: Awaitable[object], what: str, seconds: float = SHUTDOWN_STEP_S) -> None:
    """A shutdown step that may wait on an absent broker: given `seconds`, then left behind
    with a warning (what it did not finish is redelivered or retried by whoever comes next)."""
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        log.warning(f"shutdown: could not {what} within {seconds:.0f}s; going on")
    except asyncio.CancelledError:
        # aiokafka's stop() can let a cancelled fetch's CancelledError out although nobody
        # cancelled us: only a cancellation of this very task goes on up.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning(f"shutdown: {what} was interrupted by the client; going on")


def closing(close: Callable[[], Awaitable[object]], what: str) -> Callable[[], Awaitable[None]]:
    """`close`, bounded: for `AsyncExitStack.push_async_callback` of a Kafka client."""

    async def closer() -> None:
        await bounded(close(), what)

    return closer


def _first_broker(bootstrap: str) -> tuple[str, int]:
    """Host and port of the first address in a bootstrap list (ValueError if malformed)."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host or "localhost", int(port)
