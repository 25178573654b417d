"""Database credentials as served secrets: each database secret holds one lease at a time.

One lease's life, per broker replica:

1. **Issue** on the first read (the warm-up): a PostgreSQL user for this replica, shared by
   every caller it serves.
2. **Renew** at 2/3 of the granted duration, asking for that duration again.
3. **Succeed** when a renewal grants less than asked (the role's max TTL is near; renewals
   come 2/3 of a duration apart, so at least a third of one is left: a role's ``default_ttl``
   of at least 3 x ``handover`` leaves the whole handover before the old lease ends), when
   the broker logged in to Vault again (the lease dies with the token that read it), or when
   the lease is gone: a new lease is issued, served, and pushed to every watcher at once.
4. **Revoke** the old lease ``handover`` seconds after its successor was first served, never
   sooner: clients move their connections meanwhile (a pool drain waits for the queries on
   them), and the role's revocation statements end whatever session is left.

A broker that stops shortens each lease it holds to ``handover`` from now (a renewal asking
for that): its clients resume on other replicas, which serve their own users, and Vault
revokes the old ones itself after the handover, with no replica left to do it. A replica that
dies stops renewing: its users end with their lease or its token, whichever is first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from broker.audit.trail import AuditTrail
from broker.config import DatabaseCredentialsSpec, SecretSpec
from broker.config_reader import Sensitive
from broker.errors import AuditUnavailable, BrokerError, NotApplicable, SourceDenied
from broker.observe.metrics import BrokerMetrics, LeaseState
from broker.sources.base import RunBlocking, SecretValue, SourceKind
from broker.sources.database_engine import DatabaseEngine, Lease, StaticCredentials
from secretbroker.client import Backoff

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3
"""Fraction of a granted duration after which the lease is renewed."""
RETRY_BACKOFF = Backoff(initial=1.0, maximum=30.0)
STATIC_RECHECK_MAX = 300.0
"""Seconds between two reads of a static role at most (its rotation can also be forced)."""
MOVE_INTERVAL = 5.0
"""Seconds between two new users issued because callers hold a newer version."""
"""Waits after failed renewals, issues and revocations (full jitter)."""


def credentials_value(
    spec: SecretSpec, username: str, password: Sensitive, issued_at: float, ends_at: float
) -> SecretValue:
    """The secret as served: the declared keys of username, password, url, expires_at. The
    version is the issue (or a static role's rotation) time in milliseconds, so a later user
    or password is a higher version on every replica."""
    database = _database(spec)
    revealed = password.reveal()
    data = {"username": username, "password": revealed, "expires_at": str(int(ends_at))}
    if database.url is not None:
        data["url"] = database.url.replace("{username}", quote(username, safe="")).replace(
            "{password}", quote(revealed, safe="")
        )
    return SecretValue(
        data={key: data[key] for key in spec.keys},
        version=int(issued_at * 1000),
        source=SourceKind.VAULT,
        fetched_at=time.time(),
        created_at=issued_at,
    )


@dataclass
class _Held:
    lease: Lease
    value: SecretValue
    renew_at: float
    """Monotonic time of the next renewal (or retry)."""
    ends_at: float
    """Monotonic time the lease ends as last granted."""
    ends_wall: float
    """The same, as Unix time (for the metrics)."""
    final: bool = False
    """Vault granted less than asked: the role's max TTL is near, a successor is due."""
    failures: int = 0


@dataclass
class _Static:
    """A static role's credentials as last read, and when to read them again."""

    credentials: StaticCredentials
    value: SecretValue
    check_at: float
    rotates_at: float
    """When the engine's next rotation is due, as it said at the read (Unix time)."""
    failures: int = 0


@dataclass
class _Retiring:
    name: str
    lease: Lease
    revoke_at: float
    ends_at: float
    failures: int = 0


class LeaseKeeper:
    """Holds the database secrets' leases (see the module docstring). ``read`` is the cache's
    source for them (blocking, from the Vault I/O threads); ``run`` tends the leases."""

    def __init__(
        self,
        secrets: Mapping[str, SecretSpec],
        engine: DatabaseEngine,
        run_blocking: RunBlocking,
        on_new_value: Callable[[SecretSpec, SecretValue], None],
        *,
        metrics: BrokerMetrics | None = None,
        audit: AuditTrail | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.specs = {name: spec for name, spec in secrets.items() if spec.database is not None}
        self._engine = engine
        self._run_blocking = run_blocking
        self._on_new_value = on_new_value
        self._metrics = metrics
        self._audit = audit
        self._clock = clock
        self._first_issue = threading.Lock()
        """Concurrent first reads (Vault I/O threads) issue one lease. Nothing on the event loop
        takes it: the loop alone changes ``_held`` after that, and ``_retiring`` at all."""
        self._held: dict[str, _Held] = {}
        self._static: dict[str, _Static] = {}
        self._retiring: list[_Retiring] = []
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._moved_at: dict[str, float] = {}
        """When a caller's newer version last made this replica issue a new user."""

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        """The credentials served now, issuing the first lease on the first read. ``newest``: a
        caller holds a newer version than the one served here (a user another replica issued
        later): a successor is issued, so clients moving here never go back a version."""
        if version is not None:
            raise NotApplicable("database credentials keep no versions: read the current one")
        if _database(spec).static:
            return self._read_static(spec, again=newest)
        held = self._held.get(spec.name)
        if held is not None and newest and self._loop is not None and self._may_move(spec):
            log.info("%s: a caller holds a newer user than %s", spec.name, held.lease.username)
            moved = asyncio.run_coroutine_threadsafe(self.rotate(spec), self._loop)
            return moved.result()
        if held is not None:
            return held.value
        with self._first_issue:
            held = self._held.get(spec.name)
            if held is None:
                held = self._held[spec.name] = self._hold(spec, self._issue(spec))
                log.info(
                    "%s: issued database user %s (%r)", spec.name, held.lease.username, held.lease
                )
                self._wake_soon()
            return held.value

    def _read_static(self, spec: SecretSpec, *, again: bool) -> SecretValue:
        """A static role's credentials: held, or read now (first read, or ``again``)."""
        kept = self._static.get(spec.name)
        if kept is not None and not again:
            return kept.value
        with self._first_issue:
            kept = self._static.get(spec.name)
            if kept is None or again:
                kept = self._hold_static(spec, kept)
            return kept.value

    def _hold_static(self, spec: SecretSpec, kept: _Static | None) -> _Static:
        """Read the static role (blocking): ``kept`` again when its password is unchanged,
        else a new entry with the new value."""
        credentials = self._engine.static_credentials(_database(spec))
        wait = credentials.next_rotation_in + 1.0 if credentials.next_rotation_in > 0 else 1.0
        check_at = self._clock() + min(wait, STATIC_RECHECK_MAX)
        rotates_at = time.time() + credentials.next_rotation_in
        if kept is not None and kept.credentials.rotated_at == credentials.rotated_at:
            kept.check_at, kept.rotates_at, kept.failures = check_at, rotates_at, 0
            return kept
        value = credentials_value(
            spec, credentials.username, credentials.password, credentials.rotated_at, rotates_at
        )
        fresh = self._static[spec.name] = _Static(credentials, value, check_at, rotates_at)
        log.info(
            "%s: static role user %s, password of %s",
            spec.name,
            credentials.username,
            time.strftime("%H:%M:%S", time.gmtime(credentials.rotated_at)),
        )
        self._wake_soon()
        return fresh

    def _may_move(self, spec: SecretSpec) -> bool:
        """At most one new user per MOVE_INTERVAL for callers holding a newer one: with clocks
        apart, the new user's version (this replica's clock) can still be below theirs."""
        now = self._clock()
        if now - self._moved_at.get(spec.name, -MOVE_INTERVAL) < MOVE_INTERVAL:
            return False
        self._moved_at[spec.name] = now
        return True

    async def rotate(self, spec: SecretSpec) -> SecretValue:
        """A successor now (an operator's RotateSecret): served and pushed at once, the old
        user revoked after the handover. Raises when Vault cannot issue one."""
        if _database(spec).static:
            raise NotApplicable("the engine rotates a static role's password on its own period")
        held = self._held.get(spec.name)
        if held is None:
            return await self._run_blocking(functools.partial(self.read, spec))
        return await self._succeed(spec, held, "an operator asked for it")

    def states(self) -> dict[str, LeaseState]:
        """For the metrics, from the scraping thread."""
        now = self._clock()
        retiring = [r.name for r in list(self._retiring)]
        return {
            name: LeaseState(
                held=1 + retiring.count(name),
                expires_at=held.ends_wall,
                at_risk=held.final or (held.ends_at - now) < held.lease.duration / 4,
            )
            for name, held in list(self._held.items())
        } | {
            name: LeaseState(held=1, expires_at=kept.rotates_at, at_risk=False)
            for name, kept in list(self._static.items())
        }

    async def run(self) -> None:
        """Renew, succeed and revoke when due; until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._engine.session.on_login.append(self._wake_soon)
        while True:
            self._wake.clear()
            for name in list(self._held):
                await self._tend(self.specs[name])
            for name in list(self._static):
                await self._tend_static(self.specs[name])
            await self._revoke_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), max(0.0, self._next_due() - self._clock())
                )

    async def release(self) -> None:
        """A stopping broker: shorten every lease to its secret's handover (module docstring)."""
        now = self._clock()
        leases = [
            (self.specs[name], held.lease, _database(self.specs[name]).handover)
            for name, held in self._held.items()
        ]
        leases += [
            (self.specs[r.name], r.lease, max(1.0, r.revoke_at - now)) for r in self._retiring
        ]
        for spec, lease, seconds in leases:
            try:
                await self._run_blocking(functools.partial(self._engine.renew, lease, seconds))
            except BrokerError as exc:
                self._event(spec.name, "shorten", lease, exc)
                log.warning(
                    "%s: %r not shortened (%s); it ends with its lease", spec.name, lease, exc
                )
                continue
            self._event(spec.name, "shorten", lease)
            log.info("%s: %r ends in %.0fs, revoked by vault", spec.name, lease, seconds)

    def _wake_soon(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _next_due(self) -> float:
        moments = [held.renew_at for held in self._held.values()]
        moments += [kept.check_at for kept in self._static.values()]
        moments += [retiring.revoke_at for retiring in self._retiring]
        return min(moments, default=self._clock() + 3600.0)

    def _issue(self, spec: SecretSpec) -> Lease:
        """Blocking: a new lease, counted and audited."""
        try:
            lease = self._engine.issue(_database(spec))
        except BrokerError as exc:
            self._event(spec.name, "issue", None, exc)
            raise
        self._event(spec.name, "issue", lease)
        return lease

    def _hold(self, spec: SecretSpec, lease: Lease) -> _Held:
        handover = _database(spec).handover
        if lease.duration < 3 * handover:
            log.warning(
                "%s: leases of %.0fs may end within the handover of %.0fs after their successor"
                " is served; give the role a default_ttl of at least %.0fs",
                spec.name,
                lease.duration,
                handover,
                3 * handover,
            )
        now = self._clock()
        ends_wall = lease.issued_at + lease.duration
        return _Held(
            lease,
            credentials_value(spec, lease.username, lease.password, lease.issued_at, ends_wall),
            renew_at=now + lease.duration * RENEW_AT,
            ends_at=now + lease.duration,
            ends_wall=ends_wall,
        )

    async def _tend(self, spec: SecretSpec) -> None:
        held = self._held[spec.name]
        if held.lease.token_generation != self._engine.session.generation:
            await self._try_succeed(spec, held, "the broker logged in to vault again")
            return
        now = self._clock()
        if now < held.renew_at:
            return
        if held.final:  # a successor failed before: try again
            await self._try_succeed(spec, held, "its max TTL is near")
            return
        asked = held.lease.duration
        try:
            granted = await self._run_blocking(
                functools.partial(self._engine.renew, held.lease, asked)
            )
        except SourceDenied as exc:  # expired or revoked: renewing cannot help
            self._event(spec.name, "renew", held.lease, exc)
            held.final = True
            await self._try_succeed(spec, held, f"its lease cannot be renewed ({exc})")
            return
        except BrokerError as exc:
            self._event(spec.name, "renew", held.lease, exc)
            pause = min(RETRY_BACKOFF.delay(held.failures), max(1.0, (held.ends_at - now) / 3))
            held.failures += 1
            held.renew_at = now + pause
            log.warning(
                "%s: renewal of %r failed, again in %.0fs: %s", spec.name, held.lease, pause, exc
            )
            return
        self._event(spec.name, "renew", held.lease)
        held.failures = 0
        held.ends_at = self._clock() + granted
        held.ends_wall = time.time() + granted
        if granted < asked:
            held.final = True
            await self._try_succeed(spec, held, f"its max TTL is near ({granted:.0f}s left)")
            return
        held.renew_at = self._clock() + granted * RENEW_AT
        log.debug("%s: renewed %r for %.0fs", spec.name, held.lease, granted)

    async def _tend_static(self, spec: SecretSpec) -> None:
        kept = self._static[spec.name]
        if self._clock() < kept.check_at:
            return
        read = functools.partial(self._read_static, spec, again=True)
        try:
            value = await self._run_blocking(read)
        except BrokerError as exc:
            pause = RETRY_BACKOFF.delay(kept.failures)
            kept.failures += 1
            kept.check_at = self._clock() + pause
            log.warning("%s: static role read failed, again in %.0fs: %s", spec.name, pause, exc)
            return
        if value is not kept.value:
            self._on_new_value(spec, value)

    async def _try_succeed(self, spec: SecretSpec, old: _Held, why: str) -> None:
        """A successor, or a retry with backoff while the old lease lasts."""
        try:
            await self._succeed(spec, old, why)
        except BrokerError as exc:
            pause = RETRY_BACKOFF.delay(old.failures)
            old.failures += 1
            old.renew_at = self._clock() + pause
            log.warning(
                "%s: no successor for %r yet (%s), again in %.0fs", spec.name, old.lease, exc, pause
            )

    async def _succeed(self, spec: SecretSpec, old: _Held, why: str) -> SecretValue:
        database = _database(spec)
        lease = await self._run_blocking(functools.partial(self._issue, spec))
        new = self._hold(spec, lease)
        self._held[spec.name] = new
        self._retiring.append(
            _Retiring(
                spec.name,
                old.lease,
                revoke_at=self._clock() + database.handover,
                ends_at=old.ends_at,
            )
        )
        log.info(
            "%s: database user %s (%r) succeeds %s because %s; the old is revoked in %.0fs",
            spec.name,
            lease.username,
            lease,
            old.lease.username,
            why,
            database.handover,
        )
        self._on_new_value(spec, new.value)
        self._wake_soon()
        return new.value

    async def _revoke_due(self) -> None:
        now = self._clock()
        for retiring in [r for r in self._retiring if r.revoke_at <= now]:
            try:
                await self._run_blocking(functools.partial(self._engine.revoke, retiring.lease))
            except BrokerError as exc:
                self._event(retiring.name, "revoke", retiring.lease, exc)
                if self._clock() >= retiring.ends_at:
                    self._forget(retiring)
                    log.warning(
                        "%s: %r not revoked (%s); it has ended", retiring.name, retiring.lease, exc
                    )
                    continue
                pause = RETRY_BACKOFF.delay(retiring.failures)
                retiring.failures += 1
                retiring.revoke_at = self._clock() + pause
                log.warning(
                    "%s: revocation of %r failed, again in %.0fs: %s",
                    retiring.name,
                    retiring.lease,
                    pause,
                    exc,
                )
                continue
            self._event(retiring.name, "revoke", retiring.lease)
            self._forget(retiring)
            log.info(
                "%s: revoked %r (database user %s)",
                retiring.name,
                retiring.lease,
                retiring.lease.username,
            )

    def _forget(self, retiring: _Retiring) -> None:
        self._retiring.remove(retiring)

    def _event(
        self, name: str, operation: str, lease: Lease | None, error: BrokerError | None = None
    ) -> None:
        """Count it, and audit it with the lease id and the user, never the password."""
        result = "ok" if error is None else "failed"
        if self._metrics is not None:
            self._metrics.lease_operation(name, operation, result)
        if self._audit is None:
            return
        fields: dict[str, object] = {"operation": operation, "secret": name, "result": result}
        if lease is not None:
            fields.update(lease_id=lease.lease_id, user=lease.username)
        if error is not None:
            fields["error"] = str(error)
        try:
            self._audit.record("database_lease", **fields)
        except AuditUnavailable as exc:
            log.warning("%s: the %s of a lease was not audited: %s", name, operation, exc)


def _database(spec: SecretSpec) -> DatabaseCredentialsSpec:
    database = spec.database
    if database is None:
        raise ValueError(f"{spec.name} is not a database secret")
    return database
