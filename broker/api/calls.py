"""The per-call plumbing every RPC shares, written once: ``add_servicer`` wraps each handler
so that it reads as its decision alone.

Around every handler, in this order:

1. the drain gate: a stopping broker answers new calls UNAVAILABLE (``DrainGate``);
2. metrics: counted by the status the call ends with, and timed (unary calls only);
3. the caller's identity from its certificate, and for an admin service, the admin check;
4. the request parsed (bytes that do not parse are INVALID_ARGUMENT, never UNKNOWN);
5. the handler, given the parsed request and a ``Call``;
6. a ``BrokerError`` it raises becomes one audit record of the refusal and the status code
   the one table gives it (broker/api/status.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from broker.api.status import status_for
from broker.audit.trail import AuditTrail
from broker.errors import AccessDenied, AuditUnavailable, BrokerError, InvalidRequest, ShuttingDown
from broker.names import quoted
from broker.observe.metrics import BrokerMetrics
from broker.security.identity import IdentityResolver

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Response = TypeVar("Response")
UnaryHandler = Callable[[Request, "Call"], Awaitable[Response]]
StreamHandler = Callable[[Request, "Call"], AsyncIterator[Response]]

# Failures ops must see; the rest are the caller's mistakes, logged at DEBUG.
_SERVER_SIDE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})
SHUTTING_DOWN = "the broker is shutting down: call another replica"


class Call:
    """One call as its handler sees it: the RPC, who is calling, and what the audit record of
    a refusal names (``note``)."""

    __slots__ = ("context", "fields", "identity", "method", "refusal")

    def __init__(self, method: str, context: Context, fields: dict[str, object]) -> None:
        self.method = method
        self.context = context
        self.identity: str = ""
        self.fields = fields
        self.refusal = "deny"
        """The decision a refusal is recorded as: "failed" once the action was allowed."""

    def note(self, **fields: object) -> None:
        """Fields the audit record of a refusal of this call carries (a secret's name, say)."""
        self.fields.update(fields)

    def acting(self) -> None:
        """The action was allowed and recorded: an error from here on is recorded "failed"."""
        self.refusal = "failed"


@dataclass(frozen=True)
class CallRules:
    """What differs between the two services' plumbing."""

    audit_event: str
    """The audit record's ``event``: "access" or "admin"."""
    admins: frozenset[str] | None = None
    """Only these identities may call, or anyone the certificate rule accepts (None)."""
    noted: tuple[str, ...] = ()
    """Fields every refusal record carries, null until the handler notes them."""


class DrainGate:
    """Lets a stopping broker end every call with a defined, retryable answer.

    Closed, it answers each new call UNAVAILABLE at once (every gRPC client retries that on
    another replica, health checking or not), and ``drained`` waits for the unary calls in
    flight. Only then does the server stop, so no call meets a server that cancels it
    (CANCELLED is not retryable). Open streams are ended by the change feed
    (ChangeFeed.end_all), from inside, with UNAVAILABLE."""

    def __init__(self) -> None:
        self.closed = False
        self.inflight = 0
        self._idle: asyncio.Event | None = None

    def close(self) -> None:
        self.closed = True

    async def wait_drained(self, grace: float) -> bool:
        """Wait until no unary call is in flight, at most ``grace``; whether it got there."""
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True

    def left(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()


class CallPlumbing:
    """Wraps a service's handlers (see the module docstring); one per service."""

    def __init__(
        self,
        rules: CallRules,
        identities: IdentityResolver,
        audit: AuditTrail,
        metrics: BrokerMetrics,
    ) -> None:
        self._rules = rules
        self._identities = identities
        self._audit = audit
        self._metrics = metrics

    def unary(
        self, method: str, handler: UnaryHandler[Any, Any], gate: DrainGate
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def handle(request: Any, context: Context) -> Any:
            if gate.closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            gate.inflight += 1
            try:
                with self._metrics.rpc(method, context):
                    call = self._call(method, context)
                    try:
                        return await handler(self._admitted(call, request), call)
                    except BrokerError as exc:
                        await self._refuse(call, exc)
            finally:
                gate.left()

        return handle

    def stream(
        self, method: str, handler: StreamHandler[Any, Any], gate: DrainGate
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            if gate.closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            with self._metrics.rpc(method, context, timed=False):  # a stream's life: no latency
                call = self._call(method, context)
                try:
                    async for message in handler(self._admitted(call, request), call):
                        yield message
                except BrokerError as exc:
                    await self._refuse(call, exc)

        return handle

    def _call(self, method: str, context: Context) -> Call:
        return Call(method, context, dict.fromkeys(self._rules.noted))

    def _admitted(self, call: Call, request: Request | Unparsable) -> Request:
        """The parsed request, once the caller is known (and an admin, where that is asked);
        else AccessDenied or InvalidRequest."""
        identity = self._identities.identity(call.context.auth_context())
        call.identity = identity
        admins = self._rules.admins
        if admins is not None and identity not in admins:
            raise AccessDenied("caller is not a broker admin")
        if isinstance(request, Unparsable):
            raise request.error
        return request

    async def _refuse(self, call: Call, error: BrokerError) -> NoReturn:
        """Record the refusal (a record that cannot be written changes nothing: the call is
        refused anyway), then end the call."""
        identity = call.identity or None
        with contextlib.suppress(AuditUnavailable):
            self._audit.record(
                self._rules.audit_event,
                rpc=call.method,
                identity=identity,
                decision=call.refusal,
                reason=f"{status_for(error).name}: {error}",
                **call.fields,
            )
        await abort(call.context, call.method, identity, error)


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
    """What a handler's plumbing receives instead of a request whose bytes do not parse (e.g.
    invalid UTF-8 in a string field): gRPC would otherwise end the call UNKNOWN, with a
    traceback in the log and no audit record."""

    def __init__(self, message_type: str) -> None:
        self.error = InvalidRequest(f"request does not parse as a {message_type}")


def add_servicer(
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    server: grpc.aio.Server,
    plumbing: CallPlumbing,
    gate: DrainGate,
    on_unparsable: Callable[[str], None] = lambda method: None,
) -> None:
    """Register ``servicer`` as the generated ``add_..._to_server`` does, each handler through
    ``plumbing`` and ``gate``, with request parsing that never fails: a request that does not
    parse reaches the plumbing as an Unparsable, and ``on_unparsable`` is told the method."""
    recorder = _Registrations()
    add_to_server(servicer, recorder)
    for service, handlers in recorder.services:
        wrapped = {
            name: _wrapped(
                handler._replace(
                    request_deserializer=_total(
                        handler.request_deserializer, functools.partial(on_unparsable, name)
                    )
                ),
                name,
                plumbing,
                gate,
            )
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]


def _wrapped(handler: Any, name: str, plumbing: CallPlumbing, gate: DrainGate) -> Any:
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=plumbing.unary(name, handler.unary_unary, gate))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=plumbing.stream(name, handler.unary_stream, gate))
    raise TypeError(f"{name}: only unary and server-streaming calls are served")


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
