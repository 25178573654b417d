"""The token keeper's schedule, with a fake session and a fake sleep: no real time passes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TypeVar

import pytest

from broker.errors import SourceUnavailable
from broker.sources.token_keeper import (
    MIN_REFRESH_INTERVAL,
    RETRY_BACKOFF,
    RETRY_MAX,
    keep_token_fresh,
)
from secretbroker.client import Backoff

T = TypeVar("T")


class Stop(Exception):
    pass


class FakeSession:
    def __init__(self, delays: list[float | None], failures: int = 0) -> None:
        self.delays = delays
        self.failures = failures
        self.refreshes = 0

    def seconds_until_renewal(self) -> float | None:
        return self.delays[min(self.refreshes, len(self.delays) - 1)]

    def renew_or_login(self) -> None:
        self.refreshes += 1
        if self.refreshes <= self.failures:
            raise SourceUnavailable("vault down")


async def run_inline(call: Callable[[], T]) -> T:
    """The Vault I/O pool, in a test: run the call right here."""
    return call()


def run(session: FakeSession, max_sleeps: int = 8, backoff: Backoff = RETRY_BACKOFF) -> list[float]:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= max_sleeps:
            raise Stop

    with pytest.raises(Stop):
        asyncio.run(keep_token_fresh(session, run_inline, sleep, backoff))
    return sleeps


def test_logs_in_at_once_then_renews_on_the_sessions_schedule() -> None:
    sleeps = run(FakeSession([0.0, 20.0, 20.0]), max_sleeps=4)
    assert sleeps == [0.0, 20.0, 20.0, 20.0]


def test_a_token_that_cannot_be_extended_is_not_refreshed_in_a_tight_loop() -> None:
    sleeps = run(FakeSession([0.0]))
    assert sleeps[0] == 0.0
    assert all(pause >= MIN_REFRESH_INTERVAL for pause in sleeps[1:])


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    session = FakeSession([0.0], failures=100)
    longest = dataclasses.replace(RETRY_BACKOFF, draw=lambda low, high: high)  # each wait's cap
    sleeps = run(session, max_sleeps=16, backoff=longest)
    backoffs = sleeps[1::2]  # refresh pause, then failure backoff, alternately
    assert backoffs[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(backoffs) == RETRY_MAX


def test_failure_backoff_is_jittered_below_its_cap() -> None:
    sleeps = run(FakeSession([0.0], failures=100), max_sleeps=40)
    backoffs = sleeps[1::2]
    assert all(0 <= pause <= RETRY_BACKOFF.cap(n) for n, pause in enumerate(backoffs))
    assert len(set(backoffs)) == len(backoffs), "drawn, not fixed: replicas do not retry in step"


def test_a_token_that_never_expires_needs_no_keeper() -> None:
    async def no_sleep(seconds: float) -> None:
        raise AssertionError("should not sleep")

    asyncio.run(keep_token_fresh(FakeSession([None]), run_inline, no_sleep))
