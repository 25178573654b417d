"""Secrets in Vault's KV v2 engine, read and rotated with the broker's own token."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from broker.config import SecretSpec, VaultConfig
from broker.errors import SecretMissingInSource, SourceDenied
from broker.metrics import BrokerMetrics
from broker.sources.base import SecretValue, SourceKind
from broker.sources.vault_errors import translate_vault_errors
from broker.sources.vault_session import VaultSession

T = TypeVar("T")


@dataclass(frozen=True)
class VersionInfo:
    """KV v2 metadata of a secret's current version."""

    version: int
    created_at: float


class VaultSource:
    """Reads declared secrets from one KV v2 mount. Blocking: run it off the event loop."""

    def __init__(
        self,
        config: VaultConfig,
        session: VaultSession | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._config = config
        self.session = session or VaultSession(config, metrics=metrics)

    def read(self, spec: SecretSpec, version: int | None = None) -> SecretValue:
        """The secret as served: its declared keys only, the same shape an env-sourced answer
        has. Raises SecretMissingInSource when Vault's value lacks a declared key."""
        return declared_keys_of(spec, self.read_all(spec, version))

    def read_all(self, spec: SecretSpec, version: int | None = None) -> SecretValue:
        """Every key Vault holds at the secret's path: what a rotation writes back."""
        return self._with_token(lambda: self._read(spec, version))

    def current_version(self, spec: SecretSpec) -> VersionInfo:
        """The current version and when it was written, from metadata: no secret value."""
        return self._with_token(lambda: self._current_version(spec))

    def write_version(
        self, spec: SecretSpec, data: Mapping[str, str], expected_version: int
    ) -> SecretValue:
        """Write ``data`` as the next version, only if ``expected_version`` is still current
        (check-and-set); raises WriteConflict otherwise."""
        return self._with_token(lambda: self._write(spec, data, expected_version))

    def _with_token(self, call: Callable[[], T]) -> T:
        token = self.session.token()
        try:
            return call()
        except SourceDenied:
            # A dead token (revoked, expired) looks like the policy refusing the path; retry
            # once only when the session found the token dead and replaced it.
            if not self.session.replace_if_dead(token):
                raise
            return call()

    def _read(self, spec: SecretSpec, version: int | None) -> SecretValue:
        at = "" if version is None else f" version {version}"
        operation = f"read of {self._where(spec)}{at}"
        body = self.session.nodes.call(
            "read",
            operation,
            lambda client: client.secrets.kv.v2.read_secret_version(
                path=spec.path,
                version=version,
                mount_point=self._config.mount,
                raise_on_deleted_version=True,
            )["data"],
        )
        with translate_vault_errors(operation, self._config.timeout):  # for the body's shape
            metadata = body["metadata"]
            data = {
                str(key): value if isinstance(value, str) else json.dumps(value)
                for key, value in body["data"].items()
            }
            return SecretValue(
                data=data,
                version=int(metadata["version"]),
                source=SourceKind.VAULT,
                fetched_at=time.time(),
                created_at=_timestamp(metadata["created_time"]),
            )

    def _current_version(self, spec: SecretSpec) -> VersionInfo:
        operation = f"metadata read of {self._where(spec)}"
        metadata = self.session.nodes.call(
            "metadata",
            operation,
            lambda client: client.secrets.kv.v2.read_secret_metadata(
                path=spec.path, mount_point=self._config.mount
            )["data"],
        )
        with translate_vault_errors(operation, self._config.timeout):
            current = int(metadata["current_version"])
            created = metadata["versions"][str(current)]["created_time"]
            return VersionInfo(current, _timestamp(created))

    def _write(
        self, spec: SecretSpec, data: Mapping[str, str], expected_version: int
    ) -> SecretValue:
        operation = f"write of {self._where(spec)}"
        metadata = self.session.nodes.call(
            "write",
            operation,
            lambda client: client.secrets.kv.v2.create_or_update_secret(
                path=spec.path,
                secret=dict(data),
                cas=expected_version,
                mount_point=self._config.mount,
            )["data"],
            write=True,
        )
        with translate_vault_errors(operation, self._config.timeout):
            return SecretValue(
                data=dict(data),
                version=int(metadata["version"]),
                source=SourceKind.VAULT,
                fetched_at=time.time(),
                created_at=_timestamp(metadata["created_time"]),
            )

    def _where(self, spec: SecretSpec) -> str:
        return f"{self._config.mount}/{spec.path}"


def _timestamp(rfc3339: str) -> float:
    """Vault's created_time, e.g. "2026-11-28T12:00:00.123456789Z", as epoch seconds."""
    text = rfc3339.rstrip("Z")
    whole, _, fraction = text.partition(".")
    seconds = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC).timestamp()
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)


def declared_keys_of(spec: SecretSpec, value: SecretValue) -> SecretValue:
    missing = [key for key in spec.keys if key not in value.data]
    if missing:
        raise SecretMissingInSource(
            f"vault's value at {spec.path} lacks the declared key"
            f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        )
    if len(value.data) == len(spec.keys):
        return value
    return dataclasses.replace(value, data={key: value.data[key] for key in spec.keys})
