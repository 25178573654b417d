"""SecretsClient: one call to the broker per read, with a deadline and retries (threads)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import grpc

from secretbroker.client._base import (
    GET_SECRET,
    CredentialFiles,
    ReconnectListeners,
    Secret,
    VersionMemory,
)
from secretbroker.client._channel import secure_channel
from secretbroker.client._config import BrokerClientConfig
from secretbroker.client._errors import ClientConfigError, NotReady, SecretUnavailable
from secretbroker.client._files import FileStamp
from secretbroker.client._retry import RetryInterceptor
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

RETIRE_AFTER = 30.0
"""Seconds an old channel stays open after a rebuild, so calls in flight on it finish."""


class SecretsClient:
    """Calls to the broker over one mTLS channel, rebuilt when the certificate files change.

    Point reads never go back a version (``VersionMemory``).

    grpcio cannot reload client credentials, and certificates rotate (an SVID lives about an
    hour). A thread checks the files' stamps every ``reload_interval``; a change that holds
    still for one interval gets a new channel for every call from then on. The old channel is
    closed RETIRE_AFTER seconds later, so calls in flight on it finish; ``on_reconnect``
    listeners (LiveSecrets) move their streams over at once. Open connections are not cut by
    a renewal.
    """

    def __init__(self, config: BrokerClientConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._reconnected = ReconnectListeners()
        self._files = CredentialFiles(config)
        self._versions = VersionMemory()
        self._channel, self._stub = self._connect()
        self.reconnects = 0
        """How often the channel was rebuilt for changed files."""
        self._closed = threading.Event()
        if config.reload_interval > 0:
            threading.Thread(
                target=self._follow_files, name="broker-credentials", daemon=True
            ).start()

    def _connect(self) -> tuple[grpc.Channel, broker_pb2_grpc.SecretBrokerStub]:
        channel = secure_channel(self._config)
        intercepted = grpc.intercept_channel(
            channel, RetryInterceptor(self._config.retry, frozenset({GET_SECRET}))
        )
        return channel, broker_pb2_grpc.SecretBrokerStub(intercepted)

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` (on the reloading thread) after each rebuild of the channel.
        Returns the function that unregisters it."""
        return self._reconnected.add(listener)

    def _follow_files(self) -> None:
        while not self._closed.wait(self._config.reload_interval):
            stamp = self._files.read()
            if self._files.settled_change(stamp):
                self._reconnect(stamp)

    def _reconnect(self, stamp: tuple[FileStamp, ...]) -> None:
        try:
            channel, stub = self._connect()
        except ClientConfigError as exc:
            log.warning("kept the broker channel; its new files cannot be read: %s", exc)
            return
        with self._lock:
            old, self._channel, self._stub = self._channel, channel, stub
        self._files.in_use = stamp
        self.reconnects += 1
        retire = threading.Timer(RETIRE_AFTER, old.close)
        retire.daemon = True
        retire.start()
        log.info("the certificate files changed: new calls use a new channel")
        self._reconnected.notify()

    def wait_until_connected(self, timeout: float) -> None:
        """Block until the channel is connected (handshake done); raise NotReady otherwise."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise NotReady(f"no connection to the broker at {self._config.target}") from None

    def get_secret(self, name: str, version: int | None = None) -> Secret:
        request = self._versions.request(name, version)
        try:
            response = self._stub.GetSecret(request, timeout=self._config.deadline)
        except grpc.RpcError as exc:
            raise SecretUnavailable(name, exc.code(), exc.details() or "") from None
        return self._versions.answer(request, response.secret)

    def watch(
        self, names: Sequence[str], min_versions: Mapping[str, int] | None = None
    ) -> grpc.CallIterator[broker_pb2.WatchSecretsResponse]:
        """A WatchSecrets stream with no deadline; cancel it to end it. ``min_versions``: the
        versions already held, so a resumed watch never starts from an older one."""
        request = broker_pb2.WatchSecretsRequest(names=names, min_versions=min_versions)
        return self._stub.WatchSecrets(request)

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> SecretsClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
