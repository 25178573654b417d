"""What both gRPC services share: the end of a failed call, request parsing that cannot fail,
and timestamps."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from broker.errors import BrokerError, InvalidRequest
from broker.grpc_status import status_for
from broker.names import quoted

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")

# Failures ops must see; the rest are the caller's mistakes, logged at DEBUG.
_SERVER_SIDE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})


async def abort(context: Context, rpc: str, identity: str | None, error: BrokerError) -> NoReturn:
    """End the call with the status code the one table gives ``error``."""
    code = status_for(error)
    level = logging.WARNING if code in _SERVER_SIDE else logging.DEBUG
    who = quoted(identity) if identity is not None else "an unidentified caller"
    log.log(level, "%s by %s failed: %s %s", rpc, who, code.name, error)
    await context.abort(code, str(error))


class Unparsable:
    """What a handler receives instead of a request whose bytes do not parse (e.g. invalid
    UTF-8 in a string field): gRPC would otherwise end the call UNKNOWN, with a traceback in
    the log and no audit record."""

    def __init__(self, message_type: str) -> None:
        self.error = InvalidRequest(f"request does not parse as a {message_type}")


def parsed(request: R | Unparsable) -> R:
    """The request, or InvalidRequest when its bytes did not parse."""
    if isinstance(request, Unparsable):
        raise request.error
    return request


def add_servicer(
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    server: grpc.aio.Server,
    on_unparsable: Callable[[str], None] = lambda method: None,
) -> None:
    """Register ``servicer`` as the generated ``add_..._to_server`` does, with request parsing
    that never fails: a request that does not parse reaches the handler as an Unparsable, and
    ``on_unparsable`` is told the method's name."""
    recorder = _Registrations()
    add_to_server(servicer, recorder)
    for service, handlers in recorder.services:
        total = {
            name: handler._replace(
                request_deserializer=_total(
                    handler.request_deserializer, functools.partial(on_unparsable, name)
                )
            )
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, total),))
        server.add_registered_method_handlers(service, total)  # type: ignore[attr-defined]


class _Registrations:
    """Stands in for the server while generated code registers its handlers."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, Any]]] = []

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.services.append((service, handlers))


def _total(
    deserialize: Callable[[bytes], Any], on_unparsable: Callable[[], None]
) -> Callable[[bytes], Any]:
    message_type = getattr(deserialize, "__qualname__", "request").split(".")[0]

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            on_unparsable()
            return Unparsable(message_type)

    return parse


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
