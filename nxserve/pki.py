"""Throwaway certificates for a local cluster (`nxserve up --tls`) and the tests: a CA, a server
certificate for this host's loopback names, and a client certificate for mTLS, made with the
`cryptography` library. Keys are ECDSA P-256, written 0600. Not for production: a deployment gets
its certificates from its own CA (cert-manager, say)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CA:
    """A certificate authority that can issue certificates (its key stays with it)."""

    cert: Path
    _certificate: x509.Certificate
    _key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, directory: Path, *, name: str = "nxserve local CA", days: float = 30) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_slug(name)}.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return cls(cert=path, _certificate=certificate, _key=key)

    def issue(
        self, directory: Path, name: str, *, hosts: Sequence[str] = LOOPBACK, client: bool = False, days: float = 7, expired: bool = False
    ) -> Issued:
        """A certificate for `name` (server: valid for `hosts`; client: for client authentication)
        and its key, written to `directory`. `expired` makes one whose validity ended yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (
            (now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
            if expired
            else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
        )
        names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{_slug(name)}.pem", directory / f"{_slug(name)}-key.pem"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return Issued(cert=cert_path, key=key_path)


@dataclass(frozen=True)
class ClusterTLS:
    """What a local cluster's services need for TLS everywhere and mTLS between prefill and decode."""

    ca: Path
    server: Issued
    """Every service's certificate (127.0.0.1, localhost)."""
    client: Issued
    """Prefill's client certificate towards decode."""

    @classmethod
    def create(cls, directory: Path) -> ClusterTLS:
        ca = CA.create(directory)
        return cls(ca=ca.cert, server=ca.issue(directory, "nxserve-server"), client=ca.issue(directory, "nxserve-prefill", client=True))

    def decode_args(self) -> list[str]:
        return ["--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key), "--tls-client-ca", str(self.ca)]

    def prefill_args(self) -> list[str]:
        return [
            "--tls-cert",
            str(self.server.cert),
            "--tls-key",
            str(self.server.key),
            "--decode-tls-ca",
            str(self.ca),
            "--decode-tls-cert",
            str(self.client.cert),
            "--decode-tls-key",
            str(self.client.key),
        ]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower())
