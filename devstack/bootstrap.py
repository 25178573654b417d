"""Bootstrap a Vault (OpenBao) the way production is bootstrapped, with an admin token.

KV v2 mount, the broker's policy (derived from its config: ``broker/tools/vault_policy.py``),
an AppRole role for the broker whose token carries only that policy, and its role_id
and secret_id written to files (mode 0600) the way Vault Agent reads them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import hvac

from devstack.pki import write_private

BROKER_ROLE = "secretbroker"
BROKER_POLICY = "secretbroker"


@dataclass(frozen=True)
class AppRoleFiles:
    role_id_file: Path
    secret_id_file: Path


@dataclass(frozen=True)
class RoleTTLs:
    token_ttl: str = "1h"  # noqa: S105 - a duration, not a password
    token_max_ttl: str = "24h"  # noqa: S105 - a duration, not a password


def ensure_kv2_mount(client: hvac.Client, mount: str) -> None:
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    existing = mounts.get(f"{mount}/")
    if existing is None:
        client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    elif existing["type"] != "kv" or (existing.get("options") or {}).get("version") != "2":
        raise RuntimeError(f"mount {mount}/ exists and is not KV version 2")


def write_policy(client: hvac.Client, policy: str, name: str = BROKER_POLICY) -> list[str]:
    """Store ``policy`` (HCL) under ``name``; returns the names to bind to the broker's role."""
    client.sys.create_or_update_policy(name=name, policy=policy)
    return [name]


def create_broker_approle(
    client: hvac.Client,
    policies: list[str],
    credentials_dir: Path,
    ttls: RoleTTLs = RoleTTLs(),
    role: str = BROKER_ROLE,
) -> AppRoleFiles:
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle")
    client.auth.approle.create_or_update_approle(
        role,
        token_policies=policies,
        token_ttl=ttls.token_ttl,
        token_max_ttl=ttls.token_max_ttl,
        token_no_default_policy=True,
    )
    role_id = client.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    credentials_dir.mkdir(parents=True, exist_ok=True)
    files = AppRoleFiles(credentials_dir / "role_id", credentials_dir / "secret_id")
    write_private(files.role_id_file, role_id.encode())
    write_private(files.secret_id_file, secret_id.encode())
    return files


def random_token() -> str:
    return secrets.token_urlsafe(32)


def dev_secret_values(database_url: str) -> Mapping[str, Mapping[str, Callable[[], str]]]:
    """The Media Catalog's secrets, each value freshly generated at bootstrap."""
    return {
        "media-catalog/database": {"url": lambda: database_url, "password": random_token},
        "media-catalog/api": {"jwt_secret": random_token, "session_secret": random_token},
        "media-catalog/external": {"tmdb_api_key": random_token},
    }


def seed_secrets(
    client: hvac.Client, mount: str, values: Mapping[str, Mapping[str, Callable[[], str]]]
) -> None:
    for path, keys in values.items():
        client.secrets.kv.v2.create_or_update_secret(
            path=path, secret={key: make() for key, make in keys.items()}, mount_point=mount
        )
