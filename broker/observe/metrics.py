"""The broker's Prometheus metrics, on a registry the broker owns (never the global one).

Names are part of the contract and all start with ``secretbroker_``. Every label value
comes from the broker's config (secret names, categories) or from a fixed set (RPC
methods, status codes, cache results, Vault operations and outcomes): nothing a
client sends can add a series. No metric carries a secret value.

Two kinds: events (requests, Vault calls, rotations, refusals) are counted where they
happen, through ``BrokerMetrics``' methods; state (TLS files, client certificates in use,
Vault nodes, the token's expiry, rollback, sizes) is read at scrape time by
``StateCollector`` from the parts that hold it (``ScrapedState``), so no loop pushes it and
no series is removed by hand. Each gauge has exactly one writer. No module outside this
package touches a prometheus_client object.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker.errors import (
    BrokerError,
    LoginRefused,
    SecretMissingInSource,
    SourceDenied,
    SourceUnavailable,
    WriteConflict,
)
from broker.security.identity import CertificateLife
from broker.security.tls import ServerTls
from broker.sources.node_health import NodeHealth, NodeRole

# Sub-millisecond buckets: a cached answer takes well under a millisecond.
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
VAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

RPC_METHODS = (
    "GetSecret",
    "WatchSecrets",
    "GetRollbackState",
    "SetRollbackOverride",
    "ClearRollbackOverride",
    "RotateSecret",
)
CACHE_RESULTS = ("hit", "miss", "stale", "unavailable")
VAULT_OPERATIONS = (
    "login",
    "unwrap",
    "renew",
    "lookup",
    "revoke",
    "read",
    "metadata",
    "write",
    "health",
)
VAULT_OUTCOMES = ("ok", "unavailable", "denied", "missing", "conflict", "error")
ROTATION_RESULTS = ("rotated", "conflict", "failed")
LEASE_OPERATIONS = ("issue", "renew", "revoke", "shorten")
LEASE_RESULTS = ("ok", "failed")
LIMITS = ("watch_names", "watch_streams_per_identity")
TLS_CERTIFICATES = ("server", "client_ca")
TLS_RELOAD_RESULTS = ("loaded", "rejected")


@contextmanager
def _recording_outcome(record: Callable[[str], None]) -> Iterator[None]:
    """Run the block; then hand ``record`` its outcome ("ok", "unavailable", ...), raising or
    not."""
    error: BrokerError | None = None
    try:
        yield
    except BrokerError as exc:
        error = exc
        raise
    finally:
        record(vault_outcome(error))


def vault_outcome(error: BrokerError | None) -> str:
    if error is None:
        return "ok"
    for cls, outcome in (
        (LoginRefused, "denied"),  # Vault answered: it is up, and refuses the credential
        (SourceUnavailable, "unavailable"),
        (SourceDenied, "denied"),
        (SecretMissingInSource, "missing"),
        (WriteConflict, "conflict"),
    ):
        if isinstance(error, cls):
            return outcome
    return "error"


class BrokerMetrics:
    """The broker's event metrics, counted where the events happen (also the sources'
    ``VaultObserver``)."""

    def __init__(self, secrets: Iterable[str] = (), vault_nodes: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self._secrets = frozenset(secrets)
        self._vault_nodes = tuple(vault_nodes)
        r = self.registry
        self.grpc_requests = Counter(
            "secretbroker_grpc_requests",
            "gRPC requests by method and status code.",
            ("method", "code"),
            registry=r,
        )
        self.grpc_duration = Histogram(
            "secretbroker_grpc_request_duration_seconds",
            "Time to answer a unary RPC, or to set up a stream.",
            ("method",),
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.access_denied = Counter(
            "secretbroker_access_denied",
            "Requests refused with PERMISSION_DENIED.",
            ("method",),
            registry=r,
        )
        self.cache_lookups = Counter(
            "secretbroker_cache_lookups",
            "Cache lookups: hit (fresh), miss (read the source),"
            " stale (served past its TTL because the source failed or was slow),"
            " unavailable (nothing to serve, and the source failed moments ago).",
            ("result",),
            registry=r,
        )
        self.vault_requests = Counter(
            "secretbroker_vault_requests",
            "Calls to Vault by operation and outcome.",
            ("operation", "outcome"),
            registry=r,
        )
        self.vault_duration = Histogram(
            "secretbroker_vault_request_duration_seconds",
            "Time of one call to Vault.",
            ("operation",),
            buckets=VAULT_BUCKETS,
            registry=r,
        )
        self.vault_node_requests = Counter(
            "secretbroker_vault_node_requests",
            "Calls to each Vault node (health probes included) by outcome.",
            ("node", "outcome"),
            registry=r,
        )
        self.secret_version = Gauge(
            "secretbroker_secret_version",
            "Version of the cached current value (0: from env).",
            ("secret",),
            registry=r,
        )
        self.secret_fetch = Gauge(
            "secretbroker_secret_fetch_timestamp_seconds",
            "When the current value was last read from its source (Unix time).",
            ("secret",),
            registry=r,
        )
        self.rotations = Counter(
            "secretbroker_rotations", "Rotations by result.", ("secret", "result"), registry=r
        )
        self.rotation_time = Gauge(
            "secretbroker_rotation_timestamp_seconds",
            "When the current version of a rotating secret was written (Unix time).",
            ("secret",),
            registry=r,
        )
        self.rotation_period = Gauge(
            "secretbroker_rotation_period_seconds",
            "Configured rotation period of a rotating secret.",
            ("secret",),
            registry=r,
        )
        self.limit_refusals = Counter(
            "secretbroker_limit_refusals",
            "Requests refused with RESOURCE_EXHAUSTED, by the limit they hit.",
            ("limit",),
            registry=r,
        )
        self.unparsable_requests = Counter(
            "secretbroker_unparsable_requests",
            "Requests whose bytes did not parse (answered INVALID_ARGUMENT).",
            ("method",),
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "secretbroker_tls_handshake_failures",
            "Client connections refused during the TLS handshake (as reported by gRPC core).",
            registry=r,
        )
        self.tls_reloads = Counter(
            "secretbroker_tls_reloads",
            "Changed TLS files: loaded, or rejected (the current ones kept).",
            ("result",),
            registry=r,
        )
        self.lease_operations = Counter(
            "secretbroker_database_lease_operations",
            "Database credential leases issued, renewed, revoked, or shortened at stop, by result.",
            ("secret", "operation", "result"),
            registry=r,
        )
        self.audit_failures = Counter(
            "secretbroker_audit_failures", "Audit records that could not be written.", registry=r
        )
        self.audit_dropped = Counter(
            "secretbroker_audit_dropped",
            "Audit records dropped because the writer's queue was full (a stalled sink).",
            registry=r,
        )
        ProcessCollector(registry=r)
        self._rpc_children: dict[str, tuple[Histogram, dict[grpc.StatusCode, Counter]]] = {}
        self._lookup_children = {
            result: self.cache_lookups.labels(result) for result in CACHE_RESULTS
        }
        self._prepare()

    def _prepare(self) -> None:
        """Create every labelled series up front, so dashboards and alerts see zeros, not gaps."""
        for method in RPC_METHODS:
            self.grpc_duration.labels(method)
            self.access_denied.labels(method)
            self.unparsable_requests.labels(method)
        for limit in LIMITS:
            self.limit_refusals.labels(limit)
        for result in TLS_RELOAD_RESULTS:
            self.tls_reloads.labels(result)
        for node in self._vault_nodes:
            for outcome in VAULT_OUTCOMES:
                self.vault_node_requests.labels(node, outcome)
        for operation in VAULT_OPERATIONS:
            self.vault_duration.labels(operation)
            for outcome in VAULT_OUTCOMES:
                self.vault_requests.labels(operation, outcome)

    # gRPC ------------------------------------------------------------------------------------

    def rpc(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], *, timed: bool = True
    ) -> RpcObservation:
        """Count one RPC by the status it ended with (and time it, unless it is a stream, whose
        life is not a latency). A class, not a generator: this runs on every request."""
        return RpcObservation(self, method, context, timed)

    def _rpc_done(self, method: str, code: grpc.StatusCode, seconds: float | None) -> None:
        children = self._rpc_children.get(method)
        if children is None:
            children = self._rpc_children[method] = (self.grpc_duration.labels(method), {})
        duration, by_code = children
        if seconds is not None:
            duration.observe(seconds)
        counter = by_code.get(code)
        if counter is None:
            counter = by_code[code] = self.grpc_requests.labels(method, code.name)
        counter.inc()
        if code is grpc.StatusCode.PERMISSION_DENIED:
            self.access_denied.labels(method).inc()

    def follow_state(
        self, state: ScrapedState, *, categories: Iterable[str], identities: Iterable[str]
    ) -> None:
        """Publish the broker's state gauges, read from ``state`` at each scrape."""
        self.registry.register(
            StateCollector(
                state, categories=categories, identities=identities, vault_nodes=self._vault_nodes
            )
        )

    # events outside a request ----------------------------------------------------------------

    def tls_reloaded(self) -> None:
        self.tls_reloads.labels("loaded").inc()

    def tls_rejected(self) -> None:
        self.tls_reloads.labels("rejected").inc()

    def tls_handshake_failed(self) -> None:
        self.tls_handshake_failures.inc()

    def audit_failed(self) -> None:
        self.audit_failures.inc()

    def audit_record_dropped(self) -> None:
        self.audit_dropped.inc()

    def limit_refused(self, limit: str) -> None:
        self.limit_refusals.labels(limit).inc()

    # cache -----------------------------------------------------------------------------------

    def unparsable(self, method: str) -> None:
        if method in RPC_METHODS:
            self.unparsable_requests.labels(method).inc()

    def cache_lookup(self, result: str) -> None:
        self._lookup_children[result].inc()

    def secret_read(self, name: str, version: int, fetched_at: float) -> None:
        if name in self._secrets:
            self.secret_version.labels(name).set(version)
            self.secret_fetch.labels(name).set(fetched_at)

    # Vault -----------------------------------------------------------------------------------

    def vault_call(self, operation: str) -> AbstractContextManager[None]:
        """One call to Vault, whichever nodes it took: timed, counted by outcome."""
        return _recording_outcome(
            functools.partial(self._vault_call_done, operation, time.perf_counter())
        )

    def _vault_call_done(self, operation: str, started: float, outcome: str) -> None:
        self.vault_duration.labels(operation).observe(time.perf_counter() - started)
        self.vault_requests.labels(operation, outcome).inc()

    def vault_node_call(self, node: str) -> AbstractContextManager[None]:
        """One attempt of a call on one node, counted by node and outcome."""
        return _recording_outcome(functools.partial(self.vault_node_request, node))

    def vault_node_request(self, node: str, outcome: str) -> None:
        if node in self._vault_nodes:
            self.vault_node_requests.labels(node, outcome).inc()

    def database_secret(self, name: str) -> None:
        for operation in LEASE_OPERATIONS:
            for result in LEASE_RESULTS:
                self.lease_operations.labels(name, operation, result)

    def lease_operation(self, name: str, operation: str, result: str) -> None:
        self.lease_operations.labels(name, operation, result).inc()

    def rotating(self, name: str, period: float) -> None:
        self.rotation_period.labels(name).set(period)
        for result in ROTATION_RESULTS:
            self.rotations.labels(name, result)

    def rotation(self, name: str, result: str, written_at: float | None = None) -> None:
        self.rotations.labels(name, result).inc()
        if written_at is not None:
            self.version_written(name, written_at)

    def version_written(self, name: str, written_at: float) -> None:
        """When the current version of a rotating secret was written, by anyone."""
        self.rotation_time.labels(name).set(written_at)


