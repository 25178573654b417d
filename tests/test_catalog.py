"""The catalog reads its Config through a real broker, holds no Vault credential, and retries."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from broker.config_loader import parse_config
from catalog.config import Config, MissingSecretKey
from devstack.harness import free_port_pair
from secretbroker.client import (
    Backoff,
    BrokerClientConfig,
    ClientConfigError,
    RetryPolicy,
    SecretSource,
    SecretUnavailable,
)
from tests.support import (
    API,
    DATABASE,
    EXTERNAL,
    BrokerFactory,
    Pki,
    RunningBroker,
    Vault,
    broker_settings,
    client_for,
)


def test_config_properties_come_from_vault_through_the_broker(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    vault = private_vault  # holds the catalog's own keys, not the shared test shape
    vault.write(DATABASE, url="sqlite:///catalog.db", password="pw")
    vault.write(API, jwt_secret="jwt-key-from-vault")
    vault.write(EXTERNAL, tmdb_api_key="tmdb-key-from-vault")
    declared = {
        DATABASE: {"ttl": 0, "keys": ["url", "password"]},
        API: {"ttl": 0, "keys": ["jwt_secret"]},
        EXTERNAL: {"keys": ["tmdb_api_key"]},
    }
    broker = start_broker(vault, secrets_=declared)

    with client_for(pki, broker.port) as client:
        config = Config(client)
        assert config.database_url == "sqlite:///catalog.db"
        assert config.jwt_secret_key == "jwt-key-from-vault"
        assert config.tmdb_api_key == "tmdb-key-from-vault"
        assert client.get_secret(API).source is SecretSource.VAULT

        vault.write(API, jwt_secret="rotated-jwt-key")
        assert config.jwt_secret_key == "rotated-jwt-key"  # follows a new version


def test_missing_key_fails_closed_naming_the_key(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    private_vault.write(EXTERNAL, sentry_dsn="not-the-key-config-needs")
    broker = start_broker(private_vault, secrets_={EXTERNAL: {"ttl": 0, "keys": ["sentry_dsn"]}})

    with (
        client_for(pki, broker.port) as client,
        pytest.raises(MissingSecretKey, match="tmdb_api_key"),
    ):
        _ = Config(client).tmdb_api_key


def test_denied_secret_raises_with_the_status_code(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, access={})
    with client_for(pki, broker.port) as client, pytest.raises(SecretUnavailable) as caught:
        client.get_secret(DATABASE)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_client_retries_unavailable_until_the_broker_comes_up(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    port = free_port_pair()
    config = parse_config(
        broker_settings(vault, pki, listen=f"127.0.0.1:{port}"), tmp_path, environ={}
    )
    started: list[RunningBroker] = []
    late = threading.Timer(1.0, lambda: started.append(RunningBroker(config, {})))
    late.start()
    try:
        with client_for(
            pki, port, retry=RetryPolicy(max_attempts=50, overall_deadline=30)
        ) as client:
            assert client.get_secret(DATABASE).name == DATABASE
    finally:
        late.join()
        for broker in started:
            broker.stop()


def test_client_gives_up_after_its_overall_deadline(pki: Pki) -> None:
    port = free_port_pair()  # nothing listens
    policy = RetryPolicy(max_attempts=100, backoff=Backoff(initial=0.05), overall_deadline=1.0)
    with client_for(pki, port, retry=policy) as client, pytest.raises(SecretUnavailable) as caught:
        client.get_secret(DATABASE)
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_client_config_from_env_names_the_missing_variable(pki: Pki) -> None:
    with pytest.raises(ClientConfigError, match=r"^SECRETBROKER_CERT_FILE: missing"):
        BrokerClientConfig.from_env(
            {"SECRETBROKER_ADDR": "x:1", "SECRETBROKER_CA_FILE": str(pki.ca)}
        )
