"""A throwaway certificate authority for the dev stack and the tests (library ``cryptography``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY = dt.timedelta(days=30)


class LeafOptions(TypedDict, total=False):
    uri: str
    """A URI SAN, e.g. a SPIFFE ID: the holder's identity at the broker."""
    uris: tuple[str, ...]
    """More URI SANs, after ``uri`` (an X.509-SVID has exactly one: the broker refuses these)."""
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    server: bool
    """Server authentication (the broker); client authentication otherwise."""
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class DevCA:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, common_name: str) -> None:
        self.key = _key()
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + DEFAULT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, **options: Unpack[LeafOptions]) -> tuple[bytes, bytes]:
        """Issue a leaf certificate; returns (certificate PEM, private key PEM)."""
        uri = options.get("uri")
        dns_names = options.get("dns_names", ())
        ip_addresses = options.get("ip_addresses", ())
        server = options.get("server", False)
        not_before = options.get("not_before")
        not_after = options.get("not_after")
        key = _key()
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if uri is not None:
            sans.append(x509.UniformResourceIdentifier(uri))
        sans += [x509.UniformResourceIdentifier(more) for more in options.get("uris", ())]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + DEFAULT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def write_ca(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return path

    def issue_files(
        self, directory: Path, stem: str, common_name: str, **options: Unpack[LeafOptions]
    ) -> CertFiles:
        """Issue a certificate and write ``stem.pem`` and ``stem-key.pem`` (mode 0600)."""
        cert_pem, key_pem = self.issue(common_name, **options)
        directory.mkdir(parents=True, exist_ok=True)
        files = CertFiles(directory / f"{stem}.pem", directory / f"{stem}-key.pem")
        files.cert.write_bytes(cert_pem)
        write_private(files.key, key_pem)
        return files


def issue_loopback_server(ca: DevCA, directory: Path, uri: str | None = None) -> CertFiles:
    """The broker's server certificate for loopback: valid for localhost and 127.0.0.1."""
    options: LeafOptions = {
        "dns_names": ("localhost",),
        "ip_addresses": ("127.0.0.1",),
        "server": True,
    }
    if uri is not None:
        options["uri"] = uri
    return ca.issue_files(directory, "broker", "broker", **options)


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, created with that mode (never briefly wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
