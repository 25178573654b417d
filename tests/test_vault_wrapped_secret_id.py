"""AppRole without a plain secret_id on disk, as Vault Agent offers it: the file holds a
response-wrapping token, unwrapped once after checking where Vault created it. Against the real
OpenBao: one unwrap however many logins follow, and a token that was used before (intercepted)
or wraps something else is refused with a line that names the problem and shows no token."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from broker.config_loader import parse_config
from broker.errors import LoginRefused
from broker.sources.vault_session import VaultSession
from devstack.bootstrap import BROKER_ROLE
from devstack.broker_config import approle_auth
from devstack.pki import write_private
from tests.support import API, BrokerFactory, Pki, Vault, broker_settings, get

CREATION_PATH = f"auth/approle/role/{BROKER_ROLE}/secret-id"


def wrapped_secret_id(vault: Vault) -> str:
    """A new secret_id of the broker's role, as the wrapping token an orchestrator delivers."""
    response = vault.admin.auth.approle.generate_secret_id(BROKER_ROLE, wrap_ttl="120s")
    return str(response["wrap_info"]["token"])


def wrapped_auth(vault: Vault, folder: Path, wrapping_token: str) -> dict[str, str]:
    secret_id_file = folder / "wrapped-secret-id"
    write_private(secret_id_file, wrapping_token.encode())
    return {
        **approle_auth(vault.approle.role_id_file, secret_id_file),
        "secret_id_response_wrapping_path": CREATION_PATH,
    }


def unwraps_since(vault: Vault, offset: int) -> int:
    return sum(
        1
        for entry in vault._audit_entries(offset)
        if entry.get("type") == "request" and entry["request"].get("path") == "sys/wrapping/unwrap"
    )


def test_the_wrapped_secret_id_is_unwrapped_once_and_serves_every_later_login(
    vault: Vault, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    offset = vault.audit_offset()
    auth = wrapped_auth(vault, tmp_path, wrapped_secret_id(vault))
    broker = start_broker(vault, auth=auth, secrets_={API: {"ttl": 0}})
    stub = broker.stub(pki.catalog, pki.ca)
    assert get(stub, API).name == API

    session = broker.broker.vault.session
    vault.admin.auth.token.revoke(session.token())  # the next read must log in again
    assert get(stub, API).name == API

    assert vault.logins_since(offset) == 2
    assert unwraps_since(vault, offset) == 1, "the second login used the secret_id in memory"


def test_a_wrapping_token_someone_else_unwrapped_first_is_refused_as_possibly_intercepted(
    vault: Vault, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = wrapped_secret_id(vault)
    vault.admin.sys.unwrap(token)  # the interceptor got there first
    config = parse_config(
        broker_settings(vault, pki, auth=wrapped_auth(vault, tmp_path, token)),
        tmp_path,
        environ={},
    )
    caplog.set_level(logging.DEBUG)

    with pytest.raises(LoginRefused, match=r"used up or expired.*intercepted") as refused:
        VaultSession(config.vault).token()

    assert token not in str(refused.value)
    assert token not in caplog.text


def test_a_wrapping_token_not_created_at_the_configured_path_is_not_unwrapped(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    planted = str(
        vault.admin.sys.wrap(payload={"secret_id": "chosen-by-someone"})["wrap_info"]["token"]
    )
    config = parse_config(
        broker_settings(vault, pki, auth=wrapped_auth(vault, tmp_path, planted)),
        tmp_path,
        environ={},
    )
    offset = vault.audit_offset()

    with pytest.raises(LoginRefused, match="created at 'sys/wrapping/wrap', not at the configured"):
        VaultSession(config.vault).token()

    assert unwraps_since(vault, offset) == 0
    assert vault.admin.sys.unwrap(planted)["data"]["secret_id"], "the planted token is untouched"
