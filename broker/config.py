"""The broker's configuration: frozen dataclasses, loaded and validated in one place.

Only this module (with its reader, config_reader.py) reads the config file and the broker's
settings variables (``VAULT_ADDR``, ``VAULT_TOKEN``, ``VAULT_ENABLED_SECRETS``); the secret
values a rollback serves from the environment are read by ``sources/env.py``. Every
validation error names the offending key, never a value.
Relative paths are resolved from the folder of the config file. Every key is
documented in ``deploy/broker.example.toml``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.audit.chain import ChainKey, KeyFileError, load_key
from broker.config_reader import (
    Sensitive,
    Table,
    choice,
    count,
    existing_file,
    file_mode,
    flag,
    listen_address,
    mount_point,
    optional_file,
    positive_seconds,
    seconds,
    section_of,
    setting,
)
from broker.errors import ConfigError, InvalidSecretName
from broker.names import quoted_list, validate_secret_name
from broker.security.identity import check_identities, spiffe_trust_domain


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC listener. Callers must present a certificate signed by client_ca_file."""

    listen: str = listen_address()
    """host:port to listen on; port 0 picks a free port."""
    cert_file: Path = existing_file()
    key_file: Path = existing_file()
    client_ca_file: Path = existing_file()
    shutdown_delay: float = seconds(1.0)
    """Seconds a stopping broker keeps serving after it reports NOT_SERVING, so clients (their
    health watch) and load balancers move away before it stops taking calls."""
    shutdown_grace: float = seconds(5.0)
    """Seconds calls in flight (and watch streams) get to finish once it stops taking calls."""
    warmup_timeout: float = seconds(30.0)
    """Seconds a starting broker stays out of the client-side load balancing (NOT_SERVING on the
    routing health name) while it cannot answer every declared secret. After that it takes
    traffic anyway, so a fleet started during a Vault outage serves what it can (env-served
    secrets)."""
    min_client_ping_interval: float = positive_seconds(10.0)
    """Seconds: the shortest keepalive ping interval accepted from a client with a stream open
    but idle. A client that pings more often is sent GOAWAY (too_many_pings), which breaks its
    watch streams. gRPC's own default is 5 minutes, under the SDK's 60 s keepalive."""


@dataclass(frozen=True)
class AppRoleAuth:
    """Vault AppRole login; role_id and secret_id are read from files at each login.

    With ``secret_id_wrapping_path`` (Vault Agent's ``secret_id_response_wrapping_path``) the
    secret_id file holds a response-wrapping token instead: it is unwrapped once, after checking
    that Vault created it at that path, and the secret_id is then kept in memory only."""

    role_id_file: Path = existing_file()
    secret_id_file: Path = existing_file()
    mount: str = mount_point("approle")
    secret_id_wrapping_path: str | None = None


@dataclass(frozen=True)
class TokenAuth:
    """A Vault token, for development: from token_file, else from VAULT_TOKEN."""

    token_file: Path | None = None
    env_token: Sensitive | None = field(default=None, repr=False)


KUBERNETES_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclass(frozen=True)
class JwtAuth:
    """Vault's ``jwt`` or ``kubernetes`` auth method: a role, and a signed token read from
    token_file at every login (projected service-account tokens rotate)."""

    method: str
    """"jwt" or "kubernetes"."""
    role: str
    token_file: Path
    mount: str


VaultAuth = AppRoleAuth | TokenAuth | JwtAuth


@dataclass(frozen=True)
class VaultConfig:
    addresses: tuple[str, ...]
    """Every node of the Vault cluster (one for a single server); the VAULT_ADDR environment
    variable overrides them with one address."""
    auth: VaultAuth
    mount: str = mount_point("secret")
    """Mount point of the KV v2 engine."""
    timeout: float = positive_seconds(2.0)
    """Seconds one attempt of a Vault call may take on one node (connect and read)."""
    call_budget: float = positive_seconds(3.0)
    """Seconds one Vault call may take in all, across every node it tries: an attempt gets at
    most what is left of it."""
    ca_file: Path | None = optional_file()
    """CA bundle for Vault's TLS certificate; the system store when unset."""

    @property
    def address(self) -> str:
        """The first node's address (the only one of a single server)."""
        return self.addresses[0]


@dataclass(frozen=True)
class CacheConfig:
    default_ttl: float = seconds(300.0)
    """Seconds a value is served without asking the source again."""
    max_stale: float = seconds(3600.0)
    """Seconds past its TTL a value may still be served, flagged stale, while the source fails."""
    error_backoff: float = seconds(1.0)
    """After a failed read, seconds during which requests get the stale value at once (or, with
    none, UNAVAILABLE at once) and no new read of that secret is started."""
    revalidate_wait: float = seconds(0.05)
    """Seconds a request that holds a servable stale value waits for the read refreshing it
    (stale-while-revalidate); then it is answered with the stale value, flagged."""


@dataclass(frozen=True)
class RotationSpec:
    """How the broker rotates one key of a secret."""

    key: str
    """The key whose value is replaced; the secret's other keys are kept."""
    bytes: int = count(32, minimum=16)
    """Random bytes in a new value (URL-safe base64 encoded)."""
    period: float = positive_seconds(7 * 86400.0)
    """A version older than this is rotated by the scheduler."""


@dataclass(frozen=True)
class SecretSpec:
    """One secret the broker may serve."""

    name: str
    path: str
    """Path inside the KV v2 mount."""
    category: str
    """Rollback category, e.g. "database"."""
    ttl: float
    keys: tuple[str, ...] = ()
    """The keys the secret holds; what a rollback reads from environment variables."""
    rotation: RotationSpec | None = None


