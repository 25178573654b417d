"""The broker's Prometheus metrics, on a registry the broker owns (never the global one).

Names are part of the contract and all start with ``secretbroker_``. Every label value
comes from the broker's config (secret names, categories) or from a fixed set (RPC
methods, status codes, cache results, Vault operations and outcomes): nothing a
client sends can add a series. No metric carries a secret value.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

from broker.errors import (
    BrokerError,
    LoginRefused,
    SecretMissingInSource,
    SourceDenied,
    SourceUnavailable,
    WriteConflict,
)
from broker.identity import CertificateLife
from broker.sources.node_health import NodeHealth, NodeRole
from broker.tls import ServerTls

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
    def __init__(
        self,
        registry: CollectorRegistry,
        secrets: Iterable[str] = (),
        categories: Iterable[str] = (),
        identities: Iterable[str] = (),
        vault_nodes: Iterable[str] = (),
    ) -> None:
        self.registry = registry
        self._secrets = frozenset(secrets)
        self._categories = frozenset(categories)
        self._identities = frozenset(identities)
        self._client_certificate_labels: set[str] = set()
        self._vault_nodes = tuple(vault_nodes)
        r = registry
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
        self.cache_entries = Gauge(
            "secretbroker_cache_entries", "Values held in the cache.", registry=r
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
        self.vault_up = Gauge(
            "secretbroker_vault_up",
            "1 when the last call to Vault reached it, else 0.",
            registry=r,
        )
        self.vault_sealed = Gauge(
            "secretbroker_vault_sealed", "1 when Vault reported itself sealed.", registry=r
        )
        self.vault_node_up = Gauge(
            "secretbroker_vault_node_up",
            "Per configured Vault node: 1 when its last health probe was answered.",
            ("node",),
            registry=r,
        )
        self.vault_node_sealed = Gauge(
            "secretbroker_vault_node_sealed",
            "Per Vault node: 1 when it reported itself sealed.",
            ("node",),
            registry=r,
        )
        self.vault_node_active = Gauge(
            "secretbroker_vault_node_active",
            "Per Vault node: 1 for the active node (the raft leader), 0 for a standby or a"
            " node that did not answer.",
            ("node",),
            registry=r,
        )
        self.vault_node_requests = Counter(
            "secretbroker_vault_node_requests",
            "Calls to each Vault node (health probes included) by outcome.",
            ("node", "outcome"),
            registry=r,
        )
        self.token_expiry = Gauge(
            "secretbroker_vault_token_expiry_timestamp_seconds",
            "When the broker's Vault token expires (Unix time); 0 when it does not.",
            registry=r,
        )
        self.vault_enabled = Gauge(
            "secretbroker_vault_enabled",
            "1: the category is served from Vault; 0: rolled back to environment variables.",
            ("category",),
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
        self.watch_streams = Gauge(
            "secretbroker_watch_streams", "Open WatchSecrets streams.", registry=r
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
        self.tls_not_after = Gauge(
            "secretbroker_tls_certificate_expiry_timestamp_seconds",
            "When the broker's server certificate, and the first of its client CAs, expire.",
            ("certificate",),
            registry=r,
        )
        self.tls_not_before = Gauge(
            "secretbroker_tls_certificate_not_before_timestamp_seconds",
            "When the broker's certificates became valid (with the expiry: their lifetime).",
            ("certificate",),
            registry=r,
        )
        self.client_not_after = Gauge(
            "secretbroker_client_certificate_expiry_timestamp_seconds",
            "Per identity the config names: when the first-expiring certificate its clients"
            " presented in the last 10 minutes expires.",
            ("identity",),
            registry=r,
        )
        self.client_not_before = Gauge(
            "secretbroker_client_certificate_not_before_timestamp_seconds",
            "When that client certificate became valid (with the expiry: its lifetime).",
            ("identity",),
            registry=r,
        )
        self.tls_reloads = Counter(
            "secretbroker_tls_reloads",
            "Changed TLS files: loaded, or rejected (the current ones kept).",
            ("result",),
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
        self.audit_queued = Gauge(
            "secretbroker_audit_queued_records",
            "Audit records waiting for the writer thread.",
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
            self.vault_node_up.labels(node)
            self.vault_node_sealed.labels(node)
            self.vault_node_active.labels(node)
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

    # cache -----------------------------------------------------------------------------------

    def tls_files(self, tls: ServerTls, reloaded: bool = True) -> None:
        self.tls_not_after.labels("server").set(tls.not_after)
        self.tls_not_before.labels("server").set(tls.not_before)
        self.tls_not_after.labels("client_ca").set(tls.ca_not_after)
        self.tls_not_before.labels("client_ca").set(tls.ca_not_before)
        if reloaded:
            self.tls_reloads.labels("loaded").inc()

    def client_certificates(self, in_use: Mapping[str, CertificateLife]) -> None:
        """Publish the first-expiring certificate in use per identity; identities the config
        does not name get no series (a certificate is client input), and an identity whose
        clients stopped calling loses its series."""
        shown = {identity for identity in in_use if identity in self._identities}
        for identity in self._client_certificate_labels - shown:
            self.client_not_after.remove(identity)
            self.client_not_before.remove(identity)
        for identity in shown:
            self.client_not_after.labels(identity).set(in_use[identity].not_after)
            self.client_not_before.labels(identity).set(in_use[identity].not_before)
        self._client_certificate_labels = shown

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
        self.vault_up.set(0 if outcome == "unavailable" else 1)

    def vault_node_call(self, node: str) -> AbstractContextManager[None]:
        """One attempt of a call on one node, counted by node and outcome."""
        return _recording_outcome(functools.partial(self.vault_node_request, node))

    def vault_node_request(self, node: str, outcome: str) -> None:
        if node in self._vault_nodes:
            self.vault_node_requests.labels(node, outcome).inc()

    def vault_nodes(self, found: Iterable[NodeHealth]) -> None:
        for health in found:
            if health.address not in self._vault_nodes:
                continue
            self.vault_node_up.labels(health.address).set(1 if health.reachable else 0)
            self.vault_node_sealed.labels(health.address).set(
                1 if health.role is NodeRole.SEALED else 0
            )
            self.vault_node_active.labels(health.address).set(
                1 if health.role is NodeRole.ACTIVE else 0
            )

    def token_lease(self, seconds: float) -> None:
        self.token_expiry.set(time.time() + seconds if seconds > 0 else 0)

    # rollback, rotation, watch -----------------------------------------------------------------

    def follow_rollback(self, from_vault: Callable[[str], bool]) -> None:
        for category in self._categories:
            self.vault_enabled.labels(category).set_function(
                functools.partial(_as_gauge, from_vault, category)
            )

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


def _as_gauge(predicate: Callable[[str], bool], value: str) -> float:
    return 1.0 if predicate(value) else 0.0


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
