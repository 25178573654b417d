"""The gRPC surface of SecretBrokerAdmin: rollback flips and rotations, for admin identities
only, every call audited."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

from broker.audit import AuditTrail
from broker.config import SecretSpec
from broker.errors import AccessDenied, AuditUnavailable, BrokerError, SecretNotDeclared
from broker.grpc_common import Context, Unparsable, abort, parsed, timestamp
from broker.grpc_status import status_for
from broker.identity import IdentityResolver
from broker.metrics import BrokerMetrics
from broker.names import validate_secret_name
from broker.rollback import Flip, RollbackState, RollbackStatus, Rule
from broker.rotation import Rotator
from broker.sources.base import SourceKind
from broker.sources.node_health import NodeHealth, NodeRole
from broker.values import SecretValues
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

R = TypeVar("R")

_NODE_ROLE = {
    NodeRole.ACTIVE: broker_pb2.VAULT_NODE_ROLE_ACTIVE,
    NodeRole.STANDBY: broker_pb2.VAULT_NODE_ROLE_STANDBY,
    NodeRole.SEALED: broker_pb2.VAULT_NODE_ROLE_SEALED,
    NodeRole.UNINITIALIZED: broker_pb2.VAULT_NODE_ROLE_UNINITIALIZED,
}

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
        values: SecretValues,
        rotator: Rotator,
        identities: IdentityResolver,
        audit: AuditTrail,
        metrics: BrokerMetrics,
        vault_nodes: Callable[[], list[NodeHealth]] = list,
    ) -> None:
        self._metrics = metrics
        self._vault_nodes = vault_nodes
        self._admins = admins
        self._secrets = secrets_
        self._rollback = rollback
        self._values = values
        self._rotator = rotator
        self._identities = identities
        self._audit = audit

    async def GetRollbackState(
        self, request: broker_pb2.GetRollbackStateRequest | Unparsable, context: Context
    ) -> broker_pb2.GetRollbackStateResponse:
        with self._metrics.rpc("GetRollbackState", context):
            identity = await self._admin(context, "GetRollbackState")
            await self._parse(context, identity, "GetRollbackState", request)
            await self._record_or_abort(context, identity, "GetRollbackState", "allow")
            return broker_pb2.GetRollbackStateResponse(
                state=self._state_message(),
                vault_nodes=[
                    broker_pb2.VaultNode(
                        address=node.address,
                        reachable=node.reachable,
                        role=_NODE_ROLE.get(node.role, broker_pb2.VAULT_NODE_ROLE_UNSPECIFIED),
                    )
                    for node in self._vault_nodes()
                ],
            )

    async def SetRollbackOverride(
        self, request: broker_pb2.SetRollbackOverrideRequest | Unparsable, context: Context
    ) -> broker_pb2.SetRollbackOverrideResponse:
        with self._metrics.rpc("SetRollbackOverride", context):
            identity = await self._admin(context, "SetRollbackOverride")
            message = await self._parse(context, identity, "SetRollbackOverride", request)
            try:
                flip = self._rollback.plan_set(list(message.vault_enabled_categories), identity)
            except BrokerError as exc:
                self._record_denial(identity, "SetRollbackOverride", exc)
                await abort(context, "SetRollbackOverride", identity, exc)
            status = await self._flip(context, identity, "SetRollbackOverride", flip)
            log.warning(
                "%s set the rollback override: from vault [%s], from env [%s]",
                identity,
                ", ".join(sorted(status.vault_categories)),
                ", ".join(sorted(status.env_categories)),
            )
            return broker_pb2.SetRollbackOverrideResponse(state=self._state_message())

    async def ClearRollbackOverride(
        self, request: broker_pb2.ClearRollbackOverrideRequest | Unparsable, context: Context
    ) -> broker_pb2.ClearRollbackOverrideResponse:
        with self._metrics.rpc("ClearRollbackOverride", context):
            identity = await self._admin(context, "ClearRollbackOverride")
            await self._parse(context, identity, "ClearRollbackOverride", request)
            flip = self._rollback.plan_clear()
            status = await self._flip(context, identity, "ClearRollbackOverride", flip)
            log.warning(
                "%s cleared the rollback override (rule now: %s)", identity, status.rule.value
            )
            return broker_pb2.ClearRollbackOverrideResponse(state=self._state_message())

    async def RotateSecret(
        self, request: broker_pb2.RotateSecretRequest | Unparsable, context: Context
    ) -> broker_pb2.RotateSecretResponse:
        with self._metrics.rpc("RotateSecret", context):
            identity = await self._admin(context, "RotateSecret")
            message = await self._parse(context, identity, "RotateSecret", request)
            try:
                validate_secret_name(message.name)
                spec = self._secrets.get(message.name)
                if spec is None:
                    raise SecretNotDeclared("secret is not declared by this broker")
                written = await self._rotator.rotate(spec)
            except BrokerError as exc:
                self._record_denial(identity, "RotateSecret", exc, secret=message.name)
                await abort(context, "RotateSecret", identity, exc)
            await self._record_or_abort(
                context,
                identity,
                "RotateSecret",
                "allow",
                secret=spec.name,
                version=written.version,
            )
            return broker_pb2.RotateSecretResponse(
                name=spec.name,
                version=written.version,
                created_at=timestamp(written.created_at or written.fetched_at),
            )

    async def _flip(self, context: Context, identity: str, rpc: str, flip: Flip) -> RollbackStatus:
        """All or nothing: the record first, then the change; a failure of either changes
        nothing and answers UNAVAILABLE."""
        await self._record_or_abort(
            context,
            identity,
            rpc,
            "allow",
            vault_enabled_categories=sorted(flip.vault_categories),
            override=None if flip.override is None else sorted(flip.override.vault_categories),
            changed_categories=sorted(flip.changed),
            secrets=sorted(s.name for s in self._secrets.values() if s.category in flip.changed),
        )
        try:
            return await self._rollback.commit(flip)
        except BrokerError as exc:
            self._record_denial(identity, rpc, exc, outcome="failed")
            await abort(context, rpc, identity, exc)

    async def _admin(self, context: Context, rpc: str) -> str:
        """The caller's identity, if it is an admin; else the call ends PERMISSION_DENIED."""
        identity: str | None = None
        try:
            identity = self._identities.identity(context.auth_context())
            if identity in self._admins:
                return identity
            raise AccessDenied("caller is not a broker admin")
        except AccessDenied as exc:
            self._record_denial(identity, rpc, exc)
            await abort(context, rpc, identity, exc)

    async def _parse(self, context: Context, identity: str, rpc: str, request: R | Unparsable) -> R:
        try:
            return parsed(request)
        except BrokerError as exc:
            self._record_denial(identity, rpc, exc)
            await abort(context, rpc, identity, exc)

    async def _record_or_abort(
        self, context: Context, identity: str, rpc: str, decision: str, **fields: object
    ) -> None:
        """Record an admin action before it is answered; UNAVAILABLE when audit is fail-closed
        and the record cannot be written."""
        try:
            await self._audit.confirm(
                self._audit.record("admin", rpc=rpc, identity=identity, decision=decision, **fields)
            )
        except AuditUnavailable as exc:
            await abort(context, rpc, identity, exc)

    def _record_denial(
        self,
        identity: str | None,
        rpc: str,
        exc: BrokerError,
        outcome: str = "deny",
        **fields: object,
    ) -> None:
        """The request is refused anyway: a record that cannot be written changes nothing."""
        with contextlib.suppress(AuditUnavailable):
            self._audit.record(
                "admin",
                rpc=rpc,
                identity=identity,
                decision=outcome,
                reason=f"{status_for(exc).name}: {exc}",
                **fields,
            )

    def _state_message(self) -> broker_pb2.RollbackState:
        message = state_message(self._rollback.status())
        for spec in self._secrets.values():
            missing = self._values.missing_env_variables(spec)
            if missing:
                message.missing_env.add(
                    secret=spec.name,
                    category=spec.category,
                    variables=missing,
                    served_from_env=self._values.source_of(spec) is SourceKind.ENV,
                )
        return message


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
