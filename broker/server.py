"""Assembles the broker from its config and runs it: gRPC over mutual TLS on asyncio.

One event loop serves every RPC and every watch stream; blocking Vault calls run
in a small thread pool, so thousands of idle streams cost no threads. Background
tasks keep the Vault token fresh (sources/token_keeper.py), rotate secrets when
due (core/rotation.py), notice new versions of watched secrets (core/watch.py), probe
Vault's health for readiness and metrics (observe/health.py), and freeze the long-lived
objects of open streams out of the garbage collector's scans (heap.py). Metrics and
probes are served over HTTP on their own listener (observe/metrics_http.py).

Every background task is supervised: one that dies unexpectedly is logged CRITICAL with
its traceback, turns the broker NOT_SERVING and ends ``wait()``, so the process exits
with broker.cli's EXIT_BACKGROUND_TASK_DIED and its orchestrator restarts it.

A starting broker binds its port at once but takes calls only once it holds a value
for every declared secret (the warm-up: every Vault-served one is read at start, and
again every probe interval until each is held), or once server.warmup_timeout has
passed; until then a client's connection waits in the listen backlog, so no client,
health-checking or not, sends it a call another replica could answer. Routing (the
health name clients balance on, ROUTING_HEALTH_SERVICE) is SERVING from then until it
starts to shut down, and not while a fail-closed audit trail cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # public as grpc_health.v1.health.aio

from broker.api.admin import SecretBrokerAdminService
from broker.api.calls import CallPlumbing, CallRules, DrainGate, add_servicer
from broker.api.service import SecretBrokerService
from broker.audit.trail import AuditTrail
from broker.config import BrokerConfig, SecretSpec
from broker.core.cache import SecretCache
from broker.core.changes import ChangeFeed
from broker.core.leases import LeaseKeeper
from broker.core.policy import AccessPolicy
from broker.core.reader import SecretReader
from broker.core.resolver import SecretResolver
from broker.core.rollback import RollbackState
from broker.core.rotation import Rotator
from broker.core.watch import Watcher, poll_watched_versions
from broker.errors import BrokerError, ConfigError, SourceUnavailable
from broker.heap import freeze_survivors
from broker.observe.health import Readiness, probe_vault
from broker.observe.metrics import BrokerMetrics, ScrapedState
from broker.observe.metrics_http import MetricsServer
from broker.security.identity import IdentityResolver
from broker.security.tls import ServerTlsReloader
from broker.sources.base import RoutedStore, SecretValue, SourceKind
from broker.sources.database_engine import DatabaseEngine
from broker.sources.env import EnvSource
from broker.sources.token_keeper import keep_token_fresh
from broker.sources.vault import VaultSource
from secretbroker.client import ROUTING_HEALTH_SERVICE
from secretbroker.v1 import broker_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

VAULT_IO_THREADS = 8
HEARTBEAT_INTERVAL = 1.0
LOOP_STALL = 10.0
"""Seconds without a heartbeat after which /healthz reports the event loop stuck."""
ROUTING_INTERVAL = 0.5
"""How often the routing health name is brought up to date."""
SERVER_KEEPALIVE_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


def server_options(config: BrokerConfig) -> list[tuple[str, int]]:
    """gRPC core's settings for the broker's server, where its defaults do not fit a fleet."""
    pending = config.limits.max_pending_calls
    min_ping_ms = int(config.server.min_client_ping_interval * 1000)
    return [
        ("grpc.so_reuseport", 0),
        # The aio server takes arrived calls up one per event-loop turn; calls that wait longer
        # are "pending", and core sheds them at random past 1,000 and refuses all past 3,000 by
        # default. A burst of reconnecting watchers is far more than that: soft limit = hard
        # limit, so nothing is shed below the configured bound.
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending),
        # Clients' keepalive pings on idle streams (the SDK's every 60 s) are welcome; core's
        # default (5 min) answers them with GOAWAY too_many_pings, breaking the streams.
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Notice a client that vanished without closing its connection (its host died): its
        # streams end and stop counting against its identity's limit within about 80 s, not
        # core's 2 hours; and keep pinging a connection whose streams are idle.
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class Broker:
    """A running broker. ``await start()``, then ``await stop()``.

    ``environ`` is where rolled-back secrets are read from: the process environment
    unless a test passes its own. ``clock`` is the cache's (TTLs, staleness, backoff): a test
    passes one it can move forward instead of waiting for a real TTL. The metrics go to a
    registry of the broker's own (never prometheus_client's global one).
    """

    def __init__(
        self,
        config: BrokerConfig,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        # First: these may refuse to start (a folder that cannot be made, an unreadable override
        # file) before anything is opened.
        for path, key in (
            (config.admin.state_file, "admin.state_file"),
            (config.audit.file, "audit.file"),
        ):
            prepare_folder(path, key)
        self._routing_due = asyncio.Event()
        """Set when routing must be looked at now, not at the next ROUTING_INTERVAL (a
        fail-closed audit trail refused a request)."""
        self.rollback = RollbackState(
            config.categories,
            config.startup_rollback,
            config.admin.state_file,
            on_flip=self._on_flip,
        )
        self.metrics = BrokerMetrics(config.secrets, vault_nodes=config.vault.addresses)
        self.vault = VaultSource(config.vault, observer=self.metrics)
        self._executor = ThreadPoolExecutor(VAULT_IO_THREADS, thread_name_prefix="vault-io")
        self.feed = ChangeFeed()
        try:
            self.audit = AuditTrail(
                config.audit.file,
                fail_closed=config.audit.fail_closed,
                on_failure=self.metrics.audit_failed,
                on_drop=self.metrics.audit_record_dropped,
                on_refuse=self._routing_due.set,
                key=config.audit.key,
                mode=config.audit.file_mode,
                queue_size=config.audit.queue_size,
                write_timeout=config.audit.write_timeout,
            )
        except OSError as exc:
            raise ConfigError(
                "audit.file", f"cannot open {config.audit.file} ({exc.strerror})"
            ) from None
        self.leases = LeaseKeeper(
            config.secrets,
            DatabaseEngine(config.vault, self.vault.session),
            self.run_vault_io,
            on_new_value=self._serve_new_credentials,
            metrics=self.metrics,
            audit=self.audit,
        )
        for name in self.leases.specs:
            self.metrics.database_secret(name)
        # Leases die with the token that read them: the keeper moves them to a new one first.
        self.vault.session.keep_replaced_tokens = bool(self.leases.specs)
        self.cache = SecretCache(
            RoutedStore(self.vault, self.leases),
            config.cache,
            self._executor,
            clock=clock,
            metrics=self.metrics,
            on_new_version=lambda name: self.feed.publish([name]),
        )
        self.resolver = SecretResolver(
            self.cache,
            EnvSource(os.environ if environ is None else environ),
            self.rollback,
            config.rollout.previous_versions,
            metrics=self.metrics,
        )
        self._warn_missing_env(config.categories)
        reader = SecretReader(config.secrets, AccessPolicy(config.access), self.resolver)
        self.rotator = Rotator(
            config.secrets,
            self.vault,
            self.resolver,
            self.feed,
            self.run_vault_io,
            metrics=self.metrics,
            leases=self.leases,
        )
        self.readiness = Readiness(
            config.secrets,
            self.resolver,
            self.vault.session,
            audit_problem=self.audit.problem if config.audit.fail_closed else lambda: None,
        )
        self._health = HealthServicer()
        identities = self._identities = IdentityResolver(
            config.identity.trust_domains, config.identity.cn_fallback
        )
        self._probe_executor = ThreadPoolExecutor(1, thread_name_prefix="vault-probe-loop")
        self.died: asyncio.Future[str] | None = None
        """Resolved with the task's name when a background task dies (see the module doc)."""
        self.heartbeat = time.monotonic()
        self._taking_calls = False
        """The gRPC server runs (warm, or warmup_timeout passed; not after it stopped)."""
        self._closed_doors = False
        """The gRPC server was stopped because a fail-closed audit trail cannot be written."""
        self._doors_closing: asyncio.Task[None] | None = None
        """That server's stop: one stop, which a shutdown or a reopening waits for."""
        self._warmup_ends = 0.0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._routing: bool | None = None

        def plumbing(rules: CallRules) -> CallPlumbing:
            return CallPlumbing(rules, identities, self.audit, self.metrics)

        self._services: list[tuple[Callable[[Any, Any], None], object, CallPlumbing]] = [
            (
                broker_pb2_grpc.add_SecretBrokerServicer_to_server,
                SecretBrokerService(
                    reader,
                    Watcher(reader, self.resolver, self.feed, config.limits, self.metrics),
                    self.audit,
                ),
                plumbing(SecretBrokerService.RULES),
            ),
            (
                broker_pb2_grpc.add_SecretBrokerAdminServicer_to_server,
                SecretBrokerAdminService(
                    config.secrets,
                    self.rollback,
                    self.resolver,
                    self.rotator,
                    self.audit,
                    vault_nodes=lambda: self.readiness.nodes,
                ),
                plumbing(SecretBrokerAdminService.rules(config.admin.identities)),
            ),
        ]
        self._server, self._gate = self._build_server()
        self._tls: ServerTlsReloader | None = None
        self.metrics.follow_state(
            self._scraped_state(),
            categories=config.categories,
            identities=[*config.access, *config.admin.identities],
        )
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    def _build_server(self) -> tuple[grpc.aio.Server, DrainGate]:
        """A gRPC server with every service, each call through a drain gate of its own."""
        server = grpc.aio.server(options=server_options(self.config))
        gate = DrainGate()
        for add_to_server, servicer, plumbing in self._services:
            add_servicer(add_to_server, servicer, server, plumbing, gate, self.metrics.unparsable)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        return server, gate

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    async def start(self) -> int:
        """Start serving. Raises ConfigError naming the key when a TLS file is wrong or an
        address cannot be listened on: both are the config's to fix. A start that fails
        half-way releases what it took (the port among them)."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(grace=0, delay=0)
            raise

    async def _start(self) -> int:
        listen = self.config.server.listen
        self.died = asyncio.get_running_loop().create_future()
        tls = self._tls = ServerTlsReloader(
            self.config.server,
            on_change=lambda _: self.metrics.tls_reloaded(),
            on_rejected=self.metrics.tls_rejected,
        )
        if self.config.metrics.listen is not None:
            try:
                self._metrics_server = MetricsServer(
                    self.config.metrics.listen,
                    self.metrics.registry,
                    lambda: self.readiness.current,
                    self.liveness,
                )
            except OSError as exc:
                raise ConfigError(
                    "metrics.listen",
                    f"cannot listen on {self.config.metrics.listen}: {exc.strerror}",
                ) from None
        try:
            self.port = self._server.add_secure_port(listen, tls.credentials())
        except RuntimeError:  # grpc's only word for it: "Failed to bind to address"
            raise ConfigError("server.listen", f"cannot listen on {listen}: {_IN_USE}") from None
        self._warmup_ends = time.monotonic() + self.config.server.warmup_timeout
        await self._health.set(ROUTING_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._metrics_server is not None:
            self._metrics_server.start()
            log.info(
                "metrics on http://%s (port %d)", self.config.metrics.listen, self.metrics_port
            )
        rollout = self.config.rollout
        self._background("event-loop-heartbeat", self._beat())
        self._background("gc-freeze", freeze_survivors())
        self._background(
            "vault-token-keeper", keep_token_fresh(self.vault.session, self.run_vault_io)
        )
        self._background(
            "vault-health-probe",
            probe_vault(
                self.vault.session,
                self.readiness,
                self._health,
                self._run_probe,
                self.config.metrics.vault_probe_interval,
            ),
        )
        self._background(
            "rotation-schedule", self.rotator.run_schedule(rollout.rotation_check_interval)
        )
        if self.leases.specs:
            self._background("database-leases", self.leases.run())
        self._background(
            "watch-version-poller",
            poll_watched_versions(
                self.config.secrets,
                self.resolver,
                self.vault,
                self.feed,
                self.run_vault_io,
                rollout.watch_poll_interval,
            ),
        )
        if await self._prefetch():
            await self._open()
        elif time.monotonic() >= self._warmup_ends:
            await self._open_unwarmed()
        else:
            self._background("warm-up", self._keep_warming_up())
        self._background("routing", self._follow_routing())
        return self.port

    async def _open(self) -> None:
        """Start taking calls (the port was bound at start: until now a client's connection
        waits in the listen backlog, as at a replica that is not there yet)."""
        await self._server.start()
        self._taking_calls = True
        self.readiness.listening = True
        self.readiness.current = self.readiness.check()
        await self._update_routing()
        host = self.config.server.listen.rpartition(":")[0]
        log.info("broker listening on %s:%d (mutual TLS)", host, self.port)

    async def wait(self) -> str | None:
        """Until the broker is stopped, or a background task dies: then its name."""
        stopped = asyncio.ensure_future(self._stopped.wait())
        watched: set[asyncio.Future[Any]] = {stopped}
        if self.died is not None:
            watched.add(self.died)
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        return self.died.result() if self.died is not None and self.died.done() else None

    async def stop(self, grace: float | None = None, delay: float | None = None) -> None:
        """Shut down in the order that loses no call: report NOT_SERVING (clients' health
        watches and load balancers stop sending here), keep serving for ``delay``
        (server.shutdown_delay) while they move; then answer new calls UNAVAILABLE (every
        client retries that elsewhere) and end watch streams UNAVAILABLE (clients resume them
        on another replica) while the calls in flight finish, within ``grace``
        (server.shutdown_grace); only then stop the server. Closes every resource, whatever
        failed before."""
        server = self.config.server
        self._stopping = True
        steps: list[tuple[str, Callable[[], Coroutine[Any, Any, object]]]] = [
            ("report NOT_SERVING", self._health.enter_graceful_shutdown),
            (
                "drain",
                lambda: self._drain(
                    server.shutdown_grace if grace is None else grace,
                    server.shutdown_delay if delay is None else delay,
                ),
            ),
            ("stop background tasks", self._stop_background),
            ("shorten the database leases", self.leases.release),
            ("stop the metrics listener", self._stop_metrics),
            # A Vault call in flight finishes (bounded by vault.call_budget): none outlives it.
            ("stop Vault I/O", lambda: asyncio.to_thread(self._close_vault_io)),
            ("close the audit trail", lambda: asyncio.to_thread(self.audit.close)),
        ]
        for what, step in steps:
            try:
                await step()
            except Exception:
                log.exception("shutdown: could not %s", what)
        self._stopped.set()
        log.info("broker stopped")

    async def _drain(self, grace: float, delay: float) -> None:
        if self._closed_doors:  # stopping already: that one stop ends, at most grace from now
            await self._doors_closed(grace)
            return
        if not self._taking_calls:  # takes no calls: release the port it may hold
            if self.port:
                await self._server.start()
            await self._server.stop(0)
            return
        log.info("shutting down: reported NOT_SERVING, draining")
        await asyncio.sleep(delay)
        await self._close_server(grace)

    async def _close_server(self, grace: float) -> None:
        """Answer new calls UNAVAILABLE and end streams while the calls in flight finish (at
        most ``grace``), then stop the server: its clients' connections close, so clients of
        every kind send their calls to other replicas."""
        self._taking_calls = False
        self.readiness.listening = False
        self._gate.close()
        self.feed.end_all()
        if not await self._gate.wait_drained(grace):
            log.warning("calls still in flight after %gs are cancelled", grace)
        log.info("no call in flight; stopping the gRPC server")
        await self._server.stop(grace)

    async def _close_doors(self) -> None:
        """A fail-closed audit trail cannot be written: every call would be refused, so the
        server stops at once (GOAWAY: clients of every kind move their calls to other replicas
        now, not after a drain spent answering UNAVAILABLE). The calls in flight wait for
        their records and are refused within audit.write_timeout."""
        self._closed_doors = True
        self._taking_calls = False
        self.readiness.listening = False
        self._gate.close()
        self.feed.end_all()
        stop = self._server.stop(self.config.audit.write_timeout + 1.0)
        self._doors_closing = asyncio.create_task(stop, name="close-doors")
        await asyncio.shield(self._doors_closing)  # a cancelled routing task leaves it running

    async def _doors_closed(self, grace: float) -> None:
        """Wait for the stop that closed the doors; calls still in flight after ``grace`` are
        cancelled (a second stop only cuts the first one's grace short)."""
        if self._doors_closing is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._doors_closing), grace)
        except TimeoutError:
            await self._server.stop(0)
            await self._doors_closing

    async def _stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.stop)

    def _close_vault_io(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._probe_executor.shutdown(wait=False, cancel_futures=True)
        self.vault.session.nodes.close()

    def liveness(self) -> tuple[bool, str]:
        """For /healthz (from its own thread): alive unless the event loop has stopped
        turning or a background task died."""
        if self.died is not None and self.died.done():  # the one place that names the task
            return False, f"background task {self.died.result()} died"
        stalled = time.monotonic() - self.heartbeat
        if stalled > LOOP_STALL:
            return False, f"the event loop has not run for {stalled:.0f}s"
        return True, "ok"

    async def _beat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _prefetch(self) -> bool:
        """Read every Vault-served declared secret not held yet (in parallel, each within
        vault.call_budget); whether each is now settled: held, or answered by Vault for good
        (missing, denied). The broker takes calls once every one is (module docstring)."""
        pending = [
            spec
            for spec in self.config.secrets.values()
            if self.resolver.source_of(spec) is SourceKind.VAULT
            and not self.resolver.answerable(spec)
        ]
        results = await asyncio.gather(
            *(self.resolver.prefetch(spec) for spec in pending), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BrokerError):
                raise result  # a bug, not Vault's answer
        unsettled = [
            spec.name
            for spec, result in zip(pending, results, strict=True)
            if isinstance(result, SourceUnavailable)
        ]
        if unsettled:
            log.info("warming up: no value yet for %s", ", ".join(unsettled))
            return False
        log.info("warm: every declared secret is held or answered by vault")
        return True

    async def _keep_warming_up(self) -> None:
        interval = self.config.metrics.vault_probe_interval
        while time.monotonic() < self._warmup_ends:
            await asyncio.sleep(interval)
            if await self._prefetch():
                await self._open()
                return
        await self._open_unwarmed()

    async def _open_unwarmed(self) -> None:
        log.warning(
            "not warm after server.warmup_timeout (%gs): taking calls anyway; reads of"
            " secrets with no value fail until vault answers",
            self.config.server.warmup_timeout,
        )
        await self._open()

    async def _follow_routing(self) -> None:
        while True:
            await self._update_routing()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._routing_due.wait(), ROUTING_INTERVAL)
            self._routing_due.clear()

    async def _update_routing(self) -> None:
        """Set the routing health name (see the module docstring) when it changes; close the
        doors while a fail-closed audit trail cannot be written, and open them again after."""
        audit = self.audit.problem() if self.config.audit.fail_closed else None
        if audit is not None and self._taking_calls and not self._stopping:
            log.warning("taking no calls: %s; the gRPC server stops until it recovers", audit)
            await self._close_doors()
        elif audit is None and self._closed_doors and not self._stopping and self._tls:
            await self._doors_closed(self.config.server.shutdown_grace)
            self._doors_closing = None
            self._server, self._gate = self._build_server()
            host = self.config.server.listen.rpartition(":")[0]
            self._server.add_secure_port(f"{host}:{self.port}", self._tls.credentials())
            self._closed_doors = False
            log.info("the audit trail is writable again")
            await self._open()
        serving = self._taking_calls and audit is None and not self._stopping and not self._dead()
        if serving is self._routing:
            return
        self._routing = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(ROUTING_HEALTH_SERVICE, status)
        if serving:
            log.info("taking traffic")

    def _dead(self) -> bool:
        return self.died is not None and self.died.done()

    async def _run_probe(self, call: Callable[[], T]) -> T:
        """The health probe has a thread of its own: a pool busy with hung Vault reads must
        not stall it (readiness and node order depend on it)."""
        return await asyncio.get_running_loop().run_in_executor(self._probe_executor, call)

    async def run_vault_io(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _scraped_state(self) -> ScrapedState:
        """What the state metrics read at each scrape (observe/metrics.py)."""
        return ScrapedState(
            server_tls=lambda: self._tls.current if self._tls is not None else None,
            client_certificates=lambda: self._identities.certificates_in_use(
                CLIENT_CERTIFICATE_WINDOW
            ),
            vault_nodes=lambda: self.readiness.nodes,
            vault_sealed=lambda: self.readiness.vault_sealed,
            token_expires_at=lambda: self.vault.session.token_expires_at,
            from_vault=self.rollback.from_vault,
            cache_entries=lambda: len(self.cache),
            audit_queued=lambda: self.audit.queued,
            watch_streams=lambda: len(self.feed),
            database_leases=self.leases.states,
        )

    def _serve_new_credentials(self, spec: SecretSpec, value: SecretValue) -> None:
        self.resolver.serve_written(spec, value)
        self.feed.publish([spec.name])

    def _background(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._ended)
        self._tasks.append(task)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A background task ended: fine when cancelled (stop) or done (warm-up); otherwise
        it died, and the broker must be restarted (module docstring)."""
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        if error is None:
            return
        name = task.get_name()
        log.critical(
            "background task %s died; the broker stops serving and exits to be restarted",
            name,
            exc_info=error,
        )
        if self.died is not None and not self.died.done():
            self.died.set_result(name)
        self._tasks.append(asyncio.create_task(self._not_serving(), name="not-serving"))

    async def _not_serving(self) -> None:
        await self._health.enter_graceful_shutdown()

    def _on_flip(self, categories: frozenset[str]) -> None:
        """A committed flip (audited before it was applied) is pushed to watchers, and reads
        waiting on Vault for a secret now served from env are answered from env."""
        self.resolver.on_flip()
        self.feed.publish(s.name for s in self.config.secrets.values() if s.category in categories)
        self._warn_missing_env(categories)

    def _warn_missing_env(self, categories: frozenset[str]) -> None:
        """Name the unset variables of secrets in ``categories`` that are served from env: their
        reads fail (UNAVAILABLE) until the variables are set."""
        for spec in self.config.secrets.values():
            if (
                spec.category not in categories
                or self.resolver.source_of(spec) is not SourceKind.ENV
            ):
                continue
            missing = self.resolver.missing_env_variables(spec)
            if missing:
                log.warning(
                    "%s is served from environment variables, and %s %s not set: its reads fail",
                    spec.name,
                    ", ".join(missing),
                    "is" if len(missing) == 1 else "are",
                )


CLIENT_CERTIFICATE_WINDOW = 600.0
"""Seconds a client certificate counts as in use after it was last presented."""

_IN_USE = "the address is in use, or not an address of this host"


def prepare_folder(path: Path | None, key: str) -> None:
    """Create the folder ``path`` lives in (0700: it holds the broker's state), or raise
    ConfigError naming ``key`` when it cannot be made or written."""
    if path is None:
        return
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create the folder {folder} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(key, f"the folder {folder} is not writable")
