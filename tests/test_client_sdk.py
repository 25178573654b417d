"""The client SDK's endpoints: one, a gRPC name, or several addresses, read from config or from
SECRETBROKER_ADDR; several reach whichever broker answers."""

from __future__ import annotations

import pytest

from devstack.openbao import free_port_pair
from secretbroker.client import BrokerClientConfig, ClientConfigError, SecretsClient, channel_target
from tests.conftest import API, BrokerFactory, Pki, Vault


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