@dataclass(frozen=True)
class AdminConfig:
    """Who may call SecretBrokerAdmin, and where live rollback overrides persist."""

    identities: frozenset[str] = setting(
        frozenset(), lambda table, name, _: frozenset(table.strings(name))
    )
    state_file: Path | None = optional_file(must_exist=False)
    """JSON file holding the live rollback override; None keeps it in memory only."""


@dataclass(frozen=True)
class RolloutConfig:
    """Rotation, watch and versions: how changes reach callers."""

    rotation_check_interval: float = positive_seconds(60.0)
    """How often each broker checks whether a rotating secret is due."""
    watch_poll_interval: float = positive_seconds(10.0)
    """How often the broker asks Vault for new versions of watched secrets."""
    previous_versions: int = count(2)
    """How many versions before the current one GetSecret may read."""


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = listen_address(required=False)
    """host:port of the HTTP listener for /metrics, /healthz and /readyz; None: no listener."""
    vault_probe_interval: float = positive_seconds(5.0)
    """How often Vault's health (reachable, sealed) is checked, for metrics and readiness."""


@dataclass(frozen=True)
class AuditConfig:
    file: Path | None = setting(
        None,
        lambda table, name, _: (
            None if table.string(name, "-") == "-" else table.path(name, must_exist=False)
        ),
    )
    """JSON Lines file the audit trail is appended to; None (or "-"): standard output."""
    fail_closed: bool = flag(False)
    """Refuse to serve when a record cannot be written."""
    key: ChainKey | None = field(default=None, repr=False)
    """The key the records are chained with (HMAC), from audit.key_file; None: unkeyed."""
    file_mode: int = file_mode(0o600)
    """Mode of a trail file the broker creates."""
    queue_size: int = count(10_000, minimum=1)
    """Records waiting for the writer thread; past it, records are dropped (fail-open) or the
    request is refused (fail-closed)."""
    write_timeout: float = positive_seconds(0.5)
    """Fail-closed only: seconds a request waits for its record to be written before it is
    refused UNAVAILABLE."""


@dataclass(frozen=True)
class StartupRollback:
    """VAULT_ENABLED_SECRETS as read at start-up."""

    raw: str | None = None
    """The variable's text; None when unset."""
    vault_categories: frozenset[str] | None = None
    """Categories served from Vault; None (unset) means every category."""


@dataclass(frozen=True)
class LimitsConfig:
    """What one authenticated caller may hold; past a limit: RESOURCE_EXHAUSTED, naming it."""

    max_watch_names: int = count(100, minimum=1)
    """Names one WatchSecrets request may list."""
    max_watch_streams_per_identity: int = count(5000, minimum=1)
    """WatchSecrets streams one identity may hold open at once on this broker, over all its
    connections (every replica of a workload shares its identity). About 27 KB each: 5,000
    streams hold about 135 MB. Size it as pods of the workload / (broker replicas - 1), plus
    headroom: the streams of a lost replica move to the others (README, Scale)."""
    max_pending_calls: int = count(20_000, minimum=1)
    """Calls that have arrived but that the server has not taken up yet (a fleet's watchers
    reconnecting at once). Past it gRPC core itself sheds calls, before the broker sees them:
    clients see CANCELLED, and the broker's metrics and logs do not."""


@dataclass(frozen=True)
class IdentityConfig:
    """How a caller's certificate becomes an identity (see broker/security/identity.py)."""

    trust_domains: frozenset[str] = frozenset()
    """SPIFFE trust domains whose IDs are accepted. Default: the trust domains of the SPIFFE
    IDs that [access] and [admin] name."""
    cn_fallback: bool = flag(False)
    """Identify a certificate without a URI SAN by its common name, as "cn:NAME"."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class LogConfig:
    level: str = choice("INFO", LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}", upper=True)
    format: str = choice("text", ("text", "json"), 'must be "text" or "json"')
    """"text" or "json" (one JSON object per line)."""


@dataclass(frozen=True)
class BrokerConfig:
    """The whole config; the sections that need nothing but their own table are read by
    ``Table.section`` through their field's reader."""

    server: ServerConfig
    vault: VaultConfig
    cache: CacheConfig
    secrets: Mapping[str, SecretSpec]
    access: Mapping[str, tuple[str, ...]]
    """Identity (SPIFFE ID, or "cn:NAME") -> secret name patterns it may read."""
    log: LogConfig = section_of(LogConfig)
    metrics: MetricsConfig = section_of(MetricsConfig)
    admin: AdminConfig = section_of(AdminConfig)
    rollout: RolloutConfig = section_of(RolloutConfig)
    audit: AuditConfig = AuditConfig()
    startup_rollback: StartupRollback = StartupRollback()
    identity: IdentityConfig = IdentityConfig()
    limits: LimitsConfig = section_of(LimitsConfig)

    @property
    def categories(self) -> frozenset[str]:
        return frozenset(spec.category for spec in self.secrets.values())


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
        specs[name] = SecretSpec(
            name=name,
            path=path,
            category=entry.string("category", path.rsplit("/", 1)[-1]),
            ttl=entry.duration("ttl", default_ttl),
            keys=keys,
            rotation=_parse_rotation(entry, keys),
        )
        entry.reject_unknown()
    if not specs:
        raise ConfigError("secrets", "declares no secret")
    return specs


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
