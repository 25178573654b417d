"""The gRPC surface of SecretBrokerAdmin: rollback flips and rotations, for admin identities
only, every call audited."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from broker.api.calls import Call, CallRules, timestamp
from broker.audit.trail import AuditTrail
from broker.config import SecretSpec
from broker.core.resolver import SecretResolver
from broker.core.rollback import Flip, RollbackState, RollbackStatus, Rule
from broker.core.rotation import Rotator
from broker.errors import SecretNotDeclared
from broker.names import validate_secret_name
from broker.sources.base import SourceKind
from broker.sources.node_health import NodeHealth, NodeRole
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

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
    """Admin identities only (``rules``); each handler is its decision alone, the rest is the
    plumbing's (broker/api/calls.py). Every action is recorded before it is answered."""

    def __init__(
        self,
        secrets_: Mapping[str, SecretSpec],
        rollback: RollbackState,
        resolver: SecretResolver,
        rotator: Rotator,
        audit: AuditTrail,
        vault_nodes: Callable[[], list[NodeHealth]] = list,
    ) -> None:
        self._vault_nodes = vault_nodes
        self._secrets = secrets_
        self._rollback = rollback
        self._resolver = resolver
        self._rotator = rotator
        self._audit = audit

    @staticmethod
    def rules(admins: frozenset[str]) -> CallRules:
        return CallRules(audit_event="admin", admins=admins)

    async def GetRollbackState(  # type: ignore[override]
        self, request: broker_pb2.GetRollbackStateRequest, call: Call
    ) -> broker_pb2.GetRollbackStateResponse:
        await self._record(call)
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

    async def SetRollbackOverride(  # type: ignore[override]
        self, request: broker_pb2.SetRollbackOverrideRequest, call: Call
    ) -> broker_pb2.SetRollbackOverrideResponse:
        flip = self._rollback.plan_set(list(request.vault_enabled_categories), call.identity)
        status = await self._flip(call, flip)
        log.warning(
            "%s set the rollback override: from vault [%s], from env [%s]",
            call.identity,
            ", ".join(sorted(status.vault_categories)),
            ", ".join(sorted(status.env_categories)),
        )
        return broker_pb2.SetRollbackOverrideResponse(state=self._state_message())

    async def ClearRollbackOverride(  # type: ignore[override]
        self, request: broker_pb2.ClearRollbackOverrideRequest, call: Call
    ) -> broker_pb2.ClearRollbackOverrideResponse:
        status = await self._flip(call, self._rollback.plan_clear())
        log.warning(
            "%s cleared the rollback override (rule now: %s)", call.identity, status.rule.value
        )
        return broker_pb2.ClearRollbackOverrideResponse(state=self._state_message())

    async def RotateSecret(  # type: ignore[override]
        self, request: broker_pb2.RotateSecretRequest, call: Call
    ) -> broker_pb2.RotateSecretResponse:
        call.note(secret=request.name)
        validate_secret_name(request.name)
        spec = self._secrets.get(request.name)
        if spec is None:
            raise SecretNotDeclared("secret is not declared by this broker")
        written = await self._rotator.rotate(spec)
        await self._record(call, secret=spec.name, version=written.version)
        return broker_pb2.RotateSecretResponse(
            name=spec.name,
            version=written.version,
            created_at=timestamp(written.created_at or written.fetched_at),
        )

    async def _flip(self, call: Call, flip: Flip) -> RollbackStatus:
        """All or nothing: the record first, then the change; a failure of either changes
        nothing and answers UNAVAILABLE (a failed change is recorded "failed")."""
        await self._record(
            call,
            vault_enabled_categories=sorted(flip.vault_categories),
            override=None if flip.override is None else sorted(flip.override.vault_categories),
            changed_categories=sorted(flip.changed),
            secrets=sorted(s.name for s in self._secrets.values() if s.category in flip.changed),
        )
        call.acting()
        return await self._rollback.commit(flip)

    async def _record(self, call: Call, **fields: object) -> None:
        """Record an allowed admin action before it is answered; AuditUnavailable when audit is
        fail-closed and the record cannot be written."""
        await self._audit.confirm(
            self._audit.record(
                "admin", rpc=call.method, identity=call.identity, decision="allow", **fields
            )
        )

    def _state_message(self) -> broker_pb2.RollbackState:
        message = state_message(self._rollback.status())
        for spec in self._secrets.values():
            missing = self._resolver.missing_env_variables(spec)
            if missing:
                message.missing_env.add(
                    secret=spec.name,
                    category=spec.category,
                    variables=missing,
                    served_from_env=self._resolver.source_of(spec) is SourceKind.ENV,
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
