"""Assembles the broker from its config and runs it: gRPC over mutual TLS on asyncio.

One event loop serves every RPC and every watch stream; blocking Vault calls run
in a small thread pool, so thousands of idle streams cost no threads. Background
tasks keep the Vault token fresh (sources/token_keeper.py), rotate secrets when
due (rotation.py), notice new versions of watched secrets (watch.py) and probe
Vault's health for readiness and metrics (health.py). Metrics and probes are served
over HTTP on their own listener (metrics_http.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # public as grpc_health.v1.health.aio
from prometheus_client import CollectorRegistry

from broker.audit import AuditTrail
from broker.cache import SecretCache
from broker.changes import ChangeFeed
from broker.config import BrokerConfig, ConfigError
from broker.grpc_admin import SecretBrokerAdminService
from broker.grpc_common import add_servicer
from broker.grpc_service import SecretBrokerService
from broker.health import Readiness, probe_vault
from broker.identity import IdentityResolver
from broker.metrics import BrokerMetrics
from broker.metrics_http import MetricsServer
from broker.policy import AccessPolicy
from broker.reader import SecretReader
from broker.rollback import RollbackState
from broker.rotation import Rotator
from broker.sources.base import SourceKind
from broker.sources.env import EnvSource
from broker.sources.token_keeper import keep_token_fresh
from broker.sources.vault import VaultSource
from broker.tls import ServerTlsReloader
from broker.values import SecretValues
from broker.watch import Watcher, poll_watched_versions
from secretbroker.client import ROUTING_HEALTH_SERVICE
from secretbroker.v1 import broker_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

VAULT_IO_THREADS = 8


class Broker:
    """A running broker. ``await start()``, then ``await stop()``.

    ``environ`` is where rolled-back secrets are read from: the process environment
    unless a test passes its own. ``registry`` receives the metrics: a fresh one unless
    given (never prometheus_client's global registry).
    """

    def __init__(
        self,
        config: BrokerConfig,
        environ: Mapping[str, str] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        # First: these may refuse to start (a folder that cannot be made, an unreadable override
        # file) before anything is opened.
        for path, key in (
            (config.admin.state_file, "admin.state_file"),
            (config.audit.file, "audit.file"),
        ):
            prepare_folder(path, key)
        self.rollback = RollbackState(
            config.categories,
            config.startup_rollback,
            config.admin.state_file,
            on_flip=self._flipped,
        )
        self.metrics = BrokerMetrics(
            registry or CollectorRegistry(),
            config.secrets,
            config.categories,
            identities=[*config.access, *config.admin.identities],
            vault_nodes=config.vault.addresses,
        )
        self.vault = VaultSource(config.vault, metrics=self.metrics)
        self._executor = ThreadPoolExecutor(VAULT_IO_THREADS, thread_name_prefix="vault-io")
        self.feed = ChangeFeed()
        try:
            self.audit = AuditTrail(
                config.audit.file,
                fail_closed=config.audit.fail_closed,
                on_failure=self.metrics.audit_failures.inc,
                key=config.audit.key,
                mode=config.audit.file_mode,
            )
        except OSError as exc:
            raise ConfigError(
                "audit.file", f"cannot open {config.audit.file} ({exc.strerror})"
            ) from None
        self.cache = SecretCache(
            self.vault,
            config.cache,
            self._executor,
            metrics=self.metrics,
            on_new_version=lambda name: self.feed.publish([name]),
        )
        self.values = SecretValues(
            self.cache,
            EnvSource(os.environ if environ is None else environ),
            self.rollback,
            config.rollout.previous_versions,
            metrics=self.metrics,
        )
        self._warn_missing_env(config.categories)
        self.metrics.cache_entries.set_function(lambda: len(self.cache))
        self.metrics.watch_streams.set_function(lambda: len(self.feed))
        self.metrics.follow_rollback(self.rollback.from_vault)
        reader = SecretReader(config.secrets, AccessPolicy(config.access), self.values)
        self.rotator = Rotator(
            config.secrets,
            self.vault,
            self.values,
            self.feed,
            self.run_vault_io,
            metrics=self.metrics,
        )
        self.readiness = Readiness(config.secrets, self.values, self.vault.session)
        self._health = HealthServicer()
        identities = self._identities = IdentityResolver(
            config.identity.trust_domains, config.identity.cn_fallback
        )
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_servicer(
            broker_pb2_grpc.add_SecretBrokerServicer_to_server,
            SecretBrokerService(
                reader,
                Watcher(reader, self.values, self.feed, config.limits, self.metrics),
                identities,
                self.audit,
                self.metrics,
            ),
            self._server,
            self.metrics.unparsable,
        )
        add_servicer(
            broker_pb2_grpc.add_SecretBrokerAdminServicer_to_server,
            SecretBrokerAdminService(
                config.admin.identities,
                config.secrets,
                self.rollback,
                self.values,
                self.rotator,
                identities,
                self.audit,
                self.metrics,
                vault_nodes=lambda: self.readiness.nodes,
            ),
            self._server,
            self.metrics.unparsable,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    async def start(self) -> int:
        """Start serving. Raises ConfigError naming the key when a TLS file is wrong or an
        address cannot be listened on: both are the config's to fix."""
        listen = self.config.server.listen
        tls = ServerTlsReloader(
            self.config.server,
            on_change=self.metrics.tls_files,
            on_rejected=self.metrics.tls_reloads.labels("rejected").inc,
        )
        self.metrics.tls_files(tls.current, reloaded=False)
        try:
            self.port = self._server.add_secure_port(listen, tls.credentials())
        except RuntimeError:  # grpc's only word for it: "Failed to bind to address"
            raise ConfigError("server.listen", f"cannot listen on {listen}: {_IN_USE}") from None
        if self.config.metrics.listen is not None:
            try:
                self._metrics_server = MetricsServer(
                    self.config.metrics.listen,
                    self.metrics.registry,
                    lambda: self.readiness.current,
                )
            except OSError as exc:
                raise ConfigError(
                    "metrics.listen",
                    f"cannot listen on {self.config.metrics.listen}: {exc.strerror}",
                ) from None
        await self._server.start()
        await self._health.set(ROUTING_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self._metrics_server is not None:
            self._metrics_server.start()
            log.info(
                "metrics on http://%s (port %d)", self.config.metrics.listen, self.metrics_port
            )
        rollout = self.config.rollout
        self._background(
            "vault-token-keeper", keep_token_fresh(self.vault.session, self.run_vault_io)
        )
        self._background(
            "vault-health-probe",
            probe_vault(
                self.vault.session,
                self.readiness,
                self.metrics,
                self._health,
                self.run_vault_io,
                self.config.metrics.vault_probe_interval,
            ),
        )
        self._background(
            "rotation-schedule", self.rotator.run_schedule(rollout.rotation_check_interval)
        )
        self._background(
            "watch-version-poller",
            poll_watched_versions(
                self.config.secrets,
                self.values,
                self.vault,
                self.feed,
                self.run_vault_io,
                rollout.watch_poll_interval,
            ),
        )
        self._background("client-certificate-metrics", self._follow_client_certificates())
        host = self.config.server.listen.rpartition(":")[0]
        log.info("broker listening on %s:%d (mutual TLS)", host, self.port)
        return self.port

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None, delay: float | None = None) -> None:
        """Shut down in the order that loses no call: report NOT_SERVING (clients' health
        watches and load balancers stop sending here), keep serving for ``delay``
        (server.shutdown_delay) while they move, then stop taking calls and give those in
        flight ``grace`` (server.shutdown_grace) to finish. Watch streams still open then
        are cancelled; clients resume them on another replica."""
        server = self.config.server
        await self._health.enter_graceful_shutdown()
        log.info("shutting down: reported NOT_SERVING, draining")
        await asyncio.sleep(server.shutdown_delay if delay is None else delay)
        await self._server.stop(server.shutdown_grace if grace is None else grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._metrics_server is not None:
            self._metrics_server.stop()
        # Let a Vault call in flight finish (bounded by vault.timeout) so none outlives the broker.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self.vault.session.nodes.close()
        self.audit.close()
        log.info("broker stopped")

    async def run_vault_io(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def publish_client_certificates(self) -> None:
        """Put the first-expiring client certificate in use per identity in the metrics. Runs
        on the event loop, which owns the identity memo."""
        self.metrics.client_certificates(
            self._identities.certificates_in_use(CLIENT_CERTIFICATE_WINDOW)
        )

    async def _follow_client_certificates(self) -> None:
        while True:
            await self.publish_client_certificates()
            await asyncio.sleep(CLIENT_CERTIFICATE_INTERVAL)

    def _background(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def _flipped(self, categories: frozenset[str]) -> None:
        """A committed flip (audited before it was applied) is pushed to watchers."""
        self.feed.publish(s.name for s in self.config.secrets.values() if s.category in categories)
        self._warn_missing_env(categories)

    def _warn_missing_env(self, categories: frozenset[str]) -> None:
        """Name the unset variables of secrets in ``categories`` that are served from env: their
        reads fail (UNAVAILABLE) until the variables are set."""
        for spec in self.config.secrets.values():
            if spec.category not in categories or self.values.source_of(spec) is not SourceKind.ENV:
                continue
            missing = self.values.missing_env_variables(spec)
            if missing:
                log.warning(
                    "%s is served from environment variables, and %s %s not set: its reads fail",
                    spec.name,
                    ", ".join(missing),
                    "is" if len(missing) == 1 else "are",
                )


CLIENT_CERTIFICATE_WINDOW = 600.0
"""Seconds a client certificate counts as in use after it was last presented."""
CLIENT_CERTIFICATE_INTERVAL = 15.0

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
