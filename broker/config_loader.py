"""Loads the broker's config: the TOML file and the broker's settings variables (``VAULT_ADDR``,
``VAULT_TOKEN``, ``VAULT_ENABLED_SECRETS``) into config.py's dataclasses, validated.

Only this module (with config.py's schema and config_reader.py's field readers) reads them; the
secret values a rollback serves from the environment are read by ``sources/env.py``. Every
validation error names the offending key, never a value. Relative paths are resolved from the
folder of the config file.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.audit.chain import KeyFileError, load_key
from broker.config import (
    DATABASE_KEYS,
    KUBERNETES_TOKEN_FILE,
    AdminConfig,
    AppRoleAuth,
    AuditConfig,
    BrokerConfig,
    CacheConfig,
    DatabaseCredentialsSpec,
    IdentityConfig,
    JwtAuth,
    RotationSpec,
    SecretSpec,
    ServerConfig,
    StartupRollback,
    TokenAuth,
    VaultAuth,
    VaultConfig,
)
from broker.config_reader import Sensitive, Table
from broker.errors import ConfigError, InvalidSecretName
from broker.names import quoted_list, validate_secret_name
from broker.security.identity import check_identities, spiffe_trust_domain


def load_config(path: Path, environ: Mapping[str, str]) -> BrokerConfig:
    """Read and validate the broker config at ``path``; raise ConfigError naming the key."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.resolve().parent, environ=environ)


def parse_config(
    data: Mapping[str, Any], base_dir: Path, environ: Mapping[str, str]
) -> BrokerConfig:
    root = Table(data, "", base_dir)
    server = root.table("server").section(ServerConfig)
    vault = _parse_vault(root.table("vault"), environ)
    cache = root.table("cache", required=False).section(CacheConfig)
    secrets = _parse_secrets(root.table("secrets"), cache.default_ttl)
    access = _parse_access(root.table("access", required=False))
    admin = root.table("admin", required=False).section(AdminConfig)
    return root.section(
        BrokerConfig,
        server=server,
        vault=vault,
        cache=cache,
        secrets=secrets,
        access=access,
        admin=admin,
        audit=_parse_audit(root.table("audit", required=False)),
        identity=_parse_identity(root.table("identity", required=False), access, admin),
        startup_rollback=parse_vault_enabled(
            environ.get(VAULT_ENABLED_SECRETS), frozenset(s.category for s in secrets.values())
        ),
    )


VAULT_ENABLED_SECRETS = "VAULT_ENABLED_SECRETS"


def parse_vault_enabled(raw: str | None, categories: frozenset[str]) -> StartupRollback:
    """VAULT_ENABLED_SECRETS, as the ADR writes it: a JSON list of categories served from
    Vault. Unset: every category; ``[]``: none (all from environment variables)."""
    if raw is None:
        return StartupRollback()
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            VAULT_ENABLED_SECRETS, 'must be a JSON list of categories, e.g. ["database", "api"]'
        )
    check_categories(VAULT_ENABLED_SECRETS, value, categories)
    return StartupRollback(raw, frozenset(value))


def check_categories(key: str, given: list[str], categories: frozenset[str]) -> None:
    """A typo in a rollback list would silently move a category to env: reject it instead."""
    unknown = sorted(set(given) - categories)
    if unknown:
        raise ConfigError(
            key,
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {quoted_list(unknown)}"
            f"; declared: {', '.join(sorted(categories))}",
        )


def _parse_vault(table: Table, environ: Mapping[str, str]) -> VaultConfig:
    addresses = _vault_addresses(table, environ)
    return table.section(
        VaultConfig, addresses=addresses, auth=_parse_auth(table.table("auth"), environ)
    )


def _vault_addresses(table: Table, environ: Mapping[str, str]) -> tuple[str, ...]:
    """``vault.addresses`` (every node of a cluster) or ``vault.address`` (one server), not
    both; VAULT_ADDR overrides either with one address."""
    if table.has("address") and table.has("addresses"):
        raise ConfigError("vault.addresses", "give vault.address or vault.addresses, not both")
    if table.has("addresses"):
        key = "vault.addresses"
        addresses = table.strings("addresses", required=True)
        if not addresses:
            raise ConfigError(key, "must list at least one address")
    else:
        key = "vault.address"
        addresses = (table.string("address"),) if not environ.get("VAULT_ADDR") else ()
        table.skip("address")
    if environ.get("VAULT_ADDR"):
        key, addresses = "VAULT_ADDR", (environ["VAULT_ADDR"],)
    for address in addresses:
        if not address.startswith(("http://", "https://")):
            raise ConfigError(key, "must start with http:// or https://")
    return tuple(address.rstrip("/") for address in addresses)


