"""Who is calling: the identity in the peer's verified client certificate.

gRPC has verified the certificate chain against the configured client CA before a
handler runs. The identity follows the X.509-SVID rule of SPIFFE: the certificate
carries exactly one URI SAN, and it is a valid SPIFFE ID
(``spiffe://media.local/catalog``) in a trust domain the broker trusts. Anything
else is refused (AccessDenied, so PERMISSION_DENIED), with the reason.

A certificate without any URI SAN may be identified by its subject common name
only when ``identity.cn_fallback`` is on, and then as ``cn:NAME``: CN identities
live in their own namespace, so no common name can ever spell a SPIFFE ID.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.errors import AccessDenied
from broker.lru import BoundedLru
from broker.names import quoted

CN_PREFIX = "cn:"
MAX_SPIFFE_ID_BYTES = 2048
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")


def spiffe_trust_domain(identity: str) -> str | None:
    """The trust domain of a valid SPIFFE ID, else None (see the SPIFFE ID spec: lower-case
    trust domain, no port or user info, path segments of [A-Za-z0-9._-] that are not empty,
    "." or "..", no query or fragment)."""
    if len(identity.encode()) > MAX_SPIFFE_ID_BYTES:
        return None
    match = _SPIFFE_ID.fullmatch(identity)
    if match is None:
        return None
    if any(segment in (".", "..") for segment in match.group(2).split("/")[1:]):
        return None
    return match.group(1)


class IdentityResolver:
    """Maps peer certificates to identities, memoising per certificate (refusals too).

    Parsing a certificate costs tens of microseconds; a long-lived client sends the
    same one on every call, so the hot path is one dictionary lookup.
    """

    def __init__(
        self,
        trust_domains: Iterable[str],
        cn_fallback: bool = False,
        max_entries: int = 10_000,
    ) -> None:
        self._trust_domains = frozenset(trust_domains)
        self._cn_fallback = cn_fallback
        self._by_pem: BoundedLru[bytes, str | AccessDenied] = BoundedLru(max_entries)

    def identity(self, auth_context: Mapping[str, Iterable[bytes]]) -> str:
        """The caller's identity; raises AccessDenied (naming why) when it has none we accept."""
        pem = next(iter(auth_context.get("x509_pem_cert", ())), None)
        if pem is None:
            raise AccessDenied("caller presented no client certificate")
        found = self._by_pem.get(pem)
        if found is None:
            try:
                found = self.from_certificate(x509.load_pem_x509_certificate(pem))
            except AccessDenied as exc:
                found = exc
            self._by_pem.put(pem, found)
        if isinstance(found, AccessDenied):
            raise AccessDenied(str(found))
        return found

    def from_certificate(self, cert: x509.Certificate) -> str:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) > 1:
            raise AccessDenied(
                f"client certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one"
            )
        if uris:
            domain = spiffe_trust_domain(uris[0])
            if domain is None:
                raise AccessDenied("client certificate's URI SAN is not a valid SPIFFE ID")
            if domain not in self._trust_domains:
                raise AccessDenied(
                    f"client certificate's SPIFFE ID is in trust domain {quoted(domain)},"
                    " which this broker does not trust"
                )
            return uris[0]
        if not self._cn_fallback:
            raise AccessDenied(
                "client certificate has no URI SAN (SPIFFE ID), and identity.cn_fallback is off"
            )
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not common_names:
            raise AccessDenied("client certificate has neither a URI SAN nor a common name")
        value = common_names[0].value
        return CN_PREFIX + (value if isinstance(value, str) else value.decode())
