"""The one writer of broker config files, for the dev stack, the bench and the tests: a TOML
document built as data and written with tomli-w, so a path with a quote or a backslash is
written correctly (deploy/broker.example.toml documents every key)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from devstack.pki import CertFiles

Table = dict[str, Any]


def broker_document(
    *,
    listen: str | None = None,
    server: CertFiles,
    client_ca: Path,
    vault_address: str | Sequence[str],
    auth: Mapping[str, str],
    secrets: Mapping[str, Mapping[str, Any]],
    access: Mapping[str, list[str]],
    **tables: Mapping[str, Any],
) -> Table:
    """A broker config: the required tables from the arguments, any others (``vault`` keys
    besides the address included) as given, e.g. ``cache={"default_ttl": "1h"}``. Without
    ``listen``, the harness's BrokerProcess picks a port. Several Vault addresses (a cluster's
    nodes) become ``vault.addresses``."""
    document: Table = {key: dict(table) for key, table in tables.items()}
    document["server"] = {
        **({"listen": listen} if listen is not None else {}),
        "cert_file": str(server.cert),
        "key_file": str(server.key),
        "client_ca_file": str(client_ca),
        **document.get("server", {}),
    }
    where = (
        {"address": vault_address}
        if isinstance(vault_address, str)
        else {"addresses": list(vault_address)}
    )
    document["vault"] = {**where, **document.get("vault", {}), "auth": dict(auth)}
    document["secrets"] = {name: dict(spec) for name, spec in secrets.items()}
    document["access"] = dict(access)
    return document


def approle_auth(role_id_file: Path, secret_id_file: Path) -> dict[str, str]:
    return {
        "method": "approle",
        "role_id_file": str(role_id_file),
        "secret_id_file": str(secret_id_file),
    }


def write_broker_config(path: Path, document: Mapping[str, Any], header: str = "") -> Path:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + tomli_w.dumps(document))
    return path
