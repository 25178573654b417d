"""The lease keeper's decisions, with a fake engine (the real one: test_database_credentials.py):
renewals, successors, the handover before revocation, retries, and callers holding a newer
user. Leases here last a fraction of a second, so the keeper's own timers drive each case."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from broker.config import DatabaseCredentialsSpec, SecretSpec
from broker.config_reader import Sensitive
from broker.core.leases import LeaseKeeper
from broker.errors import BrokerError, SourceDenied, SourceUnavailable
from broker.sources.base import SecretValue
from broker.sources.database_engine import Lease, StaticCredentials
from devstack.harness import wait_until

T = TypeVar("T")
SPEC = SecretSpec(
    name="db",
    path="unused",
    category="database",
    ttl=60,
    keys=("username", "password"),
    database=DatabaseCredentialsSpec(role="catalog", handover=0.3),
)


class FakeSession:
    def __init__(self) -> None:
        self.generation = 1
        self.on_login: list[Callable[[], None]] = []

    def login_again(self) -> None:
        self.generation += 1
        for listener in self.on_login:
            listener()


@dataclasses.dataclass
class FakeEngine:
    """Grants what is asked until ``max_ttl`` seconds after the issue; records every call."""

    duration: float = 0.6
    max_ttl: float = 60.0
    session: FakeSession = dataclasses.field(default_factory=FakeSession)
    calls: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failing: dict[str, BrokerError] = dataclasses.field(default_factory=dict)
    _numbers: Iterator[int] = dataclasses.field(default_factory=itertools.count)
    _ends: dict[str, float] = dataclasses.field(default_factory=dict)

    def issue(self, database: DatabaseCredentialsSpec) -> Lease:
        self._fail("issue")
        number = next(self._numbers)
        lease = Lease(
            f"database/creds/{database.role}/{number}",
            f"user{number}",
            Sensitive(f"password{number}"),
            self.duration,
            time.time() + number / 1000,  # distinct versions, in issue order
            self.session.generation,
        )
        self._ends[lease.lease_id] = time.monotonic() + self.max_ttl
        self.calls.append(("issue", lease.username))
        return lease

    def renew(self, lease: Lease, increment: float) -> float:
        self._fail("renew")
        self.calls.append(("renew", lease.username))
        return min(increment, max(0.0, self._ends[lease.lease_id] - time.monotonic()))

    def revoke(self, lease: Lease) -> None:
        self._fail("revoke")
        self.calls.append(("revoke", lease.username))

    def _fail(self, operation: str) -> None:
        error = self.failing.get(operation)
        if error is not None:
            self.calls.append((f"{operation} failed", ""))
            raise error

    def done(self, operation: str) -> list[str]:
        return [user for done, user in self.calls if done == operation]


async def _blocking(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


@dataclasses.dataclass
class Kept:
    keeper: LeaseKeeper
    engine: FakeEngine
    served: list[SecretValue]
    loop: asyncio.AbstractEventLoop

    def read(self, **kwargs: Any) -> SecretValue:
        """A read as the cache makes it: from a Vault I/O thread."""
        read = functools.partial(self.keeper.read, SPEC, **kwargs)
        return asyncio.run_coroutine_threadsafe(asyncio.to_thread(read), self.loop).result(10)

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)


@pytest.fixture
def kept() -> Iterator[Kept]:
    engine = FakeEngine()
    served: list[SecretValue] = []
    keeper = LeaseKeeper(
        {"db": SPEC},
        engine,  # type: ignore[arg-type]  # the engine's three calls and its session
        _blocking,
        on_new_value=lambda _spec, value: served.append(value),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="keeper-loop", daemon=True)
    thread.start()

    async def start() -> asyncio.Task[None]:
        return asyncio.create_task(keeper.run())

    task = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield Kept(keeper, engine, served, loop)

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await loop.shutdown_default_executor()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_a_lease_is_renewed_at_two_thirds_and_keeps_its_user(kept: Kept) -> None:
    first = kept.read()
    wait_until(lambda: len(kept.engine.done("renew")) >= 2, 5, "two renewals")
    assert kept.read() is first
    assert kept.served == [], "a renewal is no change"
    assert kept.engine.done("issue") == ["user0"]


def test_a_renewal_cut_short_by_max_ttl_brings_a_successor_and_revokes_the_old_after_handover(
    kept: Kept,
) -> None:
    kept.engine.max_ttl = 0.5  # the renewal at 0.4 s gets 0.1 s
    kept.read()
    wait_until(lambda: kept.served, 5, "a successor")
    served_at = time.monotonic()
    assert kept.served[0].data["username"] == "user1"
    assert kept.read() is kept.served[0]
    wait_until(lambda: "user0" in kept.engine.done("revoke"), 5, "the old user's revocation")
    assert time.monotonic() - served_at >= 0.3 - 0.05, "revoked before the handover ended"


def test_a_lease_that_cannot_be_renewed_is_succeeded_at_once(kept: Kept) -> None:
    kept.engine.failing["renew"] = SourceDenied("vault rejected renewal of lease x as invalid")
    kept.read()
    wait_until(lambda: kept.served, 5, "a successor")
    assert kept.engine.done("issue") == ["user0", "user1"]


def test_a_failing_renewal_is_retried_and_the_lease_shows_at_risk_without_a_successor(
    kept: Kept,
) -> None:
    kept.engine.failing["renew"] = SourceUnavailable("vault did not answer renewal")
    kept.read()
    wait_until(lambda: kept.engine.calls.count(("renew failed", "")) >= 2, 5, "retries")
    assert kept.served == [], "no successor while the lease lasts"
    wait_until(lambda: kept.keeper.states()["db"].at_risk, 5, "the lease at risk")
    del kept.engine.failing["renew"]
    wait_until(lambda: kept.engine.done("renew"), 5, "a renewal once vault answers")
    wait_until(lambda: not kept.keeper.states()["db"].at_risk, 5, "the lease safe again")


def test_a_new_login_brings_a_successor_read_with_the_new_token(kept: Kept) -> None:
    kept.read()
    kept.engine.session.login_again()
    wait_until(lambda: kept.served, 5, "a successor")
    assert kept.engine.done("issue") == ["user0", "user1"]


def test_callers_holding_a_newer_user_bring_one_successor_per_interval(kept: Kept) -> None:
    first = kept.read()
    moved = [kept.read(newest=True) for _ in range(5)]
    assert moved[0].version > first.version
    assert all(value is moved[0] for value in moved), "one new user for the five callers"
    assert kept.engine.done("issue") == ["user0", "user1"]


def test_a_stopping_keeper_shortens_every_lease_it_holds_to_the_handover(kept: Kept) -> None:
    kept.read()
    kept.call(kept.keeper.rotate(SPEC))  # user0 now waits for its revocation
    kept.engine.calls.clear()
    kept.call(kept.keeper.release())
    assert set(kept.engine.done("renew")) == {"user0", "user1"}


def test_a_static_role_reports_its_next_rotation_as_its_expiry() -> None:
    """The expiry metric of a static role is when the engine rotates its password next."""
    static = dataclasses.replace(
        SPEC, database=DatabaseCredentialsSpec(role="catalog-static", static=True)
    )

    class StaticEngine(FakeEngine):
        def static_credentials(self, database: DatabaseCredentialsSpec) -> StaticCredentials:
            return StaticCredentials("catalog_static", Sensitive("pw"), time.time() - 5, 30.0)

    keeper = LeaseKeeper(
        {"db": static},
        StaticEngine(),  # type: ignore[arg-type]  # the static read and the session
        _blocking,
        on_new_value=lambda _spec, _value: None,
    )
    assert keeper.read(static).data["username"] == "catalog_static"
    assert keeper.states()["db"].expires_at == pytest.approx(time.time() + 30, abs=5)
