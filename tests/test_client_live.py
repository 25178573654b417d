"""LiveSecrets' own logic with a fake client (unit tests): a channel move during a backoff wait
does not swallow the next failure, closing unregisters from the client, change callbacks see
changes only, and everything raised shares one base class."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import cast

import grpc
import pytest

from devstack.harness import wait_until
from secretbroker.client import (
    Backoff,
    LiveSecrets,
    NotReady,
    NotWatched,
    SecretBrokerError,
    SecretChange,
    SecretsClient,
    SecretUnavailable,
)
from secretbroker.v1 import broker_pb2

NAME = "media-catalog/api"
LONG_WAITS = Backoff(initial=60.0, maximum=60.0, draw=lambda _low, high: high)


class Failure(grpc.RpcError):
    def __init__(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


class Stream:
    """A watch call: yields ``responses``, then blocks until cancelled (or fails at once)."""

    def __init__(self, responses: Sequence[broker_pb2.WatchSecretsResponse], fail: str | None):
        self._responses = list(responses)
        self._fail = fail
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[broker_pb2.WatchSecretsResponse]:
        yield from self._responses
        if self._fail is not None:
            raise Failure(self._fail)
        self._cancelled.wait()
        raise Failure("cancelled")

    def cancel(self) -> None:
        self._cancelled.set()


class FakeClient:
    """What LiveSecrets uses of a SecretsClient: ``watch`` and ``on_reconnect``."""

    def __init__(self, streams: Callable[[int], Stream]) -> None:
        self._streams = streams
        self.calls = 0
        self.listeners: list[Callable[[], None]] = []

    def watch(self, names: Sequence[str], min_versions: Mapping[str, int] | None = None) -> Stream:
        self.calls += 1
        return self._streams(self.calls)

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def reconnect(self) -> None:
        for listener in list(self.listeners):
            listener()


def response(version: int, value: str) -> broker_pb2.WatchSecretsResponse:
    secret = broker_pb2.Secret(
        name=NAME, data={"jwt_secret": value}, version=version, source=broker_pb2.SOURCE_VAULT
    )
    return broker_pb2.WatchSecretsResponse(secret=secret)


def live_secrets(client: FakeClient, backoff: Backoff = LONG_WAITS) -> LiveSecrets:
    return LiveSecrets(cast(SecretsClient, client), [NAME], backoff)


def test_a_channel_move_during_a_backoff_wait_does_not_swallow_the_next_failure() -> None:
    """Certificates rotating while the watch waits to resume: the wait ends at once, and the
    next failure is a failure (recorded, then a backoff wait), not taken for a move."""
    client = FakeClient(lambda call: Stream([], fail=f"failure {call}"))
    with live_secrets(client) as live:
        wait_until(lambda: client.calls == 1 and live.last_error is not None, what="1st failure")
        client.reconnect()  # no call open: the backoff wait ends early
        wait_until(lambda: client.calls == 2, what="the watch reopened on the new channel")
        wait_until(lambda: "failure 2" in str(live.last_error), what="the 2nd failure recorded")
        threading.Event().wait(0.3)
        assert client.calls == 2, "the 2nd failure was followed by a backoff wait"


def test_a_channel_move_of_an_open_call_reopens_it_at_once_without_an_error() -> None:
    client = FakeClient(lambda call: Stream([response(call, f"value {call}")], fail=None))
    with live_secrets(client) as live:
        live.wait_ready(timeout=10)
        client.reconnect()
        wait_until(lambda: client.calls == 2, what="the watch moved to the new channel")
        assert live.last_error is None
        wait_until(lambda: live.get_secret(NAME).version == 2, what="the value re-sent")


def test_closing_unregisters_from_the_client_and_ends_the_thread() -> None:
    client = FakeClient(lambda call: Stream([response(1, "one")], fail=None))
    live = live_secrets(client)
    live.wait_ready(timeout=10)
    assert len(client.listeners) == 1
    live.close()
    assert client.listeners == []
    assert not any(t.name == "secrets-watch" and t.is_alive() for t in threading.enumerate())


def test_change_callbacks_see_changes_only_and_a_failing_one_ends_nothing() -> None:
    versions = iter([[response(1, "one")], [response(1, "one"), response(2, "two")]])
    client = FakeClient(lambda call: Stream(next(versions, []), fail="dropped"))
    changes: list[SecretChange] = []

    def broken(change: SecretChange) -> None:
        raise RuntimeError("the application's bug")

    with live_secrets(client, Backoff(initial=0.01, maximum=0.01)) as live:
        live.on_change(broken)
        stop = live.on_change(changes.append)
        wait_until(lambda: live.get_secret(NAME).version == 2, what="version 2")
        stop()
    assert [(c.previous.version, c.current.version) for c in changes] == [(1, 2)]
    assert "two" not in repr(changes)


def test_everything_the_sdk_raises_is_a_secret_broker_error() -> None:
    client = FakeClient(lambda call: Stream([], fail="down"))
    with live_secrets(client) as live:
        with pytest.raises(NotWatched) as unwatched:
            live.get_secret("media-catalog/other")
        assert str(unwatched.value) == "'media-catalog/other' is not among the watched secrets"
        wait_until(lambda: live.last_error is not None, what="the failure")
        with pytest.raises(SecretUnavailable):
            live.wait_ready(timeout=0.01)
    silent = FakeClient(lambda call: Stream([], fail=None))
    with live_secrets(silent) as live, pytest.raises(NotReady):
        live.wait_ready(timeout=0.01)
    for raised in (NotWatched, NotReady, SecretUnavailable):
        assert issubclass(raised, SecretBrokerError)
    assert issubclass(NotWatched, KeyError)
    assert issubclass(NotReady, TimeoutError)
