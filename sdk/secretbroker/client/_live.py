"""LiveSecrets: a few secrets held in memory, kept current by a WatchSecrets stream."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import grpc

from secretbroker.client._backoff import Backoff
from secretbroker.client._client import (
    Secret,
    SecretsClient,
    SecretSource,
    SecretUnavailable,
    secret_from_message,
)
from secretbroker.v1 import broker_pb2

log = logging.getLogger(__name__)

RESUME_BACKOFF = Backoff(initial=1.0, maximum=5.0)
"""How a broken watch waits before it resumes: the first wait is drawn below 1 s. A replica's
loss breaks every stream it held at once, fleet-wide; drawn waits spread their arrival at the
other replicas over that second instead of one tick. The values held are served meanwhile,
and the resumed stream re-sends the current values, so the wait costs no read."""


class LiveSecrets:
    """The current values of ``names``, kept up to date by a WatchSecrets stream.

    ``get_secret`` is a dictionary lookup. When the stream breaks (broker restart,
    network), the last good values keep being served while a background thread
    resumes the stream with backoff; resuming re-sends the current values, so a
    change missed meanwhile arrives then.
    """

    def __init__(
        self, client: SecretsClient, names: Sequence[str], backoff: Backoff = RESUME_BACKOFF
    ) -> None:
        self._client = client
        self._names = list(dict.fromkeys(names))
        self._backoff = backoff
        self._values: dict[str, Secret] = {}
        self._complete = threading.Event()
        self._closed = threading.Event()
        self._call: grpc.CallIterator[broker_pb2.WatchSecretsResponse] | None = None
        self._last_error: SecretUnavailable | None = None
        self.connected = False
        """Whether the stream is open and has delivered since it last (re)opened."""
        self._moving = threading.Event()
        client.on_reconnect(self._move)
        self._thread = threading.Thread(target=self._follow, name="secrets-watch", daemon=True)
        self._thread.start()

    def get_secret(self, name: str) -> Secret:
        secret = self._values.get(name)
        if secret is None:
            error = self._last_error
            if name not in self._names:
                raise KeyError(f"{name!r} is not among the watched secrets")
            raise error or SecretUnavailable(
                name, grpc.StatusCode.UNAVAILABLE, "no value received from the broker yet"
            )
        return secret

    @property
    def last_error(self) -> SecretUnavailable | None:
        """Why the stream last broke (or was refused), if it ever did."""
        return self._last_error

    def wait_ready(self, timeout: float) -> None:
        """Block until every name has a value; raise the last error, or TimeoutError."""
        if not self._complete.wait(timeout):
            if self._last_error is not None:
                raise self._last_error
            raise TimeoutError("no values from the broker yet")

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        self._thread.join(timeout=10)

    def _move(self) -> None:
        """The client has a new channel (rotated certificates): reopen the stream on it now.
        The values held keep being served meanwhile."""
        self._moving.set()
        call = self._call
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

    def _follow(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            try:
                self._call = self._client.watch(self._names)
                for response in self._call:
                    self._store(secret_from_message(response.secret))
                    self.connected = True
                    attempt = 0
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                if self._moving.is_set():
                    self._moving.clear()
                    continue  # onto the new channel, at once
                code = exc.code()
                names = ",".join(self._names)
                self._last_error = SecretUnavailable(names, code, exc.details() or "")
                log.warning("secrets watch broke (%s); resuming with backoff", code.name)
            else:
                log.warning("secrets watch ended by the broker; resuming")
            self.connected = False
            self._closed.wait(self._backoff.delay(attempt))
            attempt += 1

    def _store(self, secret: Secret) -> None:
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
            return
        self._values[secret.name] = secret
        if len(self._values) == len(self._names):
            self._complete.set()
        if previous is not None and (previous.version, previous.data) != (
            secret.version,
            secret.data,
        ):
            log.info("secret %r changed: version %d", secret.name, secret.version)


def _older(secret: Secret, held: Secret) -> bool:
    """A Vault version from before the one held: lower, and written no later (a lower version
    written later means the secret was deleted and written anew, which is news)."""
    return (
        secret.source is SecretSource.VAULT
        and held.source is SecretSource.VAULT
        and secret.version < held.version
        and (secret.created_at or 0.0) <= (held.created_at or 0.0)
    )
