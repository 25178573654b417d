"""The broker's own TLS material, read and checked before anything serves with it.

gRPC accepts any bytes and fails later with "Failed to bind to address": a key file
that holds a certificate, or a key of another certificate, must instead stop start-up
with a config error naming the key. Problems are named; key material never is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from broker.config import ConfigError, ServerConfig


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes that were checked to belong together."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=True,
        )


def load_server_tls(config: ServerConfig) -> ServerTls:
    """Read the server's certificate, key and client CA; raise ConfigError naming the key of
    the first file that is unreadable, malformed, or does not match."""
    cert_pem = _read(config.cert_file, "server.cert_file")
    key_pem = _read(config.key_file, "server.key_file")
    ca_pem = _read(config.client_ca_file, "server.client_ca_file")
    leaf = _certificates(cert_pem, "server.cert_file")[0]
    _certificates(ca_pem, "server.client_ca_file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        problem = (
            "holds a certificate, not a private key"
            if b"CERTIFICATE-----" in key_pem
            else "is not an unencrypted PEM private key"
        )
        raise ConfigError("server.key_file", problem) from None
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise ConfigError("server.key_file", "does not match the certificate in server.cert_file")
    return ServerTls(cert_pem, key_pem, ca_pem)


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path} ({exc.strerror})") from None


def _certificates(pem: bytes, key: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError(key, "holds no PEM certificate")
    return certificates
