"""The broker's configuration: frozen dataclasses, loaded and validated in one place.

Only this module reads the config file and the broker's settings variables
(``VAULT_ADDR``, ``VAULT_TOKEN``, ``VAULT_ENABLED_SECRETS``); the secret values a
rollback serves from the environment are read by ``sources/env.py``. Every
validation error names the offending key, never a value.
Relative paths are resolved from the folder of the config file. Every key is
documented in ``deploy/broker.example.toml``.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.audit.chain import ChainKey, KeyFileError, load_key
from broker.errors import InvalidSecretName
from broker.names import quoted_list, validate_secret_name
from broker.security.identity import CN_PREFIX, spiffe_trust_domain


class ConfigError(Exception):
    """The config is invalid. ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class Sensitive:
    """A credential held in memory. Its repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Sensitive(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC listener. Callers must present a certificate signed by client_ca_file."""

    listen: str
    """host:port to listen on; port 0 picks a free port."""
    cert_file: Path
    key_file: Path
    client_ca_file: Path
    shutdown_delay: float = 1.0
    """Seconds a stopping broker keeps serving after it reports NOT_SERVING, so clients (their
    health watch) and load balancers move away before it stops taking calls."""
    shutdown_grace: float = 5.0
    """Seconds calls in flight (and watch streams) get to finish once it stops taking calls."""
    warmup_timeout: float = 30.0
    """Seconds a starting broker stays out of the client-side load balancing (NOT_SERVING on the
    routing health name) while it cannot answer every declared secret. After that it takes
    traffic anyway, so a fleet started during a Vault outage serves what it can (env-served
    secrets)."""


@dataclass(frozen=True)
class AppRoleAuth:
    """Vault AppRole login; role_id and secret_id are read from files at each login.

    With ``secret_id_wrapping_path`` (Vault Agent's ``secret_id_response_wrapping_path``) the
    secret_id file holds a response-wrapping token instead: it is unwrapped once, after checking
    that Vault created it at that path, and the secret_id is then kept in memory only."""

    role_id_file: Path
    secret_id_file: Path
    mount: str = "approle"
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
    mount: str = "secret"
    """Mount point of the KV v2 engine."""
    timeout: float = 2.0
    """Seconds one attempt of a Vault call may take on one node (connect and read)."""
    call_budget: float = 3.0
    """Seconds one Vault call may take in all, across every node it tries: an attempt gets at
    most what is left of it."""
    ca_file: Path | None = None
    """CA bundle for Vault's TLS certificate; the system store when unset."""

    @property
    def address(self) -> str:
        """The first node's address (the only one of a single server)."""
        return self.addresses[0]


@dataclass(frozen=True)
class CacheConfig:
    default_ttl: float = 300.0
    """Seconds a value is served without asking the source again."""
    max_stale: float = 3600.0
    """Seconds past its TTL a value may still be served, flagged stale, while the source fails."""
    error_backoff: float = 1.0
    """After a failed read, seconds during which requests get the stale value at once (or, with
    none, UNAVAILABLE at once) and no new read of that secret is started."""
    revalidate_wait: float = 0.05
    """Seconds a request that holds a servable stale value waits for the read refreshing it
    (stale-while-revalidate); then it is answered with the stale value, flagged."""


@dataclass(frozen=True)
class RotationSpec:
    """How the broker rotates one key of a secret."""

    key: str
    """The key whose value is replaced; the secret's other keys are kept."""
    bytes: int = 32
    """Random bytes in a new value (URL-safe base64 encoded)."""
    period: float = 7 * 86400.0
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

    identities: frozenset[str] = frozenset()
    state_file: Path | None = None
    """JSON file holding the live rollback override; None keeps it in memory only."""


@dataclass(frozen=True)
class RolloutConfig:
    """Rotation, watch and versions: how changes reach callers."""

    rotation_check_interval: float = 60.0
    """How often each broker checks whether a rotating secret is due."""
    watch_poll_interval: float = 10.0
    """How often the broker asks Vault for new versions of watched secrets."""
    previous_versions: int = 2
    """How many versions before the current one GetSecret may read."""


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None
    """host:port of the HTTP listener for /metrics, /healthz and /readyz; None: no listener."""
    vault_probe_interval: float = 5.0
    """How often Vault's health (reachable, sealed) is checked, for metrics and readiness."""


