"""ragstream's exception tree. Each class says what the caller must do.

    RagstreamError                  base of everything ragstream raises on purpose
    ├── ConfigError                 a setting is wrong: stop start-up, name the key
    ├── RetryableError              may pass if tried again (timeouts, 429/5xx, lost connections)
    ├── PermanentError              will never pass (validation, corrupt or unsupported input, 4xx)
    │   ├── DecodeError             bytes that are not a ragstream event (poison pill)
    │   ├── InvalidEvent            an event field breaks a rule at the door (names the field)
    │   ├── ClaimCheckRefused       a claim check its tenant may not read, or not its sha256
    │   └── TenantConflict          a write for a document of another tenant: nothing changed
    ├── BudgetExceeded              not a failure: wait until the budget window allows the call
    └── InfrastructureError         our own broker or database could not be started or reached
        ├── InfrastructureUnavailable   ...while a record was in hand: not the record's fault;
        │                               hold it, wait for the dependency, spend no attempt
        └── AuthenticationFailed        it answers but refuses our credentials: fix them

Other libraries' errors are translated into these at the boundary; one piece of code (the
consumer runtime) reads them.
"""

from __future__ import annotations

from typing import Final

# The dependencies an InfrastructureUnavailable names.
POSTGRES: Final = "postgres"
KAFKA: Final = "kafka"


class RagstreamError(Exception):
    """Base of every error ragstream raises on purpose."""

    retryable: bool = False


class ConfigError(RagstreamError):
    """A configuration value is wrong. The message names the key."""


class RetryableError(RagstreamError):
    """A failure that may pass: retry with backoff, then dead-letter."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(RagstreamError):
    """A failure that cannot pass: dead-letter at once."""


class DecodeError(PermanentError):
    """Bytes that do not decode as a ragstream event: a poison pill."""


class InvalidEvent(PermanentError):
    """An event from outside breaks a rule checked at the door (`ragstream.validation`): a
    record key that is not its document id, a NUL byte, a field too long, an unknown content
    type. The message names the field."""


class ClaimCheckRefused(PermanentError):
    """A claim check (`source_uri`) outside what its tenant may read, or whose bytes are not
    the `sha256` the event names (`ragstream.blobs`). The message names the rule."""


class TenantConflict(PermanentError):
    """A write for a document that belongs to another tenant (its id is taken). Nothing was
    changed, and nothing was written into the other tenant's journey. The message does not
    name the owner."""

    def __init__(self, document_id: str, tenant_id: str) -> None:
        super().__init__(
            f"tenant conflict: document_id {document_id!r} belongs to another tenant; a record "
            f"of tenant {tenant_id!r} cannot change it (document ids are unique across tenants)"
        )
        self.document_id = document_id
        self.tenant_id = tenant_id


class BudgetExceeded(RagstreamError):
    """The call would exceed the budget: pause, do not fail.

    `tenant_id` is set when a tenant's own budget is the limit (the service is open to
    others); `retry_after` is how long until the budget window ends, when that is known."""

    def __init__(
        self,
        message: str,
        *,
        service: str,
        tenant_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.service = service
        self.tenant_id = tenant_id
        self.retry_after = retry_after


class InfrastructureError(RagstreamError):
    """Our own broker or database could not be started or reached."""


class InfrastructureUnavailable(InfrastructureError):
    """PostgreSQL or Kafka does not answer (refused or lost connection, pool timeout, server
    shutting down, leader election, request timeout). The record is not at fault: the consumer
    runtime holds it, probes `dependency` with backoff and tries it again when it answers.

    `dependency` is "postgres" or "kafka"."""

    def __init__(self, message: str, *, dependency: str) -> None:
        super().__init__(message)
        self.dependency = dependency


class AuthenticationFailed(InfrastructureError):
    """The broker (or database) answers but refuses our credentials. The message names the
    user and the setting; waiting does not help, an operator must fix the credentials."""
