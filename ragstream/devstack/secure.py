"""Secure mode of the local broker: SASL_SSL with SCRAM-SHA-512, a CA of the stack's own, and
least privilege through Kafka ACLs (StandardAuthorizer).

`SecureSetup.ensure(data_dir)` makes (once, then reuses) everything in `<data_dir>/secure/`:

    ca.pem, ca.key, broker.pem   the CA and the broker's certificate (ragstream.devstack.tls)
    passwords.json               the SCRAM users' generated passwords (0600)
    admin.properties,            client settings for Kafka's own tools, one per principal
      worker.properties, ...       (`--command-config`; 0600, they hold the password)

and beside the data directory's other files:

    secure.toml   the client settings an operator points RAGSTREAM_CONFIG at (no secret)
    secure.env    shell exports: RAGSTREAM_CONFIG, the admin user and its password; the worker
                  and publisher passwords as comments for whoever runs those (0600)

Principals (their ACLs are data, in `config/kafka/acls.toml`, for an operator to apply to a
cluster of their own):

    admin       operators and the stack itself: a super user
    worker      the stage workers and the cost accountant
    publisher   other systems: may only write `<prefix>.documents.uploaded`

The controller listener stays PLAINTEXT on 127.0.0.1 (KRaft's own traffic within the one node);
every client listener is SASL_SSL, so a PLAINTEXT client is refused.
"""

from __future__ import annotations

import json
import secrets
import shlex
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import SecretStr

from ragstream.devstack.files import write_file
from ragstream.devstack.tls import Certificates, ensure_certificates
from ragstream.errors import InfrastructureError
from ragstream.kafka_clients import java_client_properties
from ragstream.resources import config_dir

if TYPE_CHECKING:
    from ragstream.settings import KafkaSettings

MECHANISM: Final = "SCRAM-SHA-512"
ADMIN: Final = "admin"
WORKER: Final = "worker"
PUBLISHER: Final = "publisher"
USERS: Final = (ADMIN, WORKER, PUBLISHER)
ACL_TOOL: Final = "org.apache.kafka.tools.AclCommand"


@dataclass(frozen=True)
class Acl:
    """One ACL entry of config/kafka/acls.toml, with the topic prefix filled in."""

    principal: str
    resource: str  # topic | group | cluster
    name: str
    pattern: str  # literal | prefixed
    operations: tuple[str, ...]

    def tool_args(self) -> list[str]:
        """AclCommand's arguments that add this entry (adding one that exists is a no-op)."""
        args = ["--add", "--allow-principal", f"User:{self.principal}"]
        for op in self.operations:
            args += ["--operation", op]
        if self.resource == "cluster":
            return [*args, "--cluster"]
        return [*args, f"--{self.resource}", self.name, "--resource-pattern-type", self.pattern]


def acls(prefix: str, path: Path | None = None) -> list[Acl]:
    """The least-privilege ACLs for a topic prefix, from config/kafka/acls.toml."""
    data = tomllib.loads((path or config_dir() / "kafka" / "acls.toml").read_text())
    return [
        Acl(
            principal=entry["principal"],
            resource=entry["resource"],
            name=str(entry.get("name", "")).format(prefix=prefix),
            pattern=entry.get("pattern", "literal"),
            operations=tuple(entry["operations"]),
        )
        for entry in data["acl"]
    ]


