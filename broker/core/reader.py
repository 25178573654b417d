"""The decision for one read, independent of transport: validate, authorize, look up.

Order matters for deny-by-default: the policy is consulted before the declared
secrets, so a caller learns nothing about names it may not read. Only declared
secrets reach the cache, and so Vault.

Grants are remembered: an (identity, name) pair that passed every check maps to
its spec, so a repeated read skips validation and glob matching. The policy and
the declared secrets are fixed for the broker's life, so a grant never goes
stale; the map holds allowed pairs only (at most identities x declared secrets),
never a caller's arbitrary input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from broker.config import SecretSpec
from broker.core.cache import CachedSecret
from broker.core.policy import AccessPolicy
from broker.core.resolver import SecretResolver
from broker.errors import AccessDenied, SecretNotDeclared
from broker.lru import BoundedLru
from broker.names import quoted, validate_secret_name

log = logging.getLogger(__name__)

MAX_GRANTS = 10_000
"""Remembered grants; identities x declared secrets, bounded all the same (identities are
as many as the CA issues)."""


class SecretReader:
    def __init__(
        self, secrets: Mapping[str, SecretSpec], policy: AccessPolicy, resolver: SecretResolver
    ) -> None:
        self._secrets = secrets
        self._policy = policy
        self._resolver = resolver
        self._granted: BoundedLru[tuple[str | None, str], SecretSpec] = BoundedLru(MAX_GRANTS)

    def authorize(self, identity: str | None, name: str) -> SecretSpec:
        """The declared secret ``name``, if ``identity`` may read it; raises otherwise."""
        granted = self._granted.get((identity, name))
        if granted is not None:
            return granted
        validate_secret_name(name)
        if identity is None or not self._policy.allows(identity, name):
            log.info("denied %s to %s", quoted(name), quoted(identity or "no identity"))
            raise AccessDenied("caller may not read this secret")
        spec = self._secrets.get(name)
        if spec is None:
            raise SecretNotDeclared("secret is not declared by this broker")
        return self._granted.put((identity, name), spec)

    async def read(
        self, identity: str | None, name: str, version: int | None = None, min_version: int = 0
    ) -> CachedSecret:
        """``min_version``: the newest version the caller has seen (GetSecretRequest). Not for a
        database secret: each replica serves its own user, and a point read takes this one's
        (the SDK follows a lower version it did not ask for); only a resumed watch, which keeps
        to a version, makes a replica issue a newer user (core/watch.py)."""
        spec = self.authorize(identity, name)
        if spec.database is not None:
            min_version = 0
        hit = self._resolver.fresh(spec) if version is None else None
        if hit is not None and hit.value.version >= min_version:
            return hit
        return await self._resolver.get(spec, version, min_version=min_version)
