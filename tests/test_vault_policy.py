"""The broker's Vault policy (deploy/vault/policies/) checked by OpenBao itself."""

from __future__ import annotations

from collections.abc import Callable

import hvac
import hvac.exceptions
import pytest

from tests.support import API, DATABASE, DEPLOY, EXTERNAL, KV_MOUNT, Vault


@pytest.fixture
def as_broker(vault: Vault) -> hvac.Client:
    client = hvac.Client(url=vault.address, token="", timeout=5)
    client.auth.approle.login(
        role_id=vault.approle.role_id_file.read_text(),
        secret_id=vault.approle.secret_id_file.read_text(),
    )
    return client


@pytest.mark.parametrize("path", [DATABASE, API, EXTERNAL])
def test_broker_role_reads_its_declared_secrets(as_broker: hvac.Client, path: str) -> None:
    response = as_broker.secrets.kv.v2.read_secret_version(
        path=path, mount_point=KV_MOUNT, raise_on_deleted_version=True
    )
    assert response["data"]["data"]


@pytest.mark.parametrize("path", [DATABASE, API, EXTERNAL])
def test_broker_role_reads_version_metadata(as_broker: hvac.Client, path: str) -> None:
    response = as_broker.secrets.kv.v2.read_secret_metadata(path=path, mount_point=KV_MOUNT)
    assert response["data"]["current_version"] >= 1


def test_broker_role_writes_new_versions_of_the_rotating_secret_only_with_cas(
    vault: Vault, as_broker: hvac.Client
) -> None:
    current = as_broker.secrets.kv.v2.read_secret_metadata(path=API, mount_point=KV_MOUNT)
    version = current["data"]["current_version"]
    kept = vault.written[API]
    written = as_broker.secrets.kv.v2.create_or_update_secret(
        path=API, secret=dict(kept), cas=version, mount_point=KV_MOUNT
    )
    assert written["data"]["version"] == version + 1


@pytest.mark.parametrize(
    ("description", "attempt"),
    [
        (
            "read outside its paths",
            lambda c: c.secrets.kv.v2.read_secret_version(
                path="billing/keys", mount_point=KV_MOUNT, raise_on_deleted_version=True
            ),
        ),
        (
            "read a neighbouring path",
            lambda c: c.secrets.kv.v2.read_secret_version(
                path="media-catalog/admin", mount_point=KV_MOUNT, raise_on_deleted_version=True
            ),
        ),
        (
            "write a secret that is not rotating",
            lambda c: c.secrets.kv.v2.create_or_update_secret(
                path=DATABASE, secret={"url": "x"}, mount_point=KV_MOUNT
            ),
        ),
        (
            "delete the rotating secret's versions",
            lambda c: c.secrets.kv.v2.delete_latest_version_of_secret(
                path=API, mount_point=KV_MOUNT
            ),
        ),
        (
            "read metadata outside its paths",
            lambda c: c.secrets.kv.v2.read_secret_metadata(
                path="media-catalog/admin", mount_point=KV_MOUNT
            ),
        ),
        ("list secrets", lambda c: c.secrets.kv.v2.list_secrets(path="", mount_point=KV_MOUNT)),
        ("read policies", lambda c: c.sys.list_acl_policies()),
        ("create tokens", lambda c: c.auth.token.create(policies=["secretbroker"])),
        ("read its role's secret_id", lambda c: c.auth.approle.generate_secret_id("secretbroker")),
    ],
)
def test_broker_role_is_denied_everything_else(
    vault: Vault, as_broker: hvac.Client, description: str, attempt: Callable[[hvac.Client], object]
) -> None:
    vault.write("billing/keys", key="outside-scope")
    vault.write("media-catalog/admin", key="outside-scope")
    with pytest.raises(hvac.exceptions.Forbidden):
        attempt(as_broker)


DEV_POLICY = DEPLOY / "vault" / "policies" / "secretbroker-dev.hcl"


@pytest.fixture
def as_dev_broker(vault: Vault) -> hvac.Client:
    """A token bound to the dev policy alone, as the dev AppRole would hand out."""
    vault.admin.sys.create_or_update_acl_policy("secretbroker-dev", DEV_POLICY.read_text())
    token = vault.admin.auth.token.create(policies=["secretbroker-dev"], no_default_policy=True)
    return hvac.Client(url=vault.address, token=token["auth"]["client_token"], timeout=5)


def capabilities(vault: Vault, client: hvac.Client, path: str) -> set[str]:
    """What OpenBao itself says the client's token may do at ``path``."""
    answer = vault.admin.adapter.post(
        "/v1/sys/capabilities", json={"token": client.token, "paths": [path]}
    )
    return set(answer["data"][path])


@pytest.mark.parametrize(
    ("path", "dev", "prod"),
    [
        # Declared and rotating: both may read and write new versions.
        (f"{KV_MOUNT}/data/{API}", {"read", "create", "update"}, {"read", "create", "update"}),
        # Declared, read-only in production: dev may also write it (rotation, migration in dev).
        (f"{KV_MOUNT}/data/{DATABASE}", {"read", "create", "update"}, {"read"}),
        # Not declared but under media-catalog/: dev reads it, production does not.
        (f"{KV_MOUNT}/data/media-catalog/admin", {"read", "create", "update"}, {"deny"}),
        (f"{KV_MOUNT}/metadata/media-catalog/admin", {"read"}, {"deny"}),
        # Outside the application's prefix, deleting, listing, destroying: neither.
        (f"{KV_MOUNT}/data/billing/keys", {"deny"}, {"deny"}),
        (f"{KV_MOUNT}/delete/{API}", {"deny"}, {"deny"}),
        (f"{KV_MOUNT}/destroy/{API}", {"deny"}, {"deny"}),
        (f"{KV_MOUNT}/metadata/", {"deny"}, {"deny"}),
        ("sys/policies/acl/secretbroker", {"deny"}, {"deny"}),
        ("auth/approle/role/secretbroker/secret-id", {"deny"}, {"deny"}),
    ],
)
def test_each_environments_policy_allows_what_its_environment_needs_and_refuses_the_rest(
    vault: Vault,
    as_broker: hvac.Client,
    as_dev_broker: hvac.Client,
    path: str,
    dev: set[str],
    prod: set[str],
) -> None:
    assert capabilities(vault, as_dev_broker, path) == dev
    assert capabilities(vault, as_broker, path) == prod


def test_the_dev_policy_really_reads_any_catalog_secret_and_nothing_else(
    vault: Vault, as_dev_broker: hvac.Client
) -> None:
    vault.write("media-catalog/admin", key="in-scope-for-dev")
    vault.write("billing/keys", key="outside-scope")
    read = as_dev_broker.secrets.kv.v2.read_secret_version(
        path="media-catalog/admin", mount_point=KV_MOUNT, raise_on_deleted_version=True
    )
    assert read["data"]["data"]["key"] == "in-scope-for-dev"
    with pytest.raises(hvac.exceptions.Forbidden):
        as_dev_broker.secrets.kv.v2.read_secret_version(
            path="billing/keys", mount_point=KV_MOUNT, raise_on_deleted_version=True
        )
