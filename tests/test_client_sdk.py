"""The client SDK's endpoints: one, a gRPC name, or several addresses, read from config or from
SECRETBROKER_ADDR; several reach whichever broker answers."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from devstack.harness import client_config, free_port_pair, wait_until
from secretbroker.client import (
    BrokerClientConfig,
    ClientConfigError,
    LiveSecrets,
    SecretsClient,
    channel_target,
)
from tests.support import API, BrokerFactory, Pki, RenewedClientFiles, Vault, get, status_of


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("broker:50051", "broker:50051"),
        ("dns:///broker.internal:50051", "dns:///broker.internal:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        (["10.0.0.1:1"], "10.0.0.1:1"),
        (["10.0.0.1:1", "10.0.0.2:2"], "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("127.0.0.1:1, 127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        (["[::1]:1", "[::1]:2"], "ipv6:[::1]:1,[::1]:2"),
    ],
)
def test_one_or_several_endpoints_become_one_grpc_target(
    target: str | list[str], expected: str
) -> None:
    assert channel_target(target) == expected


@pytest.mark.parametrize(
    "target", [["a.internal:1", "b.internal:2"], ["10.0.0.1:1", "[::1]:2"], ["10.0.0.1", "x:1"]]
)
def test_several_endpoints_must_be_addresses_of_one_family(target: list[str]) -> None:
    with pytest.raises(ClientConfigError, match="SECRETBROKER_ADDR"):
        channel_target(target)


def test_a_client_given_several_endpoints_reads_through_the_one_that_answers(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault)
    nobody = free_port_pair()  # nothing listens here
    environ = {
        "SECRETBROKER_ADDR": f"127.0.0.1:{nobody},127.0.0.1:{broker.port}",
        "SECRETBROKER_CA_FILE": str(pki.ca),
        "SECRETBROKER_CERT_FILE": str(pki.catalog.cert),
        "SECRETBROKER_KEY_FILE": str(pki.catalog.key),
    }
    config = BrokerClientConfig.from_env(environ)

    with SecretsClient(config) as client:
        assert client.get_secret(API).name == API
    assert config.target == (f"127.0.0.1:{nobody}", f"127.0.0.1:{broker.port}")


def test_rotated_client_certificates_reach_a_broker_that_only_trusts_the_new_ones(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    """grpcio cannot reload client credentials: the SDK rebuilds its channel when the files
    change, and LiveSecrets moves its watch over. A broker restarted to trust only the new CA
    then serves the client; the old certificate would be refused."""
    files = RenewedClientFiles(pki, tmp_path)
    port = free_port_pair()
    first = start_broker(vault, listen=f"127.0.0.1:{port}")
    config = files.config(port)
    with SecretsClient(config) as client:
        live = LiveSecrets(client, [API])
        try:
            live.wait_ready(timeout=30)
            new_ca_file = files.renew()
            wait_until(lambda: client.reconnects == 1, what="the channel rebuilt")

            first.stop()
            second = start_broker(vault, listen=f"127.0.0.1:{port}", client_ca=new_ca_file)

            assert client.get_secret(API).name == API
            wait_until(lambda: live.connected, what="the watch resumed on the new broker")
            assert live.get_secret(API).name == API
        finally:
            live.close()
    refused = status_of(lambda: get(second.stub(pki.catalog, pki.ca), API))
    assert refused == grpc.StatusCode.UNAVAILABLE, "the old certificate is no longer accepted"


def test_point_reads_never_go_back_a_version_across_replicas_whose_caches_disagree(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """Replica 1 holds the old version for an hour; once the SDK has been given the new one
    (by replica 0), replica 1 asks Vault's active node before it answers (min_version)."""
    replicas = [start_broker(vault, secrets_={API: {"ttl": "1h"}}) for _ in range(2)]
    old = get(replicas[1].stub(pki.catalog, pki.ca), API).version
    new = vault.write(API, value="newer", other="o")
    replicas[0].forget(API)
    plain = replicas[1].stub(pki.catalog, pki.ca)
    assert get(plain, API).version == old < new, "a plain read of replica 1 is a version behind"
    config = client_config([f"127.0.0.1:{r.port}" for r in replicas], pki.ca, pki.catalog)
    with SecretsClient(config) as client:
        versions = [client.get_secret(API).version for _ in range(20)]

    assert versions == sorted(versions), f"a point read went back: {versions}"
    assert versions[-1] == new
    assert [r["version"] for r in map(json.loads, replicas[1].audit_lines())][-1] == new
