"""The least-privilege Vault policy for a broker config: what its AppRole's token may do.

Read each declared secret and its metadata (versions, for WatchSecrets and the
rotation schedule); create and update only the secrets the broker rotates itself
(always with check-and-set); issue database credentials from each declared role, and renew
and revoke only that role's leases; keep its own token alive and revoke it when replaced.
``python -m broker vault-policy --config broker.toml`` prints it, so the policy is
derived from the config instead of kept equal to it by hand.
"""

from __future__ import annotations

from broker.config import BrokerConfig, DatabaseCredentialsSpec

TOKEN_PATHS = (
    ("auth/token/renew-self", "update", "keep its token alive"),
    ("auth/token/lookup-self", "read", "tell a dead token from a refused path"),
    ("auth/token/revoke-self", "update", "revoke a token it replaced"),
)


def vault_policy(config: BrokerConfig) -> str:
    mount = config.vault.mount
    blocks = [
        "# The secrets broker's Vault policy, least privilege: written by",
        "# `python -m broker vault-policy --config broker.toml` from the broker's [secrets].",
        "# Bind it to the broker's AppRole with token_no_default_policy: these are all its rights.",
    ]
    for spec in sorted(config.secrets.values(), key=lambda s: s.path):
        if spec.database is not None:
            blocks.append(_database_paths(spec.name, spec.database))
            continue
        capabilities = '"read", "create", "update"' if spec.rotation else '"read"'
        why = (
            f"rotates key {spec.rotation.key!r} (check-and-set writes)"
            if spec.rotation
            else "reads"
        )
        blocks.append(
            f'\n# {spec.name}: {why}\npath "{mount}/data/{spec.path}" {{\n'
            f"  capabilities = [{capabilities}]\n}}\n"
            f'path "{mount}/metadata/{spec.path}" {{\n  capabilities = ["read"]\n}}'
        )
    for path, capability, why in TOKEN_PATHS:
        blocks.append(f'\n# {why}\npath "{path}" {{\n  capabilities = ["{capability}"]\n}}')
    return "\n".join(blocks) + "\n"


def _database_paths(name: str, database: DatabaseCredentialsSpec) -> str:
    """Issue from the role; renew and revoke that role's leases only (the URL forms: the body
    forms, ``sys/leases/renew``, would cover every lease in Vault). A static role: read only."""
    if database.static:
        return (
            f"\n# {name}: the static role {database.role!r} (the engine rotates its password)\n"
            f'path "{database.mount}/static-creds/{database.role}" {{\n'
            '  capabilities = ["read"]\n}'
        )
    creds = f"{database.mount}/creds/{database.role}"
    return (
        f"\n# {name}: database credentials of role {database.role!r}, renewed and revoked\n"
        f'path "{creds}" {{\n  capabilities = ["read"]\n}}\n'
        f'path "sys/leases/renew/{creds}/*" {{\n  capabilities = ["update"]\n}}\n'
        f'path "sys/leases/revoke/{creds}/*" {{\n  capabilities = ["update"]\n}}'
    )