@dataclass(frozen=True)
class AuditConfig:
    file: Path | None = None
    """JSON Lines file the audit trail is appended to; None: standard output."""
    fail_closed: bool = False
    """Refuse to serve when a record cannot be written."""
    key: ChainKey | None = field(default=None, repr=False)
    """The key the records are chained with (HMAC), from audit.key_file; None: unkeyed."""
    file_mode: int = 0o600
    """Mode of a trail file the broker creates."""
    queue_size: int = 10_000
    """Records waiting for the writer thread; past it, records are dropped (fail-open) or the
    request is refused (fail-closed)."""
    write_timeout: float = 0.5
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

    max_watch_names: int = 100
    """Names one WatchSecrets request may list."""
    max_watch_streams_per_identity: int = 1000
    """WatchSecrets streams one identity may hold open at once, over all its connections (every
    replica of a workload shares its identity)."""


@dataclass(frozen=True)
class IdentityConfig:
    """How a caller's certificate becomes an identity (see broker/security/identity.py)."""

    trust_domains: frozenset[str] = frozenset()
    """SPIFFE trust domains whose IDs are accepted. Default: the trust domains of the SPIFFE
    IDs that [access] and [admin] name."""
    cn_fallback: bool = False
    """Identify a certificate without a URI SAN by its common name, as "cn:NAME"."""