def _parse_auth(table: Table, environ: Mapping[str, str]) -> VaultAuth:
    method = table.string("method")
    if method in ("jwt", "kubernetes"):
        jwt_file = (
            table.path("token_file")
            if method == "jwt" or table.has("token_file")
            else KUBERNETES_TOKEN_FILE
        )
        if not jwt_file.is_file():
            raise ConfigError("vault.auth.token_file", f"file not found: {jwt_file}")
        auth: VaultAuth = JwtAuth(
            method, table.string("role"), jwt_file, table.string("mount", method)
        )
    elif method == "approle":
        return table.section(AppRoleAuth, secret_id_wrapping_path=_wrapping_path(table))
    elif method == "token":
        token_file = table.path("token_file") if table.has("token_file") else None
        env_token = environ.get("VAULT_TOKEN")
        if token_file is None and not env_token:
            raise ConfigError("vault.auth.token_file", "missing, and VAULT_TOKEN is not set")
        auth = TokenAuth(token_file, Sensitive(env_token) if env_token else None)
    else:
        raise ConfigError("vault.auth.method", 'must be "approle", "kubernetes", "jwt" or "token"')
    table.reject_unknown()
    return auth


def _wrapping_path(table: Table) -> str | None:
    key = "secret_id_response_wrapping_path"
    if not table.has(key):
        return None
    path = table.string(key).strip("/")
    if not path:
        raise ConfigError(f"vault.auth.{key}", "must name the path the secret_id is created at")
    return path


def _parse_secrets(table: Table, default_ttl: float) -> Mapping[str, SecretSpec]:
    specs: dict[str, SecretSpec] = {}
    for name, _ in table.items():
        key = f"secrets.{name}"
        try:
            validate_secret_name(name)
        except InvalidSecretName as exc:
            raise ConfigError(key, str(exc)) from None
        entry = table.table(name)
        path = entry.string("path", name).strip("/")
        keys = entry.strings("keys", required=True)
        if not keys:
            raise ConfigError(f"{key}.keys", "must list at least one key")
        database = _parse_database(entry, keys)
        specs[name] = SecretSpec(
            name=name,
            path=path,
            category=entry.string("category", path.rsplit("/", 1)[-1]),
            ttl=entry.duration("ttl", default_ttl),
            keys=keys,
            rotation=_parse_rotation(entry, keys),
            database=database,
        )
        if database is not None and specs[name].rotation is not None:
            raise ConfigError(f"{key}.rotation", "a database secret is rotated by its lease")
        entry.reject_unknown()
    if not specs:
        raise ConfigError("secrets", "declares no secret")
    return specs


def _parse_database(entry: Table, keys: tuple[str, ...]) -> DatabaseCredentialsSpec | None:
    if not entry.has("database"):
        return None
    table = entry.table("database")
    database = table.section(DatabaseCredentialsSpec)
    unknown = [key for key in keys if key not in DATABASE_KEYS]
    if unknown:
        raise ConfigError(
            f"{entry.key}.keys",
            f"a database secret serves only {', '.join(DATABASE_KEYS)}; not {', '.join(unknown)}",
        )
    if "url" in keys and database.url is None:
        raise ConfigError(f"{table.key}.url", "is needed to serve the key url")
    return database


def _parse_rotation(entry: Table, keys: tuple[str, ...]) -> RotationSpec | None:
    if not entry.has("rotation"):
        return None
    table = entry.table("rotation")
    key = table.string("key")
    rotation = table.section(RotationSpec, key=key)
    if key not in keys:
        raise ConfigError(f"{table.key}.key", "must be one of the secret's keys")
    return rotation


def _parse_audit(table: Table) -> AuditConfig:
    key = None
    if table.has("key_file"):
        try:
            key = load_key(table.path("key_file"))
        except KeyFileError as exc:
            raise ConfigError("audit.key_file", str(exc)) from None
    return table.section(AuditConfig, key=key)


def _parse_identity(
    table: Table, access: Mapping[str, tuple[str, ...]], admin: AdminConfig
) -> IdentityConfig:
    """Every identity [access] and [admin] name must be one a certificate can have: a SPIFFE ID
    in a trusted domain, or "cn:NAME" with the CN fallback on."""
    named = [(f"access.{identity}", identity) for identity in access]
    named += [("admin.identities", identity) for identity in sorted(admin.identities)]
    if table.has("trust_domains"):
        domains = frozenset(table.strings("trust_domains"))
        if any(spiffe_trust_domain(f"spiffe://{domain}") is None for domain in domains):
            raise ConfigError("identity.trust_domains", "must list SPIFFE trust domain names")
    else:
        found = (spiffe_trust_domain(identity) for _, identity in named)
        domains = frozenset(domain for domain in found if domain is not None)
    config = table.section(IdentityConfig, trust_domains=domains)
    check_identities(named, domains, config.cn_fallback)
    return config


def _parse_access(table: Table) -> Mapping[str, tuple[str, ...]]:
    access: dict[str, tuple[str, ...]] = {}
    for identity, patterns in table.items():
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"access.{identity}", "must be a list of secret name patterns")
        access[identity] = tuple(patterns)
    return access
