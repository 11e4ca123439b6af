"""Test certificates: a CA, a server certificate for localhost and a client certificate.

Shared by the TLS tests of the broker, the agent and `rigshift agent doctor`.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _cert(name: str, issuer: Any = None, issuer_key: Any = None) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def _write(path: Path, cert: Any, key: Any = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def make_pki(directory: Path) -> Path:
    """Write ca.crt, server.crt/.key (localhost) and client.crt/.key into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _cert("rigshift test CA")
    server, server_key = _cert("localhost", ca, ca_key)
    client, client_key = _cert("client", ca, ca_key)
    _write(directory / "ca", ca)
    _write(directory / "server", server, server_key)
    _write(directory / "client", client, client_key)
    return directory
