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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.errors import AccessDenied, ConfigError
from broker.lru import BoundedLru
from broker.names import quoted

CN_PREFIX = "cn:"
MAX_SPIFFE_ID_BYTES = 2048
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")


def check_identities(
    named: Iterable[tuple[str, str]], trust_domains: frozenset[str], cn_fallback: bool
) -> None:
    """Every identity the config names (config key, identity) must be one a certificate can
    have: a SPIFFE ID in a trusted domain, or "cn:NAME" with the CN fallback on."""
    for key, identity in named:
        if identity.startswith(CN_PREFIX):
            if not cn_fallback:
                raise ConfigError(key, f"names {identity!r}, but identity.cn_fallback is off")
            continue
        trust_domain = spiffe_trust_domain(identity)
        if trust_domain is None:
            raise ConfigError(key, f'{identity!r} is neither a SPIFFE ID nor "cn:NAME"')
        if trust_domain not in trust_domains:
            raise ConfigError(key, f"{identity!r} is not in identity.trust_domains")


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


@dataclass(frozen=True)
class CertificateLife:
    """When a client certificate became valid and when it expires (Unix time)."""

    not_before: float
    not_after: float


class _Seen:
    """One certificate met: what it resolved to, its life, and when it was last presented."""

    __slots__ = ("found", "last_used", "life")

    def __init__(self, found: str | AccessDenied, life: CertificateLife, last_used: float) -> None:
        self.found = found
        self.life = life
        self.last_used = last_used


class IdentityResolver:
    """Maps peer certificates to identities, memoising per certificate (refusals too).

    Parsing a certificate costs tens of microseconds; a long-lived client sends the
    same one on every call, so the hot path is one dictionary lookup. The memo also
    remembers when each certificate was last presented, so the broker can tell, per
    identity, which certificate in use expires first (``certificates_in_use``).
    """

    def __init__(
        self,
        trust_domains: Iterable[str],
        cn_fallback: bool = False,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trust_domains = frozenset(trust_domains)
        self._cn_fallback = cn_fallback
        self._clock = clock
        self._by_pem: BoundedLru[bytes, _Seen] = BoundedLru(max_entries)

    def identity(self, auth_context: Mapping[str, Iterable[bytes]]) -> str:
        """The caller's identity; raises AccessDenied (naming why) when it has none we accept."""
        pem = next(iter(auth_context.get("x509_pem_cert", ())), None)
        if pem is None:
            raise AccessDenied("caller presented no client certificate")
        seen = self._by_pem.get(pem)
        if seen is None:
            cert = x509.load_pem_x509_certificate(pem)
            found: str | AccessDenied
            try:
                found = self.from_certificate(cert)
            except AccessDenied as exc:
                found = exc
            life = CertificateLife(
                cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
            )
            seen = self._by_pem.put(pem, _Seen(found, life, self._clock()))
        else:
            seen.last_used = self._clock()
        if isinstance(seen.found, AccessDenied):
            raise AccessDenied(str(seen.found))
        return seen.found

    def certificates_in_use(self, within: float) -> dict[str, CertificateLife]:
        """For each accepted identity, the certificate presented in the last ``within`` seconds
        that expires first: the one whose renewal matters next. A certificate its client has
        replaced drops out once it is no longer presented. Safe from any thread (the metrics
        scrape calls it): it reads a snapshot of the memo, taken in one step under the GIL."""
        since = self._clock() - within
        first: dict[str, CertificateLife] = {}
        for seen in self._by_pem.values():
            if seen.last_used < since or isinstance(seen.found, AccessDenied):
                continue
            current = first.get(seen.found)
            if current is None or seen.life.not_after < current.not_after:
                first[seen.found] = seen.life
        return first

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