class RpcObservation:
    __slots__ = ("_context", "_method", "_metrics", "_started", "_timed")

    def __init__(
        self,
        metrics: BrokerMetrics,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        timed: bool,
    ) -> None:
        self._metrics = metrics
        self._method = method
        self._context = context
        self._timed = timed
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started if self._timed else None
        if exc_type is None:
            code = grpc.StatusCode.OK
        else:  # an abort raises, having set the code
            code = self._context.code() or (
                grpc.StatusCode.CANCELLED
                if issubclass(exc_type, asyncio.CancelledError)
                else grpc.StatusCode.UNKNOWN
            )
        self._metrics._rpc_done(self._method, code, seconds)


@dataclass(frozen=True)
class LeaseState:
    """One database secret's leases, as the metrics show them (core/leases.py keeps them)."""

    held: int
    """Leases this replica holds: the current one, and those waiting for revocation."""
    expires_at: float
    """When the current lease ends as last granted (Unix time)."""
    at_risk: bool
    """The current lease cannot be extended (max TTL) or its renewals fail, and no successor
    has been issued yet."""


@dataclass(frozen=True)
class ScrapedState:
    """Where the state metrics come from: each read at scrape time, on the scraping thread, so
    each must be safe to call from any thread and must not block."""

    server_tls: Callable[[], ServerTls | None]
    client_certificates: Callable[[], Mapping[str, CertificateLife]]
    vault_nodes: Callable[[], Sequence[NodeHealth]]
    """The answers of the last health probe (none before the first)."""
    vault_sealed: Callable[[], bool]
    token_expires_at: Callable[[], float]
    from_vault: Callable[[str], bool]
    cache_entries: Callable[[], int]
    audit_queued: Callable[[], int]
    watch_streams: Callable[[], int]
    database_leases: Callable[[], Mapping[str, LeaseState]] = dict


