"""The retry policy: only idempotent methods, only retryable codes, bounded attempts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

from secretbroker.client import Backoff, RetryInterceptor, RetryPolicy
from secretbroker.client._channel import SERVICE_CONFIG

METHOD = "/secretbroker.v1.SecretBroker/GetSecret"


@dataclass
class Outcome:
    status: grpc.StatusCode

    def code(self) -> grpc.StatusCode:
        return self.status


@dataclass
class Details:
    method: str
    timeout: float | None = 1.0
    metadata: Any = None
    credentials: Any = None
    wait_for_ready: Any = None
    compression: Any = None


def run(
    codes: list[grpc.StatusCode], method: str = METHOD, attempts: int = 5
) -> tuple[Outcome, int]:
    calls: list[float | None] = []

    def continuation(details: Any, request: Any) -> Outcome:
        calls.append(details.timeout)
        return Outcome(codes[min(len(calls), len(codes)) - 1])

    interceptor = RetryInterceptor(
        RetryPolicy(max_attempts=attempts), frozenset({METHOD}), sleep=lambda _: None
    )
    outcome = interceptor.intercept_unary_unary(continuation, Details(method), request=None)
    assert all(t is not None and t <= 1.0 for t in calls), "each attempt keeps its deadline"
    return outcome, len(calls)


def test_unavailable_is_retried_until_success() -> None:
    outcome, calls = run(
        [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK]
    )
    assert (outcome.code(), calls) == (grpc.StatusCode.OK, 3)


def test_non_retryable_codes_return_at_once() -> None:
    outcome, calls = run([grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK])
    assert (outcome.code(), calls) == (grpc.StatusCode.PERMISSION_DENIED, 1)


def test_attempts_are_bounded() -> None:
    outcome, calls = run([grpc.StatusCode.DEADLINE_EXCEEDED], attempts=4)
    assert (outcome.code(), calls) == (grpc.StatusCode.DEADLINE_EXCEEDED, 4)


def test_other_methods_are_not_retried() -> None:
    outcome, calls = run([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK], method="/x.Y/Write")
    assert (outcome.code(), calls) == (grpc.StatusCode.UNAVAILABLE, 1)


def test_backoff_is_jittered_and_capped() -> None:
    policy = RetryPolicy(backoff=Backoff(initial=0.1, maximum=0.5, multiplier=2))
    waits = [policy.backoff.delay(retry) for retry in range(10) for _ in range(20)]
    assert all(0 <= w <= 0.5 for w in waits)
    assert len(set(waits)) > 1


def test_a_call_never_outlasts_the_overall_deadline_however_its_attempts_fail() -> None:
    """Each attempt hangs for all the time it is given (a hung broker), and every wait is
    the longest the backoff allows: attempts and waits together stay within the deadline."""
    now = [0.0]
    given: list[float] = []

    def continuation(details: Any, request: Any) -> Outcome:
        given.append(details.timeout)
        now[0] += details.timeout
        return Outcome(grpc.StatusCode.DEADLINE_EXCEEDED)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    policy = RetryPolicy(
        max_attempts=50, backoff=Backoff(initial=0.5, maximum=2.0, draw=lambda low, high: high)
    )
    interceptor = RetryInterceptor(policy, frozenset({METHOD}), sleep=sleep, clock=lambda: now[0])
    outcome = interceptor.intercept_unary_unary(continuation, Details(METHOD, 2.0), request=None)

    assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert now[0] <= policy.overall_deadline
    assert len(given) > 1, "it did retry"


def test_the_sdk_channel_has_no_second_retry_layer() -> None:
    """Retries nested in retries multiply (3 x 5 attempts once): the RetryInterceptor is the
    only one; the channel keeps gRPC's transparent retry of calls no server saw."""
    config = json.loads(SERVICE_CONFIG)
    assert "methodConfig" not in config
    assert "retryPolicy" not in SERVICE_CONFIG
