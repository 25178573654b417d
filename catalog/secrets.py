"""A client of the secrets broker: mutual TLS from certificate files, a deadline on every call,
retries with backoff on UNAVAILABLE and DEADLINE_EXCEEDED.

``SecretsClient.get_secret`` asks the broker on every call. ``LiveSecrets`` holds the
values of a few secrets in memory, kept current by a WatchSecrets stream that it
resumes with backoff when the broker goes away; reads never touch the network.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import grpc
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

from catalog.retry import RetryInterceptor, RetryPolicy

log = logging.getLogger(__name__)

GET_SECRET = "/secretbroker.v1.SecretBroker/GetSecret"  # noqa: S105 - a method name


class ClientConfigError(Exception):
    """The client's settings are invalid; the message names the key."""


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


def _secret(message: broker_pb2.Secret) -> Secret:
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
    """What Config and the auth module read secrets through."""

    def get_secret(self, name: str) -> Secret: ...


@dataclass(frozen=True)
class BrokerClientConfig:
    target: str
    """host:port of the broker."""
    ca_file: Path
    """CA that signed the broker's server certificate."""
    cert_file: Path
    """This workload's client certificate: its identity."""
    key_file: Path
    server_name: str | None = None
    """Name to check in the broker's certificate, when it differs from the target host."""
    deadline: float = 2.0
    """Seconds allowed for one attempt of a call."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    ENV_PREFIX = "SECRETBROKER_"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BrokerClientConfig:
        """Read SECRETBROKER_ADDR, _CA_FILE, _CERT_FILE, _KEY_FILE and optional _SERVER_NAME."""

        def required(key: str) -> str:
            value = environ.get(cls.ENV_PREFIX + key)
            if not value:
                raise ClientConfigError(f"{cls.ENV_PREFIX}{key}: missing")
            return value

        def existing_file(key: str) -> Path:
            path = Path(required(key))
            if not path.is_file():
                raise ClientConfigError(f"{cls.ENV_PREFIX}{key}: file not found: {path}")
            return path

        return cls(
            target=required("ADDR"),
            ca_file=existing_file("CA_FILE"),
            cert_file=existing_file("CERT_FILE"),
            key_file=existing_file("KEY_FILE"),
            server_name=environ.get(cls.ENV_PREFIX + "SERVER_NAME") or None,
        )


class SecretsClient:
    def __init__(self, config: BrokerClientConfig) -> None:
        self._config = config
        credentials = grpc.ssl_channel_credentials(
            root_certificates=config.ca_file.read_bytes(),
            private_key=config.key_file.read_bytes(),
            certificate_chain=config.cert_file.read_bytes(),
        )
        # Reconnect quickly after a broker restart, so retries meet a live connection.
        options: list[tuple[str, str | int]] = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # Notice a broker that vanished without closing the connection, for long streams.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if config.server_name:
            options.append(("grpc.ssl_target_name_override", config.server_name))
        self._channel = grpc.secure_channel(config.target, credentials, options=options)
        intercepted = grpc.intercept_channel(
            self._channel, RetryInterceptor(config.retry, frozenset({GET_SECRET}))
        )
        self._stub = broker_pb2_grpc.SecretBrokerStub(intercepted)

    def wait_until_connected(self, timeout: float) -> None:
        """Block until the channel is connected (handshake done); raise TimeoutError otherwise."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"no connection to the broker at {self._config.target}") from None

    def get_secret(self, name: str, version: int | None = None) -> Secret:
        request = broker_pb2.GetSecretRequest(name=name, version=version)
        try:
            response = self._stub.GetSecret(request, timeout=self._config.deadline)
        except grpc.RpcError as exc:
            raise SecretUnavailable(name, exc.code(), exc.details() or "") from None
        return _secret(response.secret)

    def watch(self, names: Sequence[str]) -> grpc.CallIterator[broker_pb2.WatchSecretsResponse]:
        """A WatchSecrets stream with no deadline; cancel it to end it."""
        return self._stub.WatchSecrets(broker_pb2.WatchSecretsRequest(names=names))

    def close(self) -> None:
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


@dataclass(frozen=True)
class ResumeBackoff:
    """Waits between attempts to reopen a broken watch: full jitter, capped."""

    initial: float = 0.2
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.maximum, self.initial * 2**attempt))  # noqa: S311 - jitter


class LiveSecrets:
    """The current values of ``names``, kept up to date by a WatchSecrets stream.

    ``get_secret`` is a dictionary lookup. When the stream breaks (broker restart,
    network), the last good values keep being served while a background thread
    resumes the stream with backoff; resuming re-sends the current values, so a
    change missed meanwhile arrives then. ``on_change`` callbacks run on that thread.
    """

    def __init__(
        self,
        client: SecretsClient,
        names: Sequence[str],
        backoff: ResumeBackoff | None = None,
    ) -> None:
        self._client = client
        self._names = list(dict.fromkeys(names))
        self._backoff = backoff or ResumeBackoff()
        self._values: dict[str, Secret] = {}
        self._complete = threading.Event()
        self._closed = threading.Event()
        self._call: grpc.CallIterator[broker_pb2.WatchSecretsResponse] | None = None
        self._last_error: SecretUnavailable | None = None
        self._listeners: list[Callable[[Secret], None]] = []
        self.resumes = 0
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

    def wait_ready(self, timeout: float) -> None:
        """Block until every name has a value; raise the last error, or TimeoutError."""
        if not self._complete.wait(timeout):
            if self._last_error is not None:
                raise self._last_error
            raise TimeoutError("no values from the broker yet")

    def on_change(self, listener: Callable[[Secret], None]) -> None:
        self._listeners.append(listener)

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        self._thread.join(timeout=10)

    def _follow(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            try:
                self._call = self._client.watch(self._names)
                for response in self._call:
                    self._store(_secret(response.secret))
                    attempt = 0
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                code = exc.code()
                names = ",".join(self._names)
                self._last_error = SecretUnavailable(names, code, exc.details() or "")
                log.warning("secrets watch broke (%s); resuming with backoff", code.name)
            else:
                log.warning("secrets watch ended by the broker; resuming")
            self.resumes += 1
            self._closed.wait(self._backoff.delay(attempt))
            attempt += 1

    def _store(self, secret: Secret) -> None:
        previous = self._values.get(secret.name)
        self._values[secret.name] = secret
        if len(self._values) == len(self._names):
            self._complete.set()
        if previous is not None and (previous.version, previous.data) != (
            secret.version,
            secret.data,
        ):
            log.info("secret %r changed: version %d", secret.name, secret.version)
        for listener in self._listeners:
            listener(secret)