class StateCollector(Collector):
    """The state gauges, read from the broker's parts at scrape time (see the module
    docstring). Identities the config does not name get no client-certificate series (a
    certificate is client input); an identity whose clients stopped calling has none."""

    def __init__(
        self,
        state: ScrapedState,
        *,
        categories: Iterable[str],
        identities: Iterable[str],
        vault_nodes: Iterable[str],
    ) -> None:
        self._state = state
        self._categories = sorted(categories)
        self._identities = frozenset(identities)
        self._vault_nodes = tuple(vault_nodes)

    def describe(self) -> list[Metric]:
        return [family for family, _ in self._families()]

    def collect(self) -> Iterator[Metric]:
        for family, fill in self._families():
            fill(family)
            yield family

    def _families(self) -> list[tuple[GaugeMetricFamily, Callable[[GaugeMetricFamily], None]]]:
        return [
            (
                _gauge("vault_up", "1 when a Vault node answered the last health probe unsealed."),
                self._vault_up,
            ),
            (
                _gauge("vault_sealed", "1 when Vault reported itself sealed at the last probe."),
                self._vault_sealed,
            ),
            (
                _gauge(
                    "vault_node_up",
                    "Per configured Vault node: 1 when its last health probe was answered.",
                    ("node",),
                ),
                functools.partial(self._per_node, lambda health: health.reachable),
            ),
            (
                _gauge(
                    "vault_node_sealed",
                    "Per Vault node: 1 when it reported itself sealed.",
                    ("node",),
                ),
                functools.partial(self._per_node, lambda health: health.role is NodeRole.SEALED),
            ),
            (
                _gauge(
                    "vault_node_active",
                    "Per Vault node: 1 for the active node (the raft leader), 0 for a standby"
                    " or a node that did not answer.",
                    ("node",),
                ),
                functools.partial(self._per_node, lambda health: health.role is NodeRole.ACTIVE),
            ),
            (
                _gauge(
                    "vault_token_expiry_timestamp_seconds",
                    "When the broker's Vault token expires (Unix time); 0 when it does not.",
                ),
                self._token_expiry,
            ),
            (
                _gauge(
                    "database_leases_held",
                    "Per database secret: leases this replica holds (the current one, and old"
                    " ones waiting for revocation after the handover).",
                    ("secret",),
                ),
                functools.partial(self._leases, lambda state: state.held),
            ),
            (
                _gauge(
                    "database_lease_expiry_timestamp_seconds",
                    "Per database secret: when the current lease ends as last granted (Unix"
                    " time); renewals move it.",
                    ("secret",),
                ),
                functools.partial(self._leases, lambda state: state.expires_at),
            ),
            (
                _gauge(
                    "database_lease_at_risk",
                    "Per database secret: 1 while the current lease cannot be extended (max TTL"
                    " near, or renewals failing) and no successor has been issued.",
                    ("secret",),
                ),
                functools.partial(self._leases, lambda state: float(state.at_risk)),
            ),
            (
                _gauge(
                    "vault_enabled",
                    "1: the category is served from Vault; 0: rolled back to environment"
                    " variables.",
                    ("category",),
                ),
                self._vault_enabled,
            ),
            (
                _gauge(
                    "tls_certificate_expiry_timestamp_seconds",
                    "When the broker's server certificate, and the first of its client CAs,"
                    " expire.",
                    ("certificate",),
                ),
                functools.partial(self._tls, lambda tls: (tls.not_after, tls.ca_not_after)),
            ),
            (
                _gauge(
                    "tls_certificate_not_before_timestamp_seconds",
                    "When the broker's certificates became valid (with the expiry: their"
                    " lifetime).",
                    ("certificate",),
                ),
                functools.partial(self._tls, lambda tls: (tls.not_before, tls.ca_not_before)),
            ),
            (
                _gauge(
                    "client_certificate_expiry_timestamp_seconds",
                    "Per identity the config names: when the first-expiring certificate its"
                    " clients presented in the last 10 minutes expires.",
                    ("identity",),
                ),
                functools.partial(self._clients, lambda life: life.not_after),
            ),
            (
                _gauge(
                    "client_certificate_not_before_timestamp_seconds",
                    "When that client certificate became valid (with the expiry: its lifetime).",
                    ("identity",),
                ),
                functools.partial(self._clients, lambda life: life.not_before),
            ),
            (
                _gauge("cache_entries", "Values held in the cache."),
                functools.partial(_size, self._state.cache_entries),
            ),
            (
                _gauge("audit_queued_records", "Audit records waiting for the writer thread."),
                functools.partial(_size, self._state.audit_queued),
            ),
            (
                _gauge("watch_streams", "Open WatchSecrets streams."),
                functools.partial(_size, self._state.watch_streams),
            ),
        ]

    def _vault_up(self, family: GaugeMetricFamily) -> None:
        family.add_metric([], float(any(health.usable for health in self._state.vault_nodes())))

    def _vault_sealed(self, family: GaugeMetricFamily) -> None:
        family.add_metric([], float(self._state.vault_sealed()))

    def _per_node(self, value: Callable[[NodeHealth], bool], family: GaugeMetricFamily) -> None:
        found = {health.address: health for health in self._state.vault_nodes()}
        for node in self._vault_nodes:
            health = found.get(node)
            family.add_metric([node], float(health is not None and value(health)))

    def _leases(self, value: Callable[[LeaseState], float], family: GaugeMetricFamily) -> None:
        for name, state in sorted(self._state.database_leases().items()):
            family.add_metric([name], value(state))

    def _token_expiry(self, family: GaugeMetricFamily) -> None:
        family.add_metric([], self._state.token_expires_at())

    def _vault_enabled(self, family: GaugeMetricFamily) -> None:
        for category in self._categories:
            family.add_metric([category], float(self._state.from_vault(category)))

    def _tls(
        self, values: Callable[[ServerTls], tuple[float, float]], family: GaugeMetricFamily
    ) -> None:
        tls = self._state.server_tls()
        if tls is not None:
            server, client_ca = values(tls)
            family.add_metric(["server"], server)
            family.add_metric(["client_ca"], client_ca)

    def _clients(
        self, value: Callable[[CertificateLife], float], family: GaugeMetricFamily
    ) -> None:
        for identity, life in sorted(self._state.client_certificates().items()):
            if identity in self._identities:
                family.add_metric([identity], value(life))


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"secretbroker_{name}", documentation, labels=labels)


def _size(read: Callable[[], int], family: GaugeMetricFamily) -> None:
    family.add_metric([], read())
