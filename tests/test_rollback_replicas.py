"""A rollback flip reaches every broker replica: the ops CLI resolves the replicas behind its
address and applies the flip to each, works while Vault is down (when a rollback is needed),
names every replica that did not acknowledge, and `status` flags replicas that disagree."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from broker.tools.replicas import resolve_replicas
from secretbroker.client import BrokerClientConfig
from secretbroker.v1 import broker_pb2
from tests.support import API, ENV_VALUES, BrokerFactory, Pki, Vault, get, ops_cli

pytestmark = pytest.mark.ha


def test_a_flip_reaches_every_replica_while_vault_is_down_and_a_missed_one_is_named(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    brokers = [start_broker(private_vault, environ=ENV_VALUES) for _ in range(3)]
    for broker in brokers:
        get(broker.stub(pki.catalog, pki.ca), API)
    private_vault.server.pause()
    try:
        flipped = ops_cli(brokers, pki, "rollback", "set", '["database"]')
        assert flipped.returncode == 0, flipped.stderr
        assert "all 3 replicas agree" in flipped.stdout
        for broker in brokers:
            assert get(broker.stub(pki.catalog, pki.ca), API).source == broker_pb2.SOURCE_ENV

        brokers[1].stop()
        cleared = ops_cli(brokers, pki, "rollback", "clear")
        assert cleared.returncode == 1
        missed = f"127.0.0.1:{brokers[1].port}"
        assert f"not applied on 1 of 3 replicas: {missed}" in cleared.stderr
        for broker in (brokers[0], brokers[2]):
            assert broker.broker.rollback.status().override is None
    finally:
        private_vault.server.resume()


def test_status_shows_each_replica_and_fails_when_they_disagree(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    brokers = [start_broker(vault, environ=ENV_VALUES) for _ in range(2)]
    agreed = ops_cli(brokers, pki, "status")
    assert agreed.returncode == 0, agreed.stderr
    assert agreed.stdout.count("== replica 127.0.0.1:") == 2
    assert agreed.stdout.count(f"vault nodes (1 of 1 answering):\n  {vault.address}  active") == 2

    one = ops_cli(brokers[:1], pki, "rollback", "set", '["database"]')
    assert one.returncode == 0, one.stderr
    assert "== replica" not in one.stdout, "one replica: the plain output"

    split = ops_cli(brokers, pki, "status")
    assert split.returncode == 1
    assert "the replicas disagree on where categories are served from" in split.stderr
    assert f"127.0.0.1:{brokers[0].port}: vault [database]" in split.stderr


def fake_dns(*addresses: str) -> Any:
    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


@pytest.mark.parametrize(
    ("target", "endpoints", "server_name"),
    [
        ("dns:///broker.secrets:50051", ["10.0.0.1:50051", "10.0.0.2:50051"], "broker.secrets"),
        ("broker.secrets:50051", ["10.0.0.1:50051", "10.0.0.2:50051"], "broker.secrets"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1"),
        (("127.0.0.1:1", "127.0.0.1:2"), ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1"),
        ("10.1.2.3:50051", ["10.1.2.3:50051"], "10.1.2.3"),
    ],
)
def test_the_replicas_behind_a_target_are_every_address_with_the_name_to_check(
    target: str | tuple[str, ...], endpoints: list[str], server_name: str, tmp_path: Path
) -> None:
    config = BrokerClientConfig(target, tmp_path / "ca", tmp_path / "c", tmp_path / "k")
    replicas = resolve_replicas(config, fake_dns("10.0.0.2", "10.0.0.1", "10.0.0.1"))
    assert [r.endpoint for r in replicas] == endpoints
    assert {r.config.server_name for r in replicas} == {server_name}
    assert all(r.config.target == r.endpoint for r in replicas)
