"""Who may read what, over real mutual TLS against a real broker and OpenBao."""

from __future__ import annotations

import grpc
import pytest

from secretbroker.v1 import broker_pb2
from tests.support import (
    API,
    CATALOG_ID,
    DATABASE,
    INTRUDER_ID,
    BrokerFactory,
    Pki,
    Vault,
    get,
    status_of,
)


def test_allowed_caller_reads_the_data_written_in_vault(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    vault = private_vault  # its value has other keys than the shared one's
    version = vault.write(
        DATABASE, url="postgresql://u:p@db/media", password="pw-allowed-read", undeclared="x"
    )
    declared = {DATABASE: {"keys": ["url", "password"]}}
    stub = start_broker(vault, secrets_=declared).stub(pki.catalog, pki.ca)

    secret = get(stub, DATABASE)

    # The declared keys only: the same shape an answer from environment variables has.
    assert dict(secret.data) == {"url": "postgresql://u:p@db/media", "password": "pw-allowed-read"}
    assert secret.name == DATABASE
    assert secret.version == version
    assert secret.source == broker_pb2.SOURCE_VAULT
    assert not secret.stale
    assert secret.fetched_at.seconds > 0


@pytest.mark.parametrize(
    "name", [DATABASE, "media-catalog/external", "media-catalog/does-not-exist"]
)
def test_caller_outside_the_policy_is_denied_whether_or_not_the_secret_exists(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, name: str
) -> None:
    broker = start_broker(vault, access={CATALOG_ID: ["media-catalog/*"], INTRUDER_ID: ["other/*"]})
    stub = broker.stub(pki.intruder, pki.ca)
    offset = vault.audit_offset()

    assert status_of(lambda: get(stub, name)) == grpc.StatusCode.PERMISSION_DENIED
    assert vault.reads_since(offset, name) == 0


def test_a_vault_value_without_a_declared_key_is_not_found_naming_the_key(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    declared = {API: {"keys": ["value", "other", "not-in-vault"]}}
    stub = start_broker(vault, secrets_=declared).stub(pki.catalog, pki.ca)

    with pytest.raises(grpc.RpcError) as caught:
        get(stub, API)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "lacks the declared key not-in-vault" in (caught.value.details() or "")


def test_policy_globs_do_not_grant_neighbouring_prefixes(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        vault,
        secrets_={DATABASE: {}, "media-catalog-2/x": {}},
        access={CATALOG_ID: ["media-catalog/*"]},
    )
    stub = broker.stub(pki.catalog, pki.ca)

    assert status_of(lambda: get(stub, "media-catalog-2/x")) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("client", ["none", "foreign", "expired"])
def test_tls_handshake_rejects_callers_without_a_valid_client_certificate(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, client: str
) -> None:
    """Without a certificate from the client CA (or with an expired one) no RPC reaches the broker.

    Had the handshake let them in, the call would end in PERMISSION_DENIED or OK instead.
    """
    certs = {"none": None, "foreign": pki.foreign, "expired": pki.expired}[client]
    broker = start_broker(vault)
    stub = broker.stub(certs, pki.ca)

    assert status_of(lambda: get(stub, DATABASE, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    assert (
        get(broker.stub(pki.catalog, pki.ca), DATABASE).name == DATABASE
    )  # same broker, valid cert


def test_undeclared_secret_is_not_found_and_never_reaches_vault(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    stub = start_broker(vault, secrets_={DATABASE: {}}).stub(pki.catalog, pki.ca)
    offset = vault.audit_offset()

    assert status_of(lambda: get(stub, API)) == grpc.StatusCode.NOT_FOUND
    assert vault.reads_since(offset, API) == 0


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("a" * 257, "exceeds 256 bytes"),
        ("media-catalog/../secret", "'..'"),
        ("/media-catalog/api", "starts with '/'"),
        ("media-catalog/api\n", "control character"),
        ("media\x00catalog", "control character"),
        ("media\x85catalog", "control character"),  # C1: NEL
        ("media-catalog\u2028api", "control character"),  # line separator
        ("media-catalog/\u202eipa", "control character"),  # right-to-left override
        ("media-catalog//api", "empty segment"),
    ],
)
def test_malformed_names_are_invalid_argument_naming_the_problem(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, name: str, problem: str
) -> None:
    stub = start_broker(vault, access={CATALOG_ID: ["*"]}).stub(pki.catalog, pki.ca)

    with pytest.raises(grpc.RpcError) as caught:
        get(stub, name)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (caught.value.details() or "")


def test_declared_secret_outside_the_brokers_vault_policy_fails_internal(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """The broker's Vault policy is the second fence: a misdeclared secret is refused by Vault."""
    stub = start_broker(vault, secrets_={"media-catalog/unlisted": {}}).stub(pki.catalog, pki.ca)

    with pytest.raises(grpc.RpcError) as caught:
        get(stub, "media-catalog/unlisted")

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "vault denied" in (caught.value.details() or "")
