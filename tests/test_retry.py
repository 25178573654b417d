"""The retry policy: only idempotent methods, only retryable codes, bounded attempts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from secretbroker.client import Backoff, RetryInterceptor, RetryPolicy

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
