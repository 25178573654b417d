"""What a live view holds, shared by LiveSecrets (threads) and AsyncLiveSecrets (asyncio): the
values a watch delivered, the rule that keeps them from going back a version, and who is told
when one changes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from secretbroker.client._base import Secret, SecretSource, secret_from_message
from secretbroker.client._errors import NotWatched, SecretUnavailable
from secretbroker.v1 import broker_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecretChange:
    """A watched secret's value, version or source changed. Never printed with its values
    (``Secret.data`` is left out of the repr)."""

    name: str
    previous: Secret
    current: Secret


ChangeListener = Callable[[SecretChange], None]


class HeldSecrets:
    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(dict.fromkeys(names))
        self._values: dict[str, Secret] = {}
        self._listeners: list[ChangeListener] = []
        self.last_error: SecretUnavailable | None = None
        """Why the stream last broke (or was refused), if it ever did."""

    @property
    def complete(self) -> bool:
        return len(self._values) == len(self.names)

    def versions(self) -> dict[str, int]:
        """The version held of each name that has one (env-served values have none)."""
        return {name: secret.version for name, secret in self._values.items() if secret.version}

    def get(self, name: str) -> Secret:
        secret = self._values.get(name)
        if secret is None:
            if name not in self.names:
                raise NotWatched(f"{name!r} is not among the watched secrets")
            raise self.last_error or SecretUnavailable(
                name, grpc.StatusCode.UNAVAILABLE, "no value received from the broker yet"
            )
        return secret

    def broke(self, code: grpc.StatusCode, details: str) -> SecretUnavailable:
        self.last_error = SecretUnavailable(",".join(self.names), code, details)
        return self.last_error

    def on_change(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` with each change from now on; returns the function that stops it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def store(self, secret: Secret) -> SecretChange | None:
        """Hold ``secret`` unless it is older than the value held; the change, if it is one."""
        previous = self._values.get(secret.name)
        if previous is not None and _older(secret, previous):
            # A watch resumed on another broker replica, whose cache has not caught up yet:
            # keep the newer value; that replica sends the new version once it sees it.
            log.debug(
                "kept version %d of %r over the older %d",
                previous.version,
                secret.name,
                secret.version,
            )
            return None
        self._values[secret.name] = secret
        if previous is None or (previous.version, previous.source, previous.data) == (
            secret.version,
            secret.source,
            secret.data,
        ):
            return None
        log.info("secret %r changed: version %d", secret.name, secret.version)
        change = SecretChange(secret.name, previous, secret)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # the application's callback: its failure must not end the watch
                log.exception("a change listener for %r failed", secret.name)
        return change


def _older(secret: Secret, held: Secret) -> bool:
    """A Vault version from before the one held: lower, and written no later (a lower version
    written later means the secret was deleted and written anew, which is news)."""
    return (
        secret.source is SecretSource.VAULT
        and held.source is SecretSource.VAULT
        and secret.version < held.version
        and (secret.created_at or 0.0) <= (held.created_at or 0.0)
    )


class _Event(Protocol):
    def set(self) -> None: ...


class LiveView:
    """What LiveSecrets (a thread) and AsyncLiveSecrets (a task) share: reading the values held,
    and holding what the watch delivers."""

    _held: HeldSecrets
    _complete: _Event
    connected: bool
    """Whether the stream is open and has delivered since it last (re)opened."""

    def get_secret(self, name: str) -> Secret:
        """The value held: a dictionary lookup, no I/O."""
        return self._held.get(name)

    @property
    def last_error(self) -> SecretUnavailable | None:
        """Why the stream last broke (or was refused), if it ever did."""
        return self._held.last_error

    def on_change(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener(change)`` whenever a watched secret's value, version or source
        changes: on the watch's thread (LiveSecrets) or on the event loop (AsyncLiveSecrets),
        so it must not block. Returns the function that unregisters it."""
        return self._held.on_change(listener)

    def _store(self, response: broker_pb2.WatchSecretsResponse) -> None:
        self._held.store(secret_from_message(response.secret))
        self.connected = True
        if self._held.complete:
            self._complete.set()
