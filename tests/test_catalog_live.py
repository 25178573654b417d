"""The catalog follows the broker: LiveSecrets kept current by WatchSecrets across rotations and
broker restarts, and JWTs that survive a rotation for the grace period, and no longer."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator

import grpc
import jwt
import pytest

from catalog.auth import InvalidToken, TokenAuthority, WeakSigningKey
from devstack.harness import client_config, free_port_pair, wait_until
from secretbroker.client import (
    AsyncLiveSecrets,
    AsyncSecretsClient,
    Backoff,
    LiveSecrets,
    Secret,
    SecretsClient,
    SecretUnavailable,
)
from secretbroker.v1 import broker_pb2
from tests.support import API, DATABASE, BrokerFactory, Pki, RunningBroker, Vault, client_for

JWT_SECRETS = {DATABASE: {}, API: {"keys": ["jwt_secret"], "rotation": {"key": "jwt_secret"}}}
FAST_RESUME = Backoff(initial=0.05, maximum=0.5)


def rotate(broker: RunningBroker, pki: Pki) -> int:
    request = broker_pb2.RotateSecretRequest(name=API)
    return broker.admin(pki.ops, pki.ca).RotateSecret(request, timeout=30).version


@pytest.fixture
def jwt_vault(private_vault: Vault) -> Vault:
    private_vault.write(API, jwt_secret=secrets.token_urlsafe(32))
    return private_vault


@pytest.fixture
def client(pki: Pki) -> Iterator[Callable[[int], SecretsClient]]:
    opened: list[SecretsClient] = []

    def open_client(port: int) -> SecretsClient:
        opened.append(client_for(pki, port))
        return opened[-1]

    yield open_client
    for each in opened:
        each.close()


def test_live_secrets_follow_rotation_and_resume_after_a_broker_restart(
    jwt_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    client: Callable[[int], SecretsClient],
) -> None:
    port = free_port_pair()
    broker = start_broker(jwt_vault, secrets_=JWT_SECRETS, listen=f"127.0.0.1:{port}")
    live = LiveSecrets(client(port), [API, DATABASE], FAST_RESUME)
    try:
        live.wait_ready(timeout=20)
        first = live.get_secret(API)

        rotated = rotate(broker, pki)
        wait_until(lambda: live.get_secret(API).version == rotated)

        broker.stop()
        wait_until(lambda: not live.connected)
        held = live.get_secret(API)
        assert held.version == rotated, "the last good value is served while the broker is down"
        assert held.data["jwt_secret"] != first.data["jwt_secret"]

        written = jwt_vault.write(API, jwt_secret="written-while-the-broker-was-down")
        start_broker(jwt_vault, secrets_=JWT_SECRETS, listen=f"127.0.0.1:{port}")
        wait_until(lambda: live.get_secret(API).version == written)
        assert live.connected, "resumed on the restarted broker"
    finally:
        live.close()


def test_a_token_survives_rotation_for_the_grace_period_then_is_rejected(
    jwt_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(jwt_vault, secrets_=JWT_SECRETS)
    config = client_config(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    async def scenario() -> None:
        async with (
            AsyncSecretsClient(config) as client,
            AsyncLiveSecrets(client, [API], FAST_RESUME) as live,
        ):
            await live.wait_ready(timeout=20)
            running = TokenAuthority(live.get_secret, client, grace=60, clock=clock)
            old_version = live.get_secret(API).version
            old_token = running.mint("alice")

            new_version = await asyncio.to_thread(rotate, broker, pki)
            await asyncio.to_thread(wait_until, lambda: live.get_secret(API).version == new_version)

            claims = await running.verify(old_token)
            assert claims["sub"] == "alice", "within grace on the running instance"
            async with AsyncLiveSecrets(client, [API], FAST_RESUME) as fresh_live:
                await fresh_live.wait_ready(timeout=20)
                fresh = TokenAuthority(fresh_live.get_secret, client, grace=60, clock=clock)
                claims = await fresh.verify(old_token)
                assert claims["sub"] == "alice", "within grace on an instance started after"

                new_token = running.mint("bob")
                assert _kid(new_token) == str(new_version) != str(old_version)
                assert (await fresh.verify(new_token))["sub"] == "bob"

                offset[0] = 61  # past the grace, counted from when the new version was written
                for authority in (running, fresh):
                    with pytest.raises(InvalidToken, match="grace period has ended"):
                        await authority.verify(old_token)
                    assert (await authority.verify(new_token))["sub"] == "bob"

    asyncio.run(scenario())


def test_forged_tampered_and_expired_tokens_are_rejected_without_echoing_them(
    jwt_vault: Vault,
    start_broker: BrokerFactory,
    client: Callable[[int], SecretsClient],
) -> None:
    broker = start_broker(jwt_vault, secrets_=JWT_SECRETS)
    broker_client = client(broker.port)
    authority = TokenAuthority(broker_client.get_secret)
    good = authority.mint("alice")
    header, payload, signature = good.split(".")
    forged = TokenAuthority(
        lambda name: _with_key(broker_client.get_secret(name), secrets.token_urlsafe(32))
    ).mint("mallory")
    expired = TokenAuthority(broker_client.get_secret, clock=lambda: time.time() - 7200).mint(
        "alice", lifetime=60
    )

    for token in (forged, f"{header}.{payload}x.{signature}", expired, "not-a-jwt", ""):
        with pytest.raises(InvalidToken) as caught:
            asyncio.run(authority.verify(token))
        assert not token or token not in str(caught.value)


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _with_key(secret: Secret, key: str) -> Secret:
    return dataclasses.replace(secret, data={"jwt_secret": key})


def test_a_short_jwt_key_is_refused(
    jwt_vault: Vault, start_broker: BrokerFactory, client: Callable[[int], SecretsClient]
) -> None:
    jwt_vault.write(API, jwt_secret="short")
    broker_client = client(start_broker(jwt_vault, secrets_=JWT_SECRETS).port)
    with pytest.raises(WeakSigningKey, match="the JWT key has 5 bytes, fewer than 32"):
        TokenAuthority(broker_client.get_secret).mint("alice")


def test_a_denied_watch_surfaces_the_denial_instead_of_waiting_forever(
    jwt_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(jwt_vault, secrets_=JWT_SECRETS, access={})
    with client_for(pki, broker.port) as denied_client:
        live = LiveSecrets(denied_client, [API], FAST_RESUME)
        try:
            wait_until(lambda: live.last_error is not None)
            with pytest.raises(SecretUnavailable) as caught:
                live.wait_ready(timeout=0.1)
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(SecretUnavailable):
                live.get_secret(API)
        finally:
            live.close()
