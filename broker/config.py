"""The broker's configuration, as its schema: frozen dataclasses, each key with its one default
and its reader on the field (config_reader.py), and its meaning in the field's docstring.
config_loader.py loads and validates them from the TOML file and the environment. Every key is
documented in ``deploy/broker.example.toml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.audit.chain import ChainKey
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
from broker.errors import ConfigError


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
    watch streams. gRPC's own default, 5 minutes, refuses the SDK's pings (every 60 s)."""


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


DATABASE_KEYS = ("username", "password", "url", "expires_at")
"""What a database secret can serve: the user and password of its lease, a URL made from the
``url`` template, and when the lease ends (Unix seconds, as text)."""


def _url_template(table: Table, name: str, _: None) -> str | None:
    if not table.has(name):
        return None
    template = table.string(name)
    if "{username}" not in template or "{password}" not in template:
        raise ConfigError(table.full(name), "must hold {username} and {password}")
    return template


@dataclass(frozen=True)
class DatabaseCredentialsSpec:
    """Credentials issued by Vault's database secrets engine, instead of a KV value: one
    PostgreSQL user per broker replica, renewed while served, succeeded before its max TTL,
    and revoked once its successor has been served for ``handover`` (core/leases.py)."""

    role: str = setting(dataclasses.MISSING, lambda table, name, _: table.string(name))
    """The engine's role (``database/creds/ROLE``)."""
    static: bool = flag(False)
    """``role`` is a static role (``database/static-creds/ROLE``): one existing user whose
    password the engine rotates on its own period. Nothing to renew or revoke; the broker reads
    it again when the engine's rotation is due, and pushes the new password. There is no
    overlap: the old password stops at the rotation (prefer a dynamic role)."""
    mount: str = mount_point("database")
    """Mount point of the database secrets engine."""
    url: str | None = setting(None, _url_template)
    """A URL made for each user: the template with {username} and {password} replaced (both
    percent-encoded), e.g. "postgresql://{username}:{password}@db:5432/catalog"."""
    handover: float = positive_seconds(60.0)
    """Seconds old credentials stay valid after their successor is first served: long enough
    for every client to move its connections (a pool drain waits for the queries running on
    them). The old lease is revoked then, and never sooner."""


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
    database: DatabaseCredentialsSpec | None = None
    """Issued by the database secrets engine instead of read from KV (``path`` unused)."""


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