@dataclass(frozen=True)
class SecureSetup:
    directory: Path  # <data_dir>/secure
    certs: Certificates
    passwords: dict[str, str]

    @classmethod
    def ensure(
        cls, data_dir: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")
    ) -> SecureSetup:
        data_dir = data_dir.resolve()
        directory = data_dir / "secure"
        certs = ensure_certificates(directory, hosts)
        store = directory / "passwords.json"
        try:
            passwords: dict[str, str] = json.loads(store.read_text())
        except FileNotFoundError:
            passwords = {}
        except ValueError as exc:
            raise InfrastructureError(f"{store} is not valid JSON: {exc}") from exc
        if set(USERS) - set(passwords):
            passwords = {u: passwords.get(u) or secrets.token_urlsafe(24) for u in USERS}
            write_file(store, json.dumps(passwords, indent=2) + "\n", private=True)
        setup = cls(directory, certs, passwords)
        for user in USERS:
            write_file(directory / f"{user}.properties", setup.tool_properties(user), private=True)
        (data_dir / "secure.toml").write_text(setup.client_toml(ADMIN))
        write_file(data_dir / "secure.env", setup.env_file(data_dir / "secure.toml"), private=True)
        return setup

    # -- the broker ------------------------------------------------------------------------

    def broker_properties(self, host: str, port: int, controller_port: int) -> dict[str, str]:
        """server.properties entries of a SASL_SSL broker with the ACL authorizer."""
        return {
            "listeners": f"SASL_SSL://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"SASL_SSL://{host}:{port}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": self.jaas(ADMIN),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.certs.broker_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.certs.ca_cert),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            # ANONYMOUS is the controller listener's principal (loopback, KRaft's own traffic).
            "super.users": f"User:{ADMIN};User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        }

    def format_args(self) -> list[str]:
        """kafka-storage format arguments that create the SCRAM users with the metadata log."""
        args: list[str] = []
        for user in USERS:
            args += ["--add-scram", f"{MECHANISM}=[name={user},password={self.passwords[user]}]"]
        return args

    def jaas(self, user: str) -> str:
        """The broker's own login (its inter-broker connections) as `user`."""
        props = java_client_properties(self.client_kafka_settings(user))
        (line,) = [p for p in props.splitlines() if p.startswith("sasl.jaas.config=")]
        return line.removeprefix("sasl.jaas.config=")

    # -- clients ---------------------------------------------------------------------------

    def tool_properties(self, user: str) -> str:
        """A `--command-config` file for Kafka's own tools as `user`."""
        return java_client_properties(self.client_kafka_settings(user))

    def tool_config(self, user: str = ADMIN) -> Path:
        return self.directory / f"{user}.properties"

    def client_settings(self, user: str) -> dict[str, Any]:
        """The `kafka` settings section of a ragstream client authenticating as `user`."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_username": user,
            "ssl_cafile": str(self.certs.ca_cert),
        }

    def client_env(self, user: str) -> dict[str, str]:
        """Environment variables that make a ragstream process authenticate as `user`."""
        env = {
            f"RAGSTREAM_KAFKA__{k.upper()}": str(v) for k, v in self.client_settings(user).items()
        }
        env["RAGSTREAM_KAFKA__SASL_PASSWORD"] = self.passwords[user]
        return env

    def client_kafka_settings(self, user: str, base: KafkaSettings | None = None) -> KafkaSettings:
        """`base` (the defaults if None) with this broker's security settings, as `user`."""
        from ragstream.settings import KafkaSettings as Kafka

        fields = {**self.client_settings(user), "sasl_password": SecretStr(self.passwords[user])}
        fields["ssl_cafile"] = self.certs.ca_cert
        return (base or Kafka()).model_copy(update=fields)

    def client_toml(self, user: str) -> str:
        lines = [
            "# The local secure broker's client settings (ragstream stack up --secure).",
            "# Use with RAGSTREAM_CONFIG; the password comes from the environment (secure.env).",
            "[kafka]",
        ]
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.client_settings(user).items()]
        return "\n".join(lines) + "\n"

    def env_file(self, toml: Path) -> str:
        quoted = shlex.quote
        return (
            "# The local secure broker's credentials (generated by ragstream stack up --secure).\n"
            "# `source` this file to run ragstream commands as the admin principal.\n"
            f"export RAGSTREAM_CONFIG={quoted(str(toml))}\n"
            f"export RAGSTREAM_KAFKA__SASL_USERNAME={ADMIN}\n"
            f"export RAGSTREAM_KAFKA__SASL_PASSWORD={quoted(self.passwords[ADMIN])}\n"
            "# The other principals, for whoever runs them:\n"
            f"#   worker (stage workers, cost accountant): {self.passwords[WORKER]}\n"
            f"#   publisher (other systems; writes {'<prefix>'}.documents.uploaded only): "
            f"{self.passwords[PUBLISHER]}\n"
        )
