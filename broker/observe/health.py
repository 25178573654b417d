"""Readiness, and the probe that keeps it current.

Ready means able to serve: Vault is reachable, unsealed and the broker is logged in;
or, failing that, every declared secret can still be answered from the cache (within
max_stale) or from the environment (rolled back). A fail-closed audit trail that cannot
be written makes the broker not ready, whatever Vault's state. ``/readyz`` and the gRPC
health service (``grpc.health.v1.Health``) both follow it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from grpc_health.v1 import health_pb2

from broker.config import SecretSpec
from broker.core.resolver import SecretResolver
from broker.sources.base import RunBlocking, SourceKind
from broker.sources.node_health import NodeHealth, NodeRole
from broker.sources.vault_session import VaultSession

log = logging.getLogger(__name__)

SERVICE_NAME = "secretbroker.v1.SecretBroker"


class HealthStatusSetter(Protocol):
    """grpc_health's aio HealthServicer, as far as the probe uses it."""

    async def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None: ...


@dataclass(frozen=True)
class ReadinessReport:
    ready: bool
    reason: str


class Readiness:
    def __init__(
        self,
        secrets_: Mapping[str, SecretSpec],
        resolver: SecretResolver,
        session: VaultSession,
        audit_problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        """``audit_problem``: why a fail-closed audit trail cannot be written now, or None."""
        self._secrets = secrets_
        self._resolver = resolver
        self._session = session
        self._audit_problem = audit_problem
        self.listening = False
        """Whether the broker takes calls yet (it warms up first)."""
        self.probed = False
        self.vault_reachable = False
        self.vault_sealed = False
        self.nodes: list[NodeHealth] = []
        """Every Vault node's answer at the last probe."""
        self.current = ReadinessReport(False, "starting: vault not probed yet")
        """The probe's last verdict: what /readyz and gRPC health both report."""

    def check(self) -> ReadinessReport:
        """Ready when every declared secret can be answered from its current source: from env,
        its variables are set; from Vault, Vault is usable or a value is cached (max_stale)."""
        vault = self._vault_problem()
        unanswerable = []
        for name, spec in self._secrets.items():
            if self._resolver.source_of(spec) is SourceKind.ENV:
                missing = self._resolver.missing_env_variables(spec)
                if missing:
                    unanswerable.append(f"{name} (env: {', '.join(missing)} not set)")
            elif vault is not None and not self._resolver.answerable(spec):
                unanswerable.append(name)
        state = vault or "vault is reachable and the broker is logged in"
        audit = self._audit_problem()
        if audit is not None:
            return ReadinessReport(False, f"{audit}; requests are refused (audit.fail_closed)")
        lacking = f"; no value to serve for: {', '.join(unanswerable)}" if unanswerable else ""
        if not self.listening:
            return ReadinessReport(False, f"warming up, not taking calls yet: {state}{lacking}")
        if unanswerable:
            return ReadinessReport(False, f"{state}{lacking}")
        if vault is None:
            return ReadinessReport(True, state)
        return ReadinessReport(True, f"{state}; every secret is answerable from cache or env")

    def _vault_problem(self) -> str | None:
        """Why Vault cannot be used now, or None when it can."""
        if not self.probed:
            return "vault not probed yet"
        if not self.vault_reachable:
            return "no vault node is reachable" if len(self.nodes) > 1 else "vault is not reachable"
        if self.vault_sealed:
            return "vault is sealed"
        if not self._session.authenticated:
            return "the broker is not logged in to vault yet"
        return None


async def probe_vault(
    session: VaultSession,
    readiness: Readiness,
    health_servicer: HealthStatusSetter,
    run_blocking: RunBlocking,
    interval: float,
) -> None:
    """Every ``interval``: ask Vault's health, update readiness and gRPC health (the metrics
    read the answers at scrape time)."""
    serving: bool | None = None
    while True:
        nodes = await run_blocking(session.probe)
        readiness.nodes = nodes
        readiness.vault_reachable = any(node.reachable for node in nodes)
        readiness.vault_sealed = not any(node.usable for node in nodes) and any(
            node.role is NodeRole.SEALED for node in nodes
        )
        readiness.probed = True
        report = readiness.current = readiness.check()
        if report.ready is not serving:
            level = logging.INFO if report.ready or serving is None else logging.WARNING
            serving = report.ready
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", SERVICE_NAME):
                await health_servicer.set(service, status)
            log.log(
                level,
                "%s: %s",
                "ready" if serving else "not ready",
                report.reason,
            )
        await asyncio.sleep(interval)
