"""SecretsClient: one call to the broker per read, with a deadline and retries."""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import grpc

from secretbroker.client._channel import secure_channel
from secretbroker.client._config import BrokerClientConfig, ClientConfigError
from secretbroker.client._files import FileStamp, file_stamps
from secretbroker.client._retry import RetryInterceptor
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

GET_SECRET = "/secretbroker.v1.SecretBroker/GetSecret"  # noqa: S105 - a method name


class SecretUnavailable(Exception):
    """The broker did not return the secret. Carries the gRPC status code; never a value."""

    def __init__(self, name: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"secret {name!r}: {code.name}: {details}")
        self.name = name
        self.code = code


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


def _stamps(config: BrokerClientConfig) -> tuple[FileStamp, ...]:
    return file_stamps((config.ca_file, config.cert_file, config.key_file))


class SecretLookup(Protocol):
    """What an application reads secrets through: a SecretsClient or LiveSecrets."""

    def get_secret(self, name: str) -> Secret: ...


class SecretsClient:
    """Calls to the broker over one mTLS channel, rebuilt when the certificate files change.

    Point reads never go back a version: the client sends, per name, the newest Vault version
    it has been given (``min_version``), and a replica whose cache is older asks Vault's active
    node first. An answer below it that is not flagged stale is Vault's own word (a restore
    from a snapshot), and the client follows it.

    grpcio cannot reload client credentials, and certificates rotate (an SVID lives about an
    hour). A thread checks the files' stamps every ``reload_interval``; a change that holds
    still for one interval (so a pair written file by file is not taken half-way) gets a new
    channel for every call from then on. The old channel is closed RETIRE_AFTER seconds
    later, so calls in flight on it finish; ``on_reconnect`` listeners (LiveSecrets) move
    their streams over at once. Open connections are not cut by a renewal.
    """

    RETIRE_AFTER = 30.0

    def __init__(self, config: BrokerClientConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._stamp = _stamps(config)
        self._seen: dict[str, int] = {}
        """The newest Vault version given per name (what min_version asks for)."""
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

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the reloading thread) after each rebuild of the channel."""
        self._listeners.append(listener)

    def _follow_files(self) -> None:
        seen = self._stamp
        while not self._closed.wait(self._config.reload_interval):
            stamp = _stamps(self._config)
            if stamp != seen:  # changed: wait one more interval for it to hold still
                seen = stamp
                continue
            if stamp != self._stamp:
                self._reconnect(stamp)

    def _reconnect(self, stamp: tuple[FileStamp, ...]) -> None:
        try:
            channel, stub = self._connect()
        except ClientConfigError as exc:
            log.warning("kept the broker channel; its new files cannot be read: %s", exc)
            return
        with self._lock:
            old, self._channel, self._stub, self._stamp = self._channel, channel, stub, stamp
        self.reconnects += 1
        retire = threading.Timer(self.RETIRE_AFTER, old.close)
        retire.daemon = True
        retire.start()
        log.info("the certificate files changed: new calls use a new channel")
        for listener in list(self._listeners):
            listener()

    def wait_until_connected(self, timeout: float) -> None:
        """Block until the channel is connected (handshake done); raise TimeoutError otherwise."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"no connection to the broker at {self._config.target}") from None

    def get_secret(self, name: str, version: int | None = None) -> Secret:
        seen = self._seen.get(name) if version is None else None
        request = broker_pb2.GetSecretRequest(name=name, version=version, min_version=seen)
        try:
            response = self._stub.GetSecret(request, timeout=self._config.deadline)
        except grpc.RpcError as exc:
            raise SecretUnavailable(name, exc.code(), exc.details() or "") from None
        secret = secret_from_message(response.secret)
        if version is None and secret.source is SecretSource.VAULT:
            self._remember(name, secret, seen or 0)
        return secret

    def _remember(self, name: str, secret: Secret, asked: int) -> None:
        if secret.stale or secret.version >= asked:
            self._seen[name] = max(self._seen.get(name, 0), secret.version)
        else:  # below what was asked, fresh from Vault's active node: a restore; follow it
            self._seen[name] = secret.version

    def watch(self, names: Sequence[str]) -> grpc.CallIterator[broker_pb2.WatchSecretsResponse]:
        """A WatchSecrets stream with no deadline; cancel it to end it."""
        return self._stub.WatchSecrets(broker_pb2.WatchSecretsRequest(names=names))

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
