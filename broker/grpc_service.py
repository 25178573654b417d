"""The gRPC surface: requests in, broker errors out as status codes (via grpc_status)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

from broker.cache import CachedSecret
from broker.errors import BrokerError
from broker.grpc_status import status_for
from broker.identity import IdentityResolver
from broker.reader import SecretReader
from broker.sources.base import SourceKind

log = logging.getLogger(__name__)

# Failures ops must see; the rest are the caller's mistakes, logged at DEBUG.
_SERVER_SIDE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})
_SOURCE = {SourceKind.VAULT: broker_pb2.SOURCE_VAULT, SourceKind.ENV: broker_pb2.SOURCE_ENV}


class SecretBrokerService(broker_pb2_grpc.SecretBrokerServicer):
    def __init__(self, reader: SecretReader, identities: IdentityResolver) -> None:
        self._reader = reader
        self._identities = identities

    async def GetSecret(
        self,
        request: broker_pb2.GetSecretRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.GetSecretRequest, broker_pb2.GetSecretResponse
        ],
    ) -> broker_pb2.GetSecretResponse:
        identity = self._identities.identity(context.auth_context())
        try:
            cached = await self._reader.read(identity, request.name)
        except BrokerError as exc:
            code = status_for(exc)
            level = logging.WARNING if code in _SERVER_SIDE else logging.DEBUG
            log.log(level, "GetSecret by %r failed: %s %s", identity, code.name, exc)
            await context.abort(code, str(exc))
        return broker_pb2.GetSecretResponse(secret=secret_message(request.name, cached))

    async def WatchSecrets(
        self,
        request: broker_pb2.WatchSecretsRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.WatchSecretsRequest, broker_pb2.WatchSecretsResponse
        ],
    ) -> AsyncIterator[broker_pb2.WatchSecretsResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchSecrets is not implemented yet")
        yield broker_pb2.WatchSecretsResponse()  # pragma: no cover - makes this an async generator


def secret_message(name: str, cached: CachedSecret) -> broker_pb2.Secret:
    value = cached.value
    fetched_at = Timestamp()
    fetched_at.FromNanoseconds(int(value.fetched_at * 1e9))
    return broker_pb2.Secret(
        name=name,
        data=value.data,
        version=value.version,
        source=_SOURCE[value.source],
        stale=cached.stale,
        fetched_at=fetched_at,
    )
