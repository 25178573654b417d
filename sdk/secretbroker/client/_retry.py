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


class RetrySchedule:
    """One call's attempts under its policy: how long the next attempt may take, and how long to
    wait after a failed one. Pure (a clock, no sleeping): the sync interceptor and the asyncio
    client both loop over it."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._give_up_at = clock() + policy.overall_deadline
        self._retry = 0

    def attempt_timeout(self, per_attempt: float | None) -> float:
        """Seconds for the next attempt: the per-attempt deadline, at most what is left."""
        remaining = self._give_up_at - self._clock()
        return max(remaining if per_attempt is None else min(per_attempt, remaining), 0.0)

    def pause_after(self, code: grpc.StatusCode | None) -> float | None:
        """Seconds to wait before the next attempt after one that ended with ``code``; None
        when that outcome is final (success, a code not worth retrying, attempts or time
        used up)."""
        policy = self._policy
        if code not in policy.retryable_codes or self._retry + 1 >= policy.max_attempts:
            return None
        pause = policy.backoff.delay(self._retry)
        if self._clock() + pause >= self._give_up_at:
            return None
        self._retry += 1
        return pause


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
        schedule = RetrySchedule(self._policy, self._clock)
        while True:
            outcome = continuation(
                _CallDetails(
                    details.method,
                    schedule.attempt_timeout(details.timeout),
                    details.metadata,
                    details.credentials,
                    details.wait_for_ready,
                    details.compression,
                ),
                request,
            )
            pause = schedule.pause_after(outcome.code())
            if pause is None:
                return outcome
            self._sleep(pause)
