"""The gRPC surface of SecretBrokerAdmin: rollback flips and rotations, for admin identities
only, every call audited."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from secretbroker.v1 import broker_pb2, broker_pb2_grpc

from broker.audit import AuditTrail
from broker.config import SecretSpec
from broker.errors import AccessDenied, BrokerError, SecretNotDeclared
from broker.grpc_service import Context, abort, timestamp
from broker.identity import IdentityResolver
from broker.metrics import BrokerMetrics
from broker.names import validate_secret_name
from broker.rollback import RollbackState, RollbackStatus, Rule
from broker.rotation import Rotator

log = logging.getLogger(__name__)

_RULE = {
    Rule.DEFAULT: broker_pb2.ROLLBACK_RULE_DEFAULT,
    Rule.STARTUP_VARIABLE: broker_pb2.ROLLBACK_RULE_STARTUP_VARIABLE,
    Rule.OVERRIDE: broker_pb2.ROLLBACK_RULE_OVERRIDE,
}


class SecretBrokerAdminService(broker_pb2_grpc.SecretBrokerAdminServicer):
    def __init__(
        self,
        admins: frozenset[str],
        secrets_: Mapping[str, SecretSpec],
        rollback: RollbackState,
        rotator: Rotator,
        identities: IdentityResolver,
        audit: AuditTrail,
        metrics: BrokerMetrics,
    ) -> None:
        self._metrics = metrics
        self._admins = admins
        self._secrets = secrets_
        self._rollback = rollback
        self._rotator = rotator
        self._identities = identities
        self._audit = audit

    async def GetRollbackState(
        self, request: broker_pb2.GetRollbackStateRequest, context: Context
    ) -> broker_pb2.GetRollbackStateResponse:
        with self._metrics.rpc("GetRollbackState", context):
            await self._admin(context, "GetRollbackState")
            return broker_pb2.GetRollbackStateResponse(state=state_message(self._rollback.status()))

    async def SetRollbackOverride(
        self, request: broker_pb2.SetRollbackOverrideRequest, context: Context
    ) -> broker_pb2.SetRollbackOverrideResponse:
        with self._metrics.rpc("SetRollbackOverride", context):
            identity = await self._admin(context, "SetRollbackOverride")
            categories = list(request.vault_enabled_categories)
            try:
                status = self._rollback.set_override(categories, by=identity)
            except BrokerError as exc:
                self._record(identity, "SetRollbackOverride", "deny", reason=str(exc))
                await abort(context, "SetRollbackOverride", identity, exc)
            self._record(
                identity,
                "SetRollbackOverride",
                "allow",
                vault_enabled_categories=sorted(categories),
            )
            log.warning(
                "%s set the rollback override: from vault [%s], from env [%s]",
                identity,
                ", ".join(sorted(status.vault_categories)),
                ", ".join(sorted(status.env_categories)),
            )
            return broker_pb2.SetRollbackOverrideResponse(state=state_message(status))

    async def ClearRollbackOverride(
        self, request: broker_pb2.ClearRollbackOverrideRequest, context: Context
    ) -> broker_pb2.ClearRollbackOverrideResponse:
        with self._metrics.rpc("ClearRollbackOverride", context):
            identity = await self._admin(context, "ClearRollbackOverride")
            status = self._rollback.clear_override()
            self._record(identity, "ClearRollbackOverride", "allow")
            log.warning(
                "%s cleared the rollback override (rule now: %s)", identity, status.rule.value
            )
            return broker_pb2.ClearRollbackOverrideResponse(state=state_message(status))

    async def RotateSecret(
        self, request: broker_pb2.RotateSecretRequest, context: Context
    ) -> broker_pb2.RotateSecretResponse:
        with self._metrics.rpc("RotateSecret", context):
            identity = await self._admin(context, "RotateSecret")
            try:
                validate_secret_name(request.name)
                spec = self._secrets.get(request.name)
                if spec is None:
                    raise SecretNotDeclared("secret is not declared by this broker")
                written = await self._rotator.rotate(spec)
            except BrokerError as exc:
                self._record(identity, "RotateSecret", "deny", secret=request.name, reason=str(exc))
                await abort(context, "RotateSecret", identity, exc)
            self._record(
                identity, "RotateSecret", "allow", secret=spec.name, version=written.version
            )
            return broker_pb2.RotateSecretResponse(
                name=spec.name,
                version=written.version,
                created_at=timestamp(written.created_at or written.fetched_at),
            )

    async def _admin(self, context: Context, rpc: str) -> str:
        identity = self._identities.identity(context.auth_context())
        if identity is None or identity not in self._admins:
            self._record(identity, rpc, "deny", reason="not an admin identity")
            await abort(context, rpc, identity, AccessDenied("caller is not a broker admin"))
        return identity

    def _record(self, identity: str | None, rpc: str, decision: str, **fields: object) -> None:
        self._audit.record("admin", rpc=rpc, identity=identity, decision=decision, **fields)


def state_message(status: RollbackStatus) -> broker_pb2.RollbackState:
    override = status.override
    return broker_pb2.RollbackState(
        vault_enabled_categories=sorted(status.vault_categories),
        env_categories=sorted(status.env_categories),
        rule=_RULE[status.rule],
        startup_variable=status.startup.raw,
        override=None
        if override is None
        else broker_pb2.RollbackOverride(
            vault_enabled_categories=sorted(override.vault_categories),
            set_by=override.set_by,
            set_at=timestamp(override.set_at),
        ),
    )
