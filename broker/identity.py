"""Who is calling: the identity in the peer's verified client certificate.

gRPC has verified the certificate chain against the configured client CA before
a handler runs. The identity is the certificate's first URI SAN (a SPIFFE ID such
as ``spiffe://media.local/catalog``), else its subject common name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.x509.oid import NameOID


class IdentityResolver:
    """Maps peer certificates to identities, memoising per certificate.

    Parsing a certificate costs tens of microseconds; a long-lived client sends the
    same one on every call, so the hot path is one dictionary lookup.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._by_pem: dict[bytes, str | None] = {}
        self._max_entries = max_entries

    def identity(self, auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
        """The caller's identity, or None when it presented no usable certificate."""
        pem = next(iter(auth_context.get("x509_pem_cert", ())), None)
        if pem is None:
            return None
        try:
            return self._by_pem[pem]
        except KeyError:
            pass
        identity = identity_from_certificate(x509.load_pem_x509_certificate(pem))
        if len(self._by_pem) >= self._max_entries:
            self._by_pem.clear()
        self._by_pem[pem] = identity
        return identity


def identity_from_certificate(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris:
        return uris[0]
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names:
        value = common_names[0].value
        return value if isinstance(value, str) else value.decode()
    return None
