"""Secrets in Vault's KV v2 engine, read and rotated with the broker's own token."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from broker.config import SecretSpec, VaultConfig
from broker.errors import (
    LoginRefused,
    SecretMissingInSource,
    SourceUnavailable,
    WriteConflict,
)
from broker.sources.base import SecretValue, SourceKind
from broker.sources.observer import VaultObserver
from broker.sources.vault_errors import translate_vault_errors
from broker.sources.vault_session import VaultSession

log = logging.getLogger(__name__)
T = TypeVar("T")

WRITE_SETTLE = 15.0
"""Seconds a write with no definite answer is retried: longer than a raft election with
OpenBao's default timing (about 9 s), so a leader lost mid-write ends in a definite answer."""
WRITE_RETRY_PAUSE = 0.25


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
        observer: VaultObserver | None = None,
    ) -> None:
        self._config = config
        self.session = session or VaultSession(config, observer=observer)

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        """The secret as served: its declared keys only, the same shape an env-sourced answer
        has. Raises SecretMissingInSource when Vault's value lacks a declared key. ``newest``
        asks the active node first, which holds every write."""
        return declared_keys_of(spec, self.read_all(spec, version, newest=newest))

    def read_all(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        """Every key Vault holds at the secret's path: what a rotation writes back."""
        return self.session.with_token(lambda: self._read(spec, version, newest))

    def current_version(self, spec: SecretSpec) -> VersionInfo:
        """The current version and when it was written, from metadata: no secret value."""
        return self.session.with_token(lambda: self._current_version(spec))

    def write_version(
        self, spec: SecretSpec, data: Mapping[str, str], expected_version: int
    ) -> SecretValue:
        """Write ``data`` as the next version, only if ``expected_version`` is still current
        (check-and-set); raises WriteConflict otherwise.

        Vault can commit a write and lose the answer (the leader dies in between). Check-and-set
        makes the write safe to repeat, so a write no node answered is sent again for up to
        WRITE_SETTLE; and a conflict is checked against the next version: when that version
        holds exactly ``data`` (a rotation's fresh random value makes this a proof), the write
        was this one, and it succeeded."""
        deadline = time.monotonic() + WRITE_SETTLE
        first = True
        while True:
            try:
                return self.session.with_token(lambda: self._write(spec, data, expected_version))
            except WriteConflict:
                landed = self._landed(spec, data, expected_version + 1, deadline)
                if landed is None:
                    raise
                return landed
            except LoginRefused:
                raise
            except SourceUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise
                if first:
                    log.warning("%s; sending it again for up to %gs", exc, WRITE_SETTLE)
                first = False
                time.sleep(WRITE_RETRY_PAUSE)

    def _landed(
        self, spec: SecretSpec, data: Mapping[str, str], version: int, deadline: float
    ) -> SecretValue | None:
        """``version`` if it holds exactly ``data``; None if it holds something else, or if no
        node shows it before ``deadline`` (a lagging standby, or a deleted version)."""
        while True:
            try:
                found = self.read_all(spec, version)
            except LoginRefused:
                raise
            except (SecretMissingInSource, SourceUnavailable):
                if time.monotonic() >= deadline:
                    return None
                time.sleep(WRITE_RETRY_PAUSE)
                continue
            if found.data != dict(data):
                return None
            log.info(
                "write of %s landed as version %d although its answer was lost",
                self._where(spec),
                version,
            )
            return found

    def _read(self, spec: SecretSpec, version: int | None, newest: bool = False) -> SecretValue:
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
            prefer_active=newest,
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
                created_at=rfc3339_seconds(metadata["created_time"]),
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
            return VersionInfo(current, rfc3339_seconds(created))

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
                created_at=rfc3339_seconds(metadata["created_time"]),
            )

    def _where(self, spec: SecretSpec) -> str:
        return f"{self._config.mount}/{spec.path}"


def rfc3339_seconds(rfc3339: str) -> float:
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
