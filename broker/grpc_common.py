"""What both gRPC services share: the end of a failed call, request parsing that cannot fail,
the drain gate, and timestamps."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from broker.errors import BrokerError, InvalidRequest, ShuttingDown
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
    # A replica that stops (and says so) is routing, not a failure: at most DEBUG per call.
    server_side = code in _SERVER_SIDE and not isinstance(error, ShuttingDown)
    level = logging.WARNING if server_side else logging.DEBUG
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


SHUTTING_DOWN = "the broker is shutting down: call another replica"


class DrainGate:
    """Lets a stopping broker end every call with a defined, retryable answer.

    Closed, it answers each new call UNAVAILABLE at once (every gRPC client retries that on
    another replica, health checking or not), and ``drained`` waits for the unary calls in
    flight. Only then does the
    server stop, so no call meets a server that cancels it (CANCELLED is not retryable)."""

    def __init__(self) -> None:
        self.closed = False
        self._inflight = 0
        self._idle: asyncio.Event | None = None

    def close(self) -> None:
        self.closed = True

    async def drained(self, grace: float) -> bool:
        """Wait until no unary call is in flight, at most ``grace``; whether it got there."""
        if self._inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True

    def unary(self, behavior: Callable[[Any, Context], Awaitable[Any]]) -> Callable[..., Any]:
        async def gated(request: Any, context: Context) -> Any:
            if self.closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            self._inflight += 1
            try:
                return await behavior(request, context)
            finally:
                self._inflight -= 1
                if self._inflight == 0 and self._idle is not None:
                    self._idle.set()

        return gated

    def stream(self, behavior: Callable[[Any, Context], AsyncIterator[Any]]) -> Callable[..., Any]:
        """Refuses new streams once closed; open ones are ended by the change feed
        (ChangeFeed.end_all), from inside, with UNAVAILABLE."""

        async def gated(request: Any, context: Context) -> AsyncIterator[Any]:
            if self.closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            async for message in behavior(request, context):
                yield message

        return gated


def add_servicer(
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    server: grpc.aio.Server,
    on_unparsable: Callable[[str], None] = lambda method: None,
    gate: DrainGate | None = None,
) -> None:
    """Register ``servicer`` as the generated ``add_..._to_server`` does, with request parsing
    that never fails: a request that does not parse reaches the handler as an Unparsable, and
    ``on_unparsable`` is told the method's name. With ``gate``, every call passes it."""
    recorder = _Registrations()
    add_to_server(servicer, recorder)
    for service, handlers in recorder.services:
        total = {
            name: _gated(
                handler._replace(
                    request_deserializer=_total(
                        handler.request_deserializer, functools.partial(on_unparsable, name)
                    )
                ),
                gate,
            )
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, total),))
        server.add_registered_method_handlers(service, total)  # type: ignore[attr-defined]


def _gated(handler: Any, gate: DrainGate | None) -> Any:
    if gate is None:
        return handler
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=gate.unary(handler.unary_unary))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=gate.stream(handler.unary_stream))
    return handler


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
