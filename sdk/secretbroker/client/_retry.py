"""Retries as a policy: which calls (idempotent methods, retryable codes) and when (Backoff).

Applied by an interceptor so no call site loops by hand. It is the SDK's one retry layer (the
channel's service config has no retryPolicy), so a call's attempts, waits included, never
take longer than ``overall_deadline``: each attempt gets at most the per-call deadline and at
most what is left. Each attempt picks the next broker replica (round_robin), so the first
retry waits little.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc

from secretbroker.client._backoff import Backoff

RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
"""CANCELLED too: gRPC core cancels a call that reached a stopping broker but was not yet
dispatched. A cancellation by this client ends the call before any retry is considered."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=0.05, maximum=2.0, multiplier=3.0)
    )
    """The waits between attempts."""
    overall_deadline: float = 10.0
    """Seconds for all attempts of one call together, waits included."""
    retryable_codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


if TYPE_CHECKING:  # the stubs make the interceptor generic; the runtime class is not subscriptable
    _UnaryUnaryInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
else:
    _UnaryUnaryInterceptor = grpc.UnaryUnaryClientInterceptor


class RetryInterceptor(_UnaryUnaryInterceptor):
    """Retries the named idempotent unary methods on retryable status codes."""

    def __init__(
        self,
        policy: RetryPolicy,
        idempotent_methods: frozenset[str],
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._methods = idempotent_methods
        self._sleep = sleep
        self._clock = clock

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method not in self._methods:
            return continuation(details, request)
        policy = self._policy
        give_up_at = self._clock() + policy.overall_deadline
        retry = 0
        while True:
            remaining = give_up_at - self._clock()
            timeout = remaining if details.timeout is None else min(details.timeout, remaining)
            outcome = continuation(
                _CallDetails(
                    details.method,
                    max(timeout, 0.0),
                    details.metadata,
                    details.credentials,
                    details.wait_for_ready,
                    details.compression,
                ),
                request,
            )
            if outcome.code() not in policy.retryable_codes or retry + 1 >= policy.max_attempts:
                return outcome
            pause = policy.backoff.delay(retry)
            if self._clock() + pause >= give_up_at:
                return outcome
            self._sleep(pause)
            retry += 1
