"""The gRPC surface of SecretBroker: requests in, broker errors out as status codes (via
grpc_status), one audit record per decision."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from broker.audit import AuditTrail, Written
from broker.cache import CachedSecret
from broker.errors import AuditUnavailable, BrokerError
from broker.grpc_common import Context, Unparsable, abort, parsed, timestamp
from broker.grpc_status import status_for
from broker.identity import IdentityResolver
from broker.lru import BoundedLru
from broker.metrics import BrokerMetrics
from broker.reader import SecretReader
from broker.sources.base import SecretValue, SourceKind
from broker.watch import Watcher
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

_SOURCE = {SourceKind.VAULT: broker_pb2.SOURCE_VAULT, SourceKind.ENV: broker_pb2.SOURCE_ENV}


class SecretBrokerService(broker_pb2_grpc.SecretBrokerServicer):
    def __init__(
        self,
        reader: SecretReader,
        watcher: Watcher,
        identities: IdentityResolver,
        audit: AuditTrail,
        metrics: BrokerMetrics,
    ) -> None:
        self._reader = reader
        self._watcher = watcher
        self._identities = identities
        self._audit = audit
        self._metrics = metrics
        self._responses = ResponseCache()

    async def GetSecret(
        self, request: broker_pb2.GetSecretRequest | Unparsable, context: Context
    ) -> broker_pb2.GetSecretResponse:
        with self._metrics.rpc("GetSecret", context):
            identity: str | None = None
            name = version = None
            try:
                identity = self._identities.identity(context.auth_context())
                message = parsed(request)
                name = message.name
                version = message.version if message.HasField("version") else None
                cached = await self._reader.read(identity, name, version, message.min_version)
                written = self._audit_allow("GetSecret", identity, name, cached)
                if written is not None:  # fail-closed: the record is written before the answer
                    await self._audit.confirm(written)
            except BrokerError as exc:
                self._audit_denial("GetSecret", identity, name, version, exc)
                await abort(context, "GetSecret", identity, exc)
            return self._responses.response(name, cached)

    async def WatchSecrets(
        self, request: broker_pb2.WatchSecretsRequest | Unparsable, context: Context
    ) -> AsyncIterator[broker_pb2.WatchSecretsResponse]:
        with self._metrics.rpc("WatchSecrets", context, timed=False):
            identity: str | None = None
            names: list[str] = []
            try:
                identity = self._identities.identity(context.auth_context())
                names = list(parsed(request).names)
                async for name, cached in self._watcher.watch(identity, names):
                    written = self._audit_allow("WatchSecrets", identity, name, cached)
                    if written is not None:
                        await self._audit.confirm(written)
                    yield broker_pb2.WatchSecretsResponse(secret=secret_message(name, cached))
            except BrokerError as exc:
                self._audit_denial("WatchSecrets", identity, ",".join(names), None, exc)
                await abort(context, "WatchSecrets", identity, exc)

    def _audit_allow(
        self, rpc: str, identity: str | None, name: str, cached: CachedSecret
    ) -> Written | None:
        """Queues the record; what to confirm before answering when audit is fail-closed."""
        value = cached.value
        source = "cache" if cached.from_cache else value.source.value
        return self._audit.allowed(rpc, identity, name, value.version, source, cached.stale)

    def _audit_denial(
        self,
        rpc: str,
        identity: str | None,
        name: str | None,
        version: int | None,
        exc: BrokerError,
    ) -> None:
        with contextlib.suppress(AuditUnavailable):  # the request is refused anyway
            self._audit.record(
                "access",
                rpc=rpc,
                identity=identity,
                secret=name,
                decision="deny",
                version=version,
                reason=f"{status_for(exc).name}: {exc}",
            )


class ResponseCache:
    """The GetSecretResponse built for each value served, reused while that value is served:
    a cached secret is answered without building its message again. Keyed by the value
    object itself (compared by identity), so a new read always gets a new message."""

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._built: BoundedLru[
            tuple[str, int, bool], tuple[SecretValue, broker_pb2.GetSecretResponse]
        ] = BoundedLru(self.MAX_ENTRIES)

    def response(self, name: str, cached: CachedSecret) -> broker_pb2.GetSecretResponse:
        key = (name, id(cached.value), cached.stale)
        hit = self._built.get(key)
        if hit is not None and hit[0] is cached.value:
            return hit[1]
        response = broker_pb2.GetSecretResponse(secret=secret_message(name, cached))
        self._built.put(key, (cached.value, response))
        return response


def secret_message(name: str, cached: CachedSecret) -> broker_pb2.Secret:
    value = cached.value
    return broker_pb2.Secret(
        name=name,
        data=value.data,
        version=value.version,
        source=_SOURCE[value.source],
        stale=cached.stale,
        fetched_at=timestamp(value.fetched_at),
        created_at=timestamp(value.created_at) if value.created_at is not None else None,
    )
