"""The broker's own Vault token: renewed before expiry, replaced across its max TTL or after
revocation, without failing a request."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from broker.config_loader import parse_config
from broker.sources.vault_session import VaultSession
from devstack.bootstrap import RoleTTLs
from devstack.harness import wait_until
from devstack.pki import write_private
from tests.support import (
    API,
    BrokerFactory,
    Measure,
    Pki,
    Vault,
    broker_settings,
    get,
    metric,
    start_vault,
    status_of,
)


@pytest.mark.slow
def test_short_lived_token_is_renewed_and_replaced_across_max_ttl_while_requests_run(
    tmp_path: Path, pki: Pki, start_broker: BrokerFactory
) -> None:
    vault = start_vault(tmp_path / "openbao", RoleTTLs(token_ttl="5s", token_max_ttl="11s"))
    try:
        broker = start_broker(vault, secrets_={API: {"ttl": 0}})  # every request reads Vault
        stub = broker.stub(pki.catalog, pki.ca)
        answers = []

        def read_until_replaced_twice() -> bool:  # two max TTLs: a login, then two more
            answers.append(get(stub, API))  # raises on any failed request
            return vault.logins_since(0) >= 3

        wait_until(read_until_replaced_twice, 60, "two token replacements", interval=0.05)
    finally:
        vault.server.stop()

    assert not any(answer.stale for answer in answers), "a stale answer means a Vault read failed"
    assert vault.reads_since(0, API) >= len(answers)
    assert vault.reads_since(0, API, refused=True) == 0, "the token was replaced only after expiry"
    renewed = metric(broker, "secretbroker_vault_requests_total", operation="renew", outcome="ok")
    assert renewed >= 2
    assert vault.logins_since(0) >= 3  # the first login, then once per max TTL


def test_revoked_token_is_replaced_by_a_new_login_on_the_next_read(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, secrets_={API: {"ttl": 0}})
    stub = broker.stub(pki.catalog, pki.ca)
    get(stub, API)
    session = broker.broker.vault.session

    offset = vault.audit_offset()
    vault.admin.auth.token.revoke(session.token())
    answer = get(stub, API)

    assert not answer.stale
    assert vault.reads_since(offset, API, refused=True) == 1  # the read that found it revoked
    assert vault.logins_since(offset) == 1


def test_reads_the_brokers_policy_refuses_make_no_logins_and_leave_no_tokens(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, measure: Measure
) -> None:
    """A refused read is the broker's policy, not a dead token: 100 of them are INTERNAL, make at
    most one extra login, and leave the number of live broker tokens in OpenBao unchanged."""
    refused = "media-catalog/unlisted"
    private_vault.write(refused, value="x", other="y")
    broker = start_broker(private_vault, secrets_={API: {}, refused: {"ttl": 0}})
    stub = broker.stub(pki.catalog, pki.ca)
    get(stub, API)
    tokens_before = private_vault.live_broker_tokens()
    offset = private_vault.audit_offset()

    codes = {status_of(lambda: get(stub, refused)) for _ in range(100)}

    assert codes == {grpc.StatusCode.INTERNAL}
    measure("AppRole logins during 100 refused reads", private_vault.logins_since(offset))
    assert private_vault.logins_since(offset) <= 1
    assert private_vault.live_broker_tokens() == tokens_before == 1
    assert not get(stub, API).stale  # the broker's own token still works


@pytest.mark.parametrize("where", ["token_file", "VAULT_TOKEN"])
def test_token_auth_reads_with_a_token_from_a_file_or_the_environment(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path, where: str
) -> None:
    """The dev-mode login: a token instead of AppRole."""
    created = vault.admin.auth.token.create(
        policies=["secretbroker"], no_default_policy=True, ttl="1h"
    )
    token = created["auth"]["client_token"]
    if where == "token_file":
        write_private(tmp_path / "vault-token", token.encode())
        broker = start_broker(
            vault, auth={"method": "token", "token_file": str(tmp_path / "vault-token")}
        )
    else:
        broker = start_broker(vault, auth={"method": "token"}, environ={"VAULT_TOKEN": token})

    assert get(broker.stub(pki.catalog, pki.ca), API).name == API
    assert metric(broker, "secretbroker_vault_requests_total", operation="login", outcome="ok") == 1


def test_the_broker_holds_no_vault_token_it_did_not_log_in_for(
    tmp_path: Path, vault: Vault, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hvac picks up VAULT_TOKEN or ~/.vault-token for a client made without a token (and dev
    servers write that file): the broker must use no credential but its own login."""
    (tmp_path / ".vault-token").write_text("ambient-token-from-the-home-folder")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("VAULT_TOKEN", "ambient-token-from-the-environment")
    config = parse_config(broker_settings(vault, pki), tmp_path, environ={})

    session = VaultSession(config.vault)

    assert not any(node.client.token for node in session.nodes.nodes)
    assert session.token() != "ambient-token-from-the-environment"
    assert all(node.client.token == session.token() for node in session.nodes.nodes)
