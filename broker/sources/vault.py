"""Secrets from Vault's KV v2 engine, read with the broker's own token."""

from __future__ import annotations

import json
import time

from broker.config import SecretSpec, VaultConfig
from broker.errors import SourceDenied
from broker.sources.base import SecretValue, SourceKind
from broker.sources.vault_errors import translate_vault_errors
from broker.sources.vault_session import VaultSession


class VaultSource:
    """Reads declared secrets from one KV v2 mount. Blocking: run it off the event loop."""

    def __init__(self, config: VaultConfig, session: VaultSession | None = None) -> None:
        self._config = config
        self.session = session or VaultSession(config)

    def read(self, spec: SecretSpec) -> SecretValue:
        token = self.session.token()
        try:
            return self._read(spec)
        except SourceDenied:
            # A revoked or expired token looks like any other denial; retry once with a fresh login.
            self.session.replace_rejected_token(token)
            return self._read(spec)

    def _read(self, spec: SecretSpec) -> SecretValue:
        operation = f"read of {self._config.mount}/{spec.path}"
        with translate_vault_errors(operation, self._config.timeout):
            response = self.session.client.secrets.kv.v2.read_secret_version(
                path=spec.path, mount_point=self._config.mount, raise_on_deleted_version=True
            )
            body = response["data"]
            version = int(body["metadata"]["version"])
            data = {
                str(key): value if isinstance(value, str) else json.dumps(value)
                for key, value in body["data"].items()
            }
        return SecretValue(
            data=data, version=version, source=SourceKind.VAULT, fetched_at=time.time()
        )
