"""Bearer tokens for the Media Catalog: HS256 JWTs signed with the broker-served JWT key.

Tokens carry the key's version as ``kid``. A token verifies with the current key;
after a rotation, a token signed with the version just before it still verifies
for ``grace`` seconds from the moment the new version was written to Vault (its
``created_at``), then it is rejected. The previous key is fetched from the broker
by version, so an instance started after the rotation honours the same grace.
A source flip keeps tokens valid when the key's value is unchanged (verification
tries the current key first, whatever the ``kid``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jwt

from catalog.config import JWT_SECRET_KEY
from secretbroker.client import Secret, SecretUnavailable

ALGORITHM = "HS256"
DEFAULT_GRACE = 3600.0
DEFAULT_LIFETIME = 3600.0


MIN_KEY_BYTES = 32  # RFC 7518 section 3.2: an HS256 key at least as long as the hash


class InvalidToken(Exception):
    """The token is not valid now. The message says why; never the token."""


class WeakSigningKey(Exception):
    """The served JWT key is too short to sign or verify with: fail closed."""


class VersionedSecrets(Protocol):
    """Reads a given version of a secret: an AsyncSecretsClient."""

    async def get_secret(self, name: str, version: int | None = None) -> Secret: ...


class TokenAuthority:
    def __init__(
        self,
        current: Callable[[str], Secret],
        versions: VersionedSecrets | None = None,
        grace: float = DEFAULT_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``current`` reads the current key (a live view); ``versions`` fetches the previous
        one (without it, only tokens signed with the current key verify)."""
        self._current = current
        self._versions = versions
        self.grace = grace
        self._clock = clock
        self._previous: dict[int, bytes] = {}
        self._fetching = asyncio.Lock()

    def mint(self, subject: str, lifetime: float = DEFAULT_LIFETIME, **claims: Any) -> str:
        secret = self._current(JWT_SECRET_KEY.name)
        now = int(self._clock())
        payload = {
            **claims,
            "sub": subject,
            "iat": now,
            "exp": now + int(lifetime),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            payload, _key(secret), algorithm=ALGORITHM, headers={"kid": str(secret.version)}
        )

    async def verify(self, token: str) -> Mapping[str, Any]:
        """The token's claims; InvalidToken otherwise. Awaits the broker only for a token
        signed with the previous key, once per version."""
        current = self._current(JWT_SECRET_KEY.name)
        claims = self._decode(token, _key(current))
        if claims is not None:
            return claims
        kid = _kid(token)
        previous_version = current.version - 1
        if kid != previous_version or previous_version < 1 or current.created_at is None:
            raise InvalidToken("token is not signed with the current key")
        if self._clock() >= current.created_at + self.grace:
            raise InvalidToken("token is signed with a rotated key whose grace period has ended")
        claims = self._decode(token, await self._previous_key(previous_version))
        if claims is None:
            raise InvalidToken("token signature is invalid")
        return claims

    def _decode(self, token: str, key: bytes) -> Mapping[str, Any] | None:
        """The claims; None when the signature does not match ``key``."""
        try:
            claims: Mapping[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "iat", "sub"]},
                leeway=5,
            )
        except jwt.InvalidSignatureError:
            return None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"token rejected: {type(exc).__name__}") from None
        return claims

    async def _previous_key(self, version: int) -> bytes:
        """Fetched once per version (concurrent requests wait for the one fetch); a failed
        fetch is not kept, so the next request tries again."""
        async with self._fetching:
            key = self._previous.get(version)
            if key is None:
                key = self._previous[version] = await self._fetch(version)
            return key

    async def _fetch(self, version: int) -> bytes:
        if self._versions is None:
            raise InvalidToken("token is signed with a previous key, which this holder cannot read")
        try:
            secret = await self._versions.get_secret(JWT_SECRET_KEY.name, version=version)
        except SecretUnavailable as exc:
            raise InvalidToken(f"previous key unavailable: {exc.code.name}") from None
        return _key(secret)


def _key(secret: Secret) -> bytes:
    key = secret.data[JWT_SECRET_KEY.key].encode()
    if len(key) < MIN_KEY_BYTES:
        raise WeakSigningKey(
            f"{secret.name} version {secret.version} ({secret.source.value}): the JWT key has"
            f" {len(key)} bytes, fewer than {MIN_KEY_BYTES}"
        )
    return key


def _kid(token: str) -> int | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        return int(kid) if isinstance(kid, str) and kid.isdigit() else None
    except jwt.PyJWTError:
        raise InvalidToken("token is malformed") from None