@dataclass(frozen=True)
class BrokerConfig:
    server: ServerConfig
    vault: VaultConfig
    cache: CacheConfig
    secrets: Mapping[str, SecretSpec]
    access: Mapping[str, tuple[str, ...]]
    """Identity (SPIFFE ID, or "cn:NAME") -> secret name patterns it may read."""
    log_level: str = "INFO"
    log_format: str = "text"
    """"text" or "json" (one JSON object per line)."""
    metrics: MetricsConfig = MetricsConfig()
    admin: AdminConfig = AdminConfig()
    rollout: RolloutConfig = RolloutConfig()
    audit: AuditConfig = AuditConfig()
    startup_rollback: StartupRollback = StartupRollback()
    identity: IdentityConfig = IdentityConfig()
    limits: LimitsConfig = LimitsConfig()

    @property
    def categories(self) -> frozenset[str]:
        return frozenset(spec.category for spec in self.secrets.values())


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Table:
    """A TOML table under a dotted key, with typed getters that name the key on error."""

    def __init__(self, data: Mapping[str, Any], key: str, base_dir: Path) -> None:
        self._data = data
        self.key = key
        self._base_dir = base_dir
        self._used: set[str] = set()

    def _full(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def _raw(self, name: str) -> Any:
        self._used.add(name)
        return self._data.get(name)

    def has(self, name: str) -> bool:
        return self._raw(name) is not None

    def table(self, name: str, *, required: bool = True) -> _Table:
        value = self._raw(name)
        if value is None and not required:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(
                self._full(name), "missing table" if value is None else "must be a table"
            )
        return _Table(value, self._full(name), self._base_dir)

    def string(self, name: str, default: str | None = None) -> str:
        value = self._raw(name)
        if value is None:
            if default is None:
                raise ConfigError(self._full(name), "missing")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self._full(name), "must be a non-empty string")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self._full(name), "must be true or false")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self._raw(name)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(self._full(name), f"must be an integer of at least {minimum}")
        return value

    def strings(self, name: str, *, required: bool = False) -> tuple[str, ...]:
        value = self._raw(name)
        if value is None and not required:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self._full(name), "must be a list of non-empty strings")
        if len(set(value)) != len(value):
            raise ConfigError(self._full(name), "lists an entry twice")
        return tuple(value)

    def optional_path(self, name: str) -> Path | None:
        if self._raw(name) is None:
            return None
        return self.path(name)

    def path(self, name: str, *, must_exist: bool = True) -> Path:
        path = self._base_dir / self.string(name)
        if must_exist and not path.is_file():
            raise ConfigError(self._full(name), f"file not found: {path}")
        return path

    def positive_duration(self, name: str, default: float) -> float:
        seconds = self.duration(name, default)
        if seconds <= 0:
            raise ConfigError(self._full(name), "must be greater than zero")
        return seconds

    def duration(self, name: str, default: float) -> float:
        value = self._raw(name)
        if value is None:
            return default
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if seconds is None or seconds < 0:
            raise ConfigError(
                self._full(name),
                'must be a duration: seconds, or a string like "500ms", "30s", "5m"',
            )
        return seconds

    def items(self) -> list[tuple[str, Any]]:
        self._used.update(self._data)
        return list(self._data.items())

    def reject_unknown(self) -> None:
        for name in self._data:
            if name not in self._used:
                raise ConfigError(self._full(name), "unknown key")


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
    root = _Table(data, "", base_dir)
    server = _parse_server(root.table("server"))
    vault = _parse_vault(root.table("vault"), environ)
    cache = _parse_cache(root.table("cache", required=False))
    secrets = _parse_secrets(root.table("secrets"), cache.default_ttl)
    access = _parse_access(root.table("access", required=False))
    log_level = root.table("log", required=False)
    level = log_level.string("level", "INFO").upper()
    if level not in _LOG_LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(_LOG_LEVELS)}")
    log_format = log_level.string("format", "text")
    if log_format not in ("text", "json"):
        raise ConfigError("log.format", 'must be "text" or "json"')
    log_level.reject_unknown()
    metrics = _parse_metrics(root.table("metrics", required=False))
    admin = _parse_admin(root.table("admin", required=False))
    rollout = _parse_rollout(root.table("rollout", required=False))
    audit = _parse_audit(root.table("audit", required=False))
    identity = _parse_identity(root.table("identity", required=False), access, admin)
    limits_table = root.table("limits", required=False)
    limits = LimitsConfig(
        max_watch_names=limits_table.integer(
            "max_watch_names", LimitsConfig.max_watch_names, minimum=1
        ),
        max_watch_streams_per_identity=limits_table.integer(
            "max_watch_streams_per_identity", LimitsConfig.max_watch_streams_per_identity, minimum=1
        ),
    )
    limits_table.reject_unknown()
    root.reject_unknown()
    categories = frozenset(spec.category for spec in secrets.values())
    startup = parse_vault_enabled(environ.get(VAULT_ENABLED_SECRETS), categories)
    return BrokerConfig(
        server,
        vault,
        cache,
        secrets,
        access,
        log_level=level,
        log_format=log_format,
        metrics=metrics,
        admin=admin,
        rollout=rollout,
        audit=audit,
        startup_rollback=startup,
        identity=identity,
        limits=limits,
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


def _check_listen(key: str, listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(key, 'must be "host:port"')


def _parse_metrics(table: _Table) -> MetricsConfig:
    listen = table.string("listen") if table.has("listen") else None
    if listen is not None:
        _check_listen("metrics.listen", listen)
    config = MetricsConfig(
        listen=listen,
        vault_probe_interval=table.positive_duration(
            "vault_probe_interval", MetricsConfig.vault_probe_interval
        ),
    )
    table.reject_unknown()
    return config


def _parse_server(table: _Table) -> ServerConfig:
    listen = table.string("listen")
    _check_listen("server.listen", listen)
    config = ServerConfig(
        listen=listen,
        cert_file=table.path("cert_file"),
        key_file=table.path("key_file"),
        client_ca_file=table.path("client_ca_file"),
        shutdown_delay=table.duration("shutdown_delay", ServerConfig.shutdown_delay),
        shutdown_grace=table.duration("shutdown_grace", ServerConfig.shutdown_grace),
        warmup_timeout=table.duration("warmup_timeout", ServerConfig.warmup_timeout),
    )
    table.reject_unknown()
    return config


def _parse_vault(table: _Table, environ: Mapping[str, str]) -> VaultConfig:
    addresses = _vault_addresses(table, environ)
    timeout = table.positive_duration("timeout", 2.0)
    config = VaultConfig(
        addresses=addresses,
        auth=_parse_auth(table.table("auth"), environ),
        mount=table.string("mount", "secret").strip("/"),
        timeout=timeout,
        call_budget=table.positive_duration("call_budget", VaultConfig.call_budget),
        ca_file=table.optional_path("ca_file"),
    )
    table.reject_unknown()
    return config


def _vault_addresses(table: _Table, environ: Mapping[str, str]) -> tuple[str, ...]:
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
        table.has("address")
    if environ.get("VAULT_ADDR"):
        key, addresses = "VAULT_ADDR", (environ["VAULT_ADDR"],)
    for address in addresses:
        if not address.startswith(("http://", "https://")):
            raise ConfigError(key, "must start with http:// or https://")
    return tuple(address.rstrip("/") for address in addresses)


def _parse_auth(table: _Table, environ: Mapping[str, str]) -> VaultAuth:
    method = table.string("method")
    auth: VaultAuth
    if method in ("jwt", "kubernetes"):
        jwt_file = (
            table.path("token_file")
            if method == "jwt" or table.has("token_file")
            else KUBERNETES_TOKEN_FILE
        )
        if not jwt_file.is_file():
            raise ConfigError("vault.auth.token_file", f"file not found: {jwt_file}")
        auth = JwtAuth(method, table.string("role"), jwt_file, table.string("mount", method))
    elif method == "approle":
        auth = AppRoleAuth(
            role_id_file=table.path("role_id_file"),
            secret_id_file=table.path("secret_id_file"),
            mount=table.string("mount", "approle").strip("/"),
            secret_id_wrapping_path=_wrapping_path(table),
        )
    elif method == "token":
        token_file = table.optional_path("token_file")
        env_token = environ.get("VAULT_TOKEN")
        if token_file is None and not env_token:
            raise ConfigError("vault.auth.token_file", "missing, and VAULT_TOKEN is not set")
        auth = TokenAuth(token_file, Sensitive(env_token) if env_token else None)
    else:
        raise ConfigError("vault.auth.method", 'must be "approle", "kubernetes", "jwt" or "token"')
    table.reject_unknown()
    return auth


def _wrapping_path(table: _Table) -> str | None:
    key = "secret_id_response_wrapping_path"
    if not table.has(key):
        return None
    path = table.string(key).strip("/")
    if not path:
        raise ConfigError(f"vault.auth.{key}", "must name the path the secret_id is created at")
    return path


def _parse_cache(table: _Table) -> CacheConfig:
    config = CacheConfig(
        default_ttl=table.duration("default_ttl", CacheConfig.default_ttl),
        max_stale=table.duration("max_stale", CacheConfig.max_stale),
        error_backoff=table.duration("error_backoff", CacheConfig.error_backoff),
        revalidate_wait=table.duration("revalidate_wait", CacheConfig.revalidate_wait),
    )
    table.reject_unknown()
    return config


def _parse_secrets(table: _Table, default_ttl: float) -> Mapping[str, SecretSpec]:
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


def _parse_rotation(entry: _Table, keys: tuple[str, ...]) -> RotationSpec | None:
    if not entry.has("rotation"):
        return None
    table = entry.table("rotation")
    rotation = RotationSpec(
        key=table.string("key"),
        bytes=table.integer("bytes", RotationSpec.bytes, minimum=16),
        period=table.positive_duration("period", RotationSpec.period),
    )
    if rotation.key not in keys:
        raise ConfigError(f"{table.key}.key", "must be one of the secret's keys")
    table.reject_unknown()
    return rotation


def _parse_audit(table: _Table) -> AuditConfig:
    to_stdout = table.string("file", "-") == "-"
    fail_closed = table.boolean("fail_closed", AuditConfig.fail_closed)
    key = None
    if table.has("key_file"):
        try:
            key = load_key(table.path("key_file"))
        except KeyFileError as exc:
            raise ConfigError("audit.key_file", str(exc)) from None
    mode_text = table.string("file_mode", "0600")
    if not re.fullmatch(r"0?[0-7]{3}", mode_text) or int(mode_text, 8) & 0o077 & ~0o044:
        raise ConfigError("audit.file_mode", 'must be an octal mode like "0600" or "0640"')
    config = AuditConfig(
        file=None if to_stdout else table.path("file", must_exist=False),
        fail_closed=fail_closed,
        key=key,
        file_mode=int(mode_text, 8),
        queue_size=table.integer("queue_size", AuditConfig.queue_size, minimum=1),
        write_timeout=table.positive_duration("write_timeout", AuditConfig.write_timeout),
    )
    table.reject_unknown()
    return config


def _parse_admin(table: _Table) -> AdminConfig:
    config = AdminConfig(
        identities=frozenset(table.strings("identities")),
        state_file=table.path("state_file", must_exist=False) if table.has("state_file") else None,
    )
    table.reject_unknown()
    return config


def _parse_rollout(table: _Table) -> RolloutConfig:
    config = RolloutConfig(
        rotation_check_interval=table.positive_duration(
            "rotation_check_interval", RolloutConfig.rotation_check_interval
        ),
        watch_poll_interval=table.positive_duration(
            "watch_poll_interval", RolloutConfig.watch_poll_interval
        ),
        previous_versions=table.integer("previous_versions", RolloutConfig.previous_versions),
    )
    table.reject_unknown()
    return config


def _parse_identity(
    table: _Table, access: Mapping[str, tuple[str, ...]], admin: AdminConfig
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
    config = IdentityConfig(domains, table.boolean("cn_fallback", IdentityConfig.cn_fallback))
    table.reject_unknown()
    for key, identity in named:
        if identity.startswith(CN_PREFIX):
            if not config.cn_fallback:
                raise ConfigError(key, f"names {identity!r}, but identity.cn_fallback is off")
            continue
        trust_domain = spiffe_trust_domain(identity)
        if trust_domain is None:
            raise ConfigError(key, f'{identity!r} is neither a SPIFFE ID nor "cn:NAME"')
        if trust_domain not in domains:
            raise ConfigError(key, f"{identity!r} is not in identity.trust_domains")
    return config


def _parse_access(table: _Table) -> Mapping[str, tuple[str, ...]]:
    access: dict[str, tuple[str, ...]] = {}
    for identity, patterns in table.items():
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"access.{identity}", "must be a list of secret name patterns")
        access[identity] = tuple(patterns)
    return access
