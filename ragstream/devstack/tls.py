"""The local secure broker's certificates: a CA of the stack's own and a broker certificate it
signs, generated once with `cryptography` and kept in `<data_dir>/secure/`.

    ca.pem        the CA certificate: what clients trust (`kafka.ssl_cafile`)
    ca.key        the CA's private key (0600): only needed to sign a new broker certificate
    broker.pem    the broker's private key (PKCS#8) followed by its certificate chain, the form
                  Kafka reads as a PEM keystore (`ssl.keystore.type=PEM`) (0600)

The broker certificate names `localhost` and `127.0.0.1` (and any further hosts given), so
clients verify the hostname as they would against a managed cluster. A broker certificate
within 30 days of expiry, or one that lacks a requested host, is made again.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ragstream.devstack.files import write_file

CA_DAYS = 3650
BROKER_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    ca_key: Path
    broker_keystore: Path


def ensure_certificates(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> Certificates:
    """The CA and broker certificate in `directory`, made if missing, expiring or lacking a
    host; what is still good is kept."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    certs = Certificates(directory / "ca.pem", directory / "ca.key", directory / "broker.pem")
    if not (certs.ca_cert.is_file() and certs.ca_key.is_file()):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ragstream local CA")])
        now = dt.datetime.now(dt.UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        write_file(certs.ca_key, _private_pem(key), private=True)
        write_file(certs.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
        certs.broker_keystore.unlink(missing_ok=True)  # signed by the old CA, if any
    if _broker_needs_renewal(certs.broker_keystore, hosts):
        _sign_broker(certs, hosts)
    return certs


def _broker_needs_renewal(path: Path, hosts: Sequence[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return True
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < RENEW_BEFORE:
        return True
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have = {str(n) for n in names.get_values_for_type(x509.DNSName)}
    have |= {str(n) for n in names.get_values_for_type(x509.IPAddress)}
    return not set(hosts) <= have


def _sign_broker(certs: Certificates, hosts: Sequence[str]) -> None:
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=BROKER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
        serialization.Encoding.PEM
    )
    write_file(certs.broker_keystore, _private_pem(key) + chain, private=True)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
