"""LiveSecrets: a few secrets held in memory, kept current by a WatchSecrets stream (a thread)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import TracebackType

import grpc

from secretbroker.client._backoff import Backoff
from secretbroker.client._client import SecretsClient
from secretbroker.client._errors import NotReady
from secretbroker.client._held import HeldSecrets, LiveView
from secretbroker.v1 import broker_pb2

log = logging.getLogger(__name__)

RESUME_BACKOFF = Backoff(initial=1.0, maximum=5.0)
"""How a broken watch waits before it resumes: the first wait is drawn below 1 s. A replica's
loss breaks every stream it held at once, fleet-wide; drawn waits spread their arrival at the
other replicas over that second instead of one tick. The values held are served meanwhile,
and the resumed stream re-sends the current values, so the wait costs no read."""


class LiveSecrets(LiveView):
    """The current values of ``names``, kept up to date by a WatchSecrets stream.

    ``get_secret`` is a dictionary lookup. When the stream breaks (broker restart,
    network), the last good values keep being served while a background thread
    resumes the stream with backoff; resuming re-sends the current values, so a
    change missed meanwhile arrives then. ``on_change`` callbacks run on that thread.
    Use it as a context manager, or call ``close``.
    """

    def __init__(
        self, client: SecretsClient, names: Sequence[str], backoff: Backoff = RESUME_BACKOFF
    ) -> None:
        self._client = client
        self._held = HeldSecrets(names)
        self._backoff = backoff
        self._complete: threading.Event = threading.Event()
        self._closed = threading.Event()
        self._wake = threading.Event()
        """Ends a backoff wait early: on close, and when the client has a new channel."""
        self._lock = threading.Lock()
        self._call: grpc.CallIterator[broker_pb2.WatchSecretsResponse] | None = None
        self._moving = False
        """The open call was cancelled to move it to the client's new channel."""
        self.connected = False
        self._stop_listening = client.on_reconnect(self._move)
        self._thread = threading.Thread(target=self._follow, name="secrets-watch", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> None:
        """Block until every name has a value; raise the last error, or NotReady."""
        if not self._complete.wait(timeout):
            if self._held.last_error is not None:
                raise self._held.last_error
            raise NotReady("no values from the broker yet")

    def close(self) -> None:
        self._stop_listening()
        self._closed.set()
        self._wake.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        self._thread.join(timeout=10)

    def __enter__(self) -> LiveSecrets:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _move(self) -> None:
        """The client has a new channel (rotated certificates): reopen the stream on it now.
        An open call is cancelled and flagged as a move; a backoff wait just ends early. The
        values held keep being served meanwhile."""
        with self._lock:
            call = self._call
            self._moving = call is not None
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        else:
            self._wake.set()

    def _follow(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            try:
                with self._lock:
                    self._call = self._client.watch(self._held.names, self._held.versions())
                for response in self._call:
                    self._store(response)
                    attempt = 0
            except grpc.RpcError as exc:
                with self._lock:
                    self._call, moved, self._moving = None, self._moving, False
                if self._closed.is_set():
                    return
                if moved:
                    continue  # onto the new channel, at once
                code = exc.code()
                self._held.broke(code, exc.details() or "")
                log.warning("secrets watch broke (%s); resuming with backoff", code.name)
            else:
                with self._lock:
                    self._call, self._moving = None, False
                log.warning("secrets watch ended by the broker; resuming")
            self.connected = False
            self._wake.wait(self._backoff.delay(attempt))
            self._wake.clear()
            attempt += 1
