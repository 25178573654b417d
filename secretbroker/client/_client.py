"""SecretsClient: one call to the broker per read, with a deadline and retries."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import grpc

from secretbroker.client._channel import secure_channel
from secretbroker.client._config import BrokerClientConfig
from secretbroker.client._retry import RetryInterceptor
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

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


class SecretLookup(Protocol):
    """What an application reads secrets through: a SecretsClient or LiveSecrets."""

    def get_secret(self, name: str) -> Secret: ...


class SecretsClient:
    def __init__(self, config: BrokerClientConfig) -> None:
        self._config = config
        self._channel = secure_channel(config)
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
        return secret_from_message(response.secret)

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
