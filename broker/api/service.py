"""The gRPC surface of SecretBroker: requests in, secrets out, one audit record per decision
(refusals are the plumbing's: broker/api/calls.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from broker.api.calls import Call, CallRules, timestamp
from broker.audit.trail import AuditTrail, PendingWrite
from broker.core.cache import CachedSecret
from broker.core.reader import SecretReader
from broker.core.watch import Watcher
from broker.lru import BoundedLru
from broker.sources.base import SecretValue, SourceKind
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

Response = TypeVar("Response")
RecordAllowed = Callable[[str, str, str, int, str, bool], PendingWrite | None]
"""AuditTrail.record_allowed or record_pushed."""

_SOURCE = {SourceKind.VAULT: broker_pb2.SOURCE_VAULT, SourceKind.ENV: broker_pb2.SOURCE_ENV}


class SecretBrokerService(broker_pb2_grpc.SecretBrokerServicer):
    """Each handler is its decision alone: identity, parsing, metrics, refusals and their
    audit records are the plumbing's (broker/api/calls.py, ``RULES``)."""

    RULES = CallRules(audit_event="access", noted=("secret", "version"))

    def __init__(self, reader: SecretReader, watcher: Watcher, audit: AuditTrail) -> None:
        self._reader = reader
        self._watcher = watcher
        self._audit = audit
        self._responses = ResponseCache(lambda s: broker_pb2.GetSecretResponse(secret=s))
        self._watch_responses = ResponseCache(lambda s: broker_pb2.WatchSecretsResponse(secret=s))

    async def GetSecret(  # type: ignore[override]
        self, request: broker_pb2.GetSecretRequest, call: Call
    ) -> broker_pb2.GetSecretResponse:
        name = request.name
        version = request.version if request.HasField("version") else None
        call.note(secret=name, version=version)
        cached = await self._reader.read(call.identity, name, version, request.min_version)
        await self._audit.confirm(self._allowed(call, name, cached, self._audit.record_allowed))
        return self._responses.response(name, cached)

    async def WatchSecrets(  # type: ignore[override]
        self, request: broker_pb2.WatchSecretsRequest, call: Call
    ) -> AsyncIterator[broker_pb2.WatchSecretsResponse]:
        names = list(request.names)
        call.note(secret=",".join(names))
        min_versions = dict(request.min_versions)
        audit = self._audit
        watch = self._watcher.watch(call.identity, names, min_versions)
        async for name, cached, changed in watch:
            # A stream's first value is its own record; a change pushed to many streams at once
            # (a rotation's fan-out) is one record for all of them.
            record = audit.record_pushed if changed else audit.record_allowed
            await audit.confirm(self._allowed(call, name, cached, record))
            yield self._watch_responses.response(name, cached)

    def _allowed(
        self, call: Call, name: str, cached: CachedSecret, record: RecordAllowed
    ) -> PendingWrite | None:
        """Queues the record; what to confirm before answering when audit is fail-closed."""
        value = cached.value
        source = "cache" if cached.from_cache else value.source.value
        return record(call.method, call.identity, name, value.version, source, cached.stale)


class ResponseCache(Generic[Response]):
    """The response built for each value served, reused while that value is served: a cached
    secret is answered without building its message again, and a rotation's fan-out builds
    one message for all its watch streams. Keyed by the value object itself (compared by
    identity), so a new read always gets a new message."""

    MAX_ENTRIES = 4096

    def __init__(self, wrap: Callable[[broker_pb2.Secret], Response]) -> None:
        self._wrap = wrap
        self._built: BoundedLru[tuple[str, int, bool], tuple[SecretValue, Response]] = BoundedLru(
            self.MAX_ENTRIES
        )

    def response(self, name: str, cached: CachedSecret) -> Response:
        key = (name, id(cached.value), cached.stale)
        hit = self._built.get(key)
        if hit is not None and hit[0] is cached.value:
            return hit[1]
        response = self._wrap(secret_message(name, cached))
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
