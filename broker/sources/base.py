"""What every source returns."""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from broker.config import SecretSpec


class SourceKind(enum.Enum):
    VAULT = "vault"
    ENV = "env"


@dataclass(frozen=True)
class SecretValue:
    """One read of a secret. ``data`` holds the values: never log or format this object."""

    data: Mapping[str, str]
    version: int
    source: SourceKind
    fetched_at: float
    """Wall-clock time (seconds since the epoch) of the read."""
    created_at: float | None = None
    """Wall-clock time this version was written to Vault; None for env."""

    def __repr__(self) -> str:  # the values must not reach a log line by accident
        keys = sorted(self.data)
        return f"SecretValue(keys={keys}, version={self.version}, source={self.source.value})"


LAG_WINDOW = 10.0
"""Seconds after the broker read a version during which an older answer counts as a lagging
standby's (they lag by well under a second); after that, an older version is Vault's word: a
restore from a snapshot that predates the newer one."""


def behind(
    version: int, created_at: float | None, held: SecretValue | None, now: float | None = None
) -> bool:
    """Whether a Vault answer (``version``, written at ``created_at``) is from before the
    Vault value the broker holds and read less than LAG_WINDOW ago: a lower version, written
    no later. A standby that lags answers so for about half a second after a write, and such
    an answer must not replace the newer value. A lower version written later is news: the
    secret was deleted and written anew."""
    if held is None or held.source is not SourceKind.VAULT or version >= held.version:
        return False
    if (time.time() if now is None else now) - held.fetched_at > LAG_WINDOW:
        return False
    return (created_at or 0.0) <= (held.created_at or 0.0)


class SecretStore(Protocol):
    """Where secrets are read from (Vault, or env in a rollback), as the cache sees it."""

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        """Read the current value, or the given version; blocking. Raises only broker errors.
        ``newest``: from where the latest write is sure to be (Vault's active node), for a
        caller that has seen a version newer than the cached one."""
        ...


T = TypeVar("T")


class RunBlocking(Protocol):
    """Runs a blocking source call off the event loop (the broker's Vault I/O pool)."""

    def __call__(self, call: Callable[[], T], /) -> Awaitable[T]: ...


class RoutedStore:
    """The cache's one source: database secrets from their lease keeper, the rest from KV."""

    def __init__(self, kv: SecretStore, database: SecretStore) -> None:
        self._kv = kv
        self._database = database

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        store = self._kv if spec.database is None else self._database
        return store.read(spec, version, newest=newest)
