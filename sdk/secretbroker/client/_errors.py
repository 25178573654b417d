"""What the SDK raises: one base class, so ``except SecretBrokerError`` catches all of it.

Messages name what is wrong (a secret's name, a setting, a status code), never a value."""

from __future__ import annotations

import grpc


class SecretBrokerError(Exception):
    """Base of every error the SDK raises."""


class ClientConfigError(SecretBrokerError):
    """The client's settings are invalid; the message names the setting, never a value of a
    credential."""


class SecretUnavailable(SecretBrokerError):
    """The broker did not return the secret. Carries the gRPC status code; never a value."""

    def __init__(self, name: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"secret {name!r}: {code.name}: {details}")
        self.name = name
        self.code = code


class NotWatched(SecretBrokerError, KeyError):
    """A live view was asked for a name it does not watch (also a KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class NotReady(SecretBrokerError, TimeoutError):
    """A wait ended before the broker answered (also a TimeoutError)."""
