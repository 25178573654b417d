"""Who may read what: identity -> secret name patterns, deny by default."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase


class AccessPolicy:
    """Grants each identity the secret names matching its glob patterns, and nothing else.

    Patterns are shell-style globs matched against the whole name; as in a Vault
    policy, ``*`` also matches ``/``, so ``media-catalog/*`` covers nested names.
    An identity absent from the policy may read nothing.
    """

    def __init__(self, rules: Mapping[str, tuple[str, ...]]) -> None:
        self._rules = dict(rules)

    def allows(self, identity: str, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self._rules.get(identity, ()))
