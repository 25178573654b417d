"""What the sync and the asyncio SDK share: the secret as the SDK gives it, the version memory
behind ``min_version``, and when rotated certificate files call for a new channel. Pure: no
I/O but ``CredentialFiles.read`` (a few stat calls), no threads, no event loop."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from secretbroker.client._config import BrokerClientConfig
from secretbroker.client._files import FileStamp, file_stamps
from secretbroker.v1 import broker_pb2

GET_SECRET = "/secretbroker.v1.SecretBroker/GetSecret"  # noqa: S105 - a method name


class SecretSource(enum.Enum):
    VAULT = "vault"
    ENV = "env"
    UNKNOWN = "unknown"


_SOURCES = {broker_pb2.SOURCE_VAULT: SecretSource.VAULT, broker_pb2.SOURCE_ENV: SecretSource.ENV}


@dataclass(frozen=True)
class Secret:
    name: str
    data: Mapping[str, str] = field(repr=False)
    version: int
    source: SecretSource
    stale: bool
    fetched_at: float
    created_at: float | None = None
    """When this version was written to Vault; None for secrets served from env."""


def secret_from_message(message: broker_pb2.Secret) -> Secret:
    return Secret(
        name=message.name,
        data=dict(message.data),
        version=message.version,
        source=_SOURCES.get(message.source, SecretSource.UNKNOWN),
        stale=message.stale,
        fetched_at=message.fetched_at.ToNanoseconds() / 1e9,
        created_at=message.created_at.ToNanoseconds() / 1e9
        if message.HasField("created_at")
        else None,
    )


class SecretLookup(Protocol):
    """What an application reads secrets through: a SecretsClient or a live view."""

    def get_secret(self, name: str) -> Secret: ...


class VersionMemory:
    """Point reads never go back a version: per name, the newest Vault version given so far is
    sent as ``min_version``, and a replica whose cache is older asks Vault's active node first.
    An answer below it that is not flagged stale is Vault's own word (a restore from a
    snapshot), and is followed."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def request(self, name: str, version: int | None) -> broker_pb2.GetSecretRequest:
        seen = self._seen.get(name) if version is None else None
        return broker_pb2.GetSecretRequest(name=name, version=version, min_version=seen)

    def answer(self, request: broker_pb2.GetSecretRequest, message: broker_pb2.Secret) -> Secret:
        """The secret of an answer to ``request``, remembered when it was a read of the latest."""
        secret = secret_from_message(message)
        if request.HasField("version") or secret.source is not SecretSource.VAULT:
            return secret
        asked = request.min_version
        if secret.stale or secret.version >= asked:
            self._seen[secret.name] = max(self._seen.get(secret.name, 0), secret.version)
        else:  # below what was asked, fresh from Vault's active node: a restore; follow it
            self._seen[secret.name] = secret.version
        return secret


class CredentialFiles:
    """Whether the CA, certificate and key files changed, and held still for one check (so a
    pair written file by file is not taken half-way)."""

    def __init__(self, config: BrokerClientConfig) -> None:
        self._paths = (config.ca_file, config.cert_file, config.key_file)
        self.in_use = self.read()
        self._last = self.in_use

    def read(self) -> tuple[FileStamp, ...]:
        return file_stamps(self._paths)

    def settled_change(self, stamp: tuple[FileStamp, ...]) -> bool:
        """Given the stamp just read: whether a new channel should be built from the files now."""
        if stamp != self._last:  # changed: wait one more check for it to hold still
            self._last = stamp
            return False
        return stamp != self.in_use


class ReconnectListeners:
    """Who is told, after the channel was rebuilt for changed files (the live views, which
    move their streams over at once)."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def add(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Register ``listener``; returns the function that unregisters it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def notify(self) -> None:
        for listener in list(self._listeners):
            listener()
