"""The Media Catalog's configuration, read through the broker only. No defaults, no fallbacks:
a secret the broker cannot give raises, so the catalog fails closed."""

from __future__ import annotations

from dataclasses import dataclass

from secretbroker.client import SecretLookup


class MissingSecretKey(Exception):
    """The secret exists but lacks the key Config needs."""


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


DATABASE_URL = SecretRef("media-catalog/database", "url")
JWT_SECRET_KEY = SecretRef("media-catalog/api", "jwt_secret")
TMDB_API_KEY = SecretRef("media-catalog/external", "tmdb_api_key")
CONFIG_SECRETS = tuple(
    dict.fromkeys(ref.name for ref in (DATABASE_URL, JWT_SECRET_KEY, TMDB_API_KEY))
)
"""The secrets Config reads: what a LiveSecrets for it should watch."""
CONFIG_PROPERTIES = {
    "database_url": DATABASE_URL,
    "jwt_secret_key": JWT_SECRET_KEY,
    "tmdb_api_key": TMDB_API_KEY,
}
"""Config's properties, each with the secret and key it reads."""


class Config:
    """``app/config.py``'s properties, each a read through ``secrets``: a SecretsClient (one
    broker call per read) or, in a service, a LiveSecrets (memory, kept current by a watch)."""

    def __init__(self, secrets: SecretLookup) -> None:
        self._client = secrets

    @property
    def database_url(self) -> str:
        return self._read(DATABASE_URL)

    @property
    def jwt_secret_key(self) -> str:
        return self._read(JWT_SECRET_KEY)

    @property
    def tmdb_api_key(self) -> str:
        return self._read(TMDB_API_KEY)

    def _read(self, ref: SecretRef) -> str:
        secret = self._client.get_secret(ref.name)
        try:
            return secret.data[ref.key]
        except KeyError:
            raise MissingSecretKey(f"secret {ref.name!r} has no key {ref.key!r}") from None
