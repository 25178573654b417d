"""The broker's own TLS material, read and checked before anything serves with it, and
reloaded when its files change.

gRPC accepts any bytes and fails later with "Failed to bind to address": a key file
that holds a certificate, or a key of another certificate, must instead stop start-up
with a config error naming the key. Problems are named; key material never is.

Certificates rotate (SPIFFE SVIDs live about an hour, cert-manager renews in place), so
``ServerTlsReloader`` gives gRPC dynamic credentials: before each new connection's
handshake, gRPC asks it for the current files. It looks at the files' stamps (a stat
each); when they changed, it checks the new set exactly as start-up does and switches
to it, or keeps the set it has and counts the refusal (a half-written pair, a broken
file). Existing connections go on with what they negotiated.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from broker.config import ServerConfig
from broker.errors import ConfigError
from secretbroker.client import FileStamp, file_stamps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes that were checked to belong together."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes = field(repr=False)
    not_before: float = 0.0
    """The server certificate's validity (Unix time)."""
    not_after: float = 0.0
    ca_not_before: float = 0.0
    ca_not_after: float = 0.0
    """The validity of the client CA certificate in the bundle that expires first."""

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


class ServerTlsReloader:
    """Dynamic server credentials that follow the files (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        on_change: Callable[[ServerTls], None] = lambda tls: None,
        on_rejected: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self._on_change = on_change
        self._on_rejected = on_rejected
        self._stamp = self._stamps()
        self.current = load_server_tls(config)  # raises ConfigError at start-up

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            self._fetch,  # type: ignore[arg-type]  # grpc-stubs omits the None gRPC documents
            require_client_authentication=True,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each new connection: None keeps the current files."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            loaded = load_server_tls(self._config)
        except ConfigError as exc:
            log.warning("kept the current TLS files; the new ones are refused: %s", exc)
            self._on_rejected()
            return None
        self.current = loaded
        self._on_change(loaded)
        log.info(
            "reloaded the TLS files: server certificate valid until %s",
            dt.datetime.fromtimestamp(loaded.not_after, dt.UTC).isoformat(timespec="seconds"),
        )
        return loaded.configuration()

    def _stamps(self) -> tuple[FileStamp, ...]:
        config = self._config
        return file_stamps((config.cert_file, config.key_file, config.client_ca_file))


def load_server_tls(config: ServerConfig) -> ServerTls:
    """Read the server's certificate, key and client CA; raise ConfigError naming the key of
    the first file that is unreadable, malformed, or does not match."""
    cert_pem = _read(config.cert_file, "server.cert_file")
    key_pem = _read(config.key_file, "server.key_file")
    ca_pem = _read(config.client_ca_file, "server.client_ca_file")
    leaf = _certificates(cert_pem, "server.cert_file")[0]
    authorities = _certificates(ca_pem, "server.client_ca_file")
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
    first_to_expire = min(authorities, key=lambda ca: ca.not_valid_after_utc)
    return ServerTls(
        cert_pem,
        key_pem,
        ca_pem,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        ca_not_before=first_to_expire.not_valid_before_utc.timestamp(),
        ca_not_after=first_to_expire.not_valid_after_utc.timestamp(),
    )


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
