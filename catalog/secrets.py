"""A client of the secrets broker: mutual TLS from certificate files, a deadline on every call,
retries with backoff on UNAVAILABLE and DEADLINE_EXCEEDED."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

from catalog.retry import RetryInterceptor, RetryPolicy

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

    def get_secret(self, name: str) -> Secret:
        try:
            response = self._stub.GetSecret(
                broker_pb2.GetSecretRequest(name=name), timeout=self._config.deadline
            )
        except grpc.RpcError as exc:
            raise SecretUnavailable(name, exc.code(), exc.details() or "") from None
        secret = response.secret
        return Secret(
            name=secret.name,
            data=dict(secret.data),
            version=secret.version,
            source=_SOURCES.get(secret.source, SecretSource.UNKNOWN),
            stale=secret.stale,
            fetched_at=secret.fetched_at.ToNanoseconds() / 1e9,
        )

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
