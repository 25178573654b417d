"""In-memory cache of secret values: per-secret TTL, refresh-ahead, coalesced misses,
stale-if-error.

Runs on the event loop. A fresh hit is a dictionary lookup with no lock and no
await. A hit in the last part of its TTL (a fraction drawn per value between
REFRESH_AHEAD_FRACTION, so replicas do not refresh in step) starts one background read
of the current value and is answered from the cache meanwhile: a secret read steadily
never makes a request wait for Vault, and costs about one Vault read per TTL.

A miss starts one source read in the Vault I/O thread pool; every request for the
same secret meanwhile awaits that same read (a background refresh in flight
included).

Stale-while-revalidate: a request whose entry has expired but is still within
``max_stale`` never waits on a failing or slow Vault. It starts (or joins) one read
and waits for it at most ``revalidate_wait``; "slow" is a read in flight longer than
that, and such a read is not waited on at all. "Failing" is a read of the secret that
failed less than ``error_backoff`` ago, or any Vault read failing last: requests then
get the stale value at once, flagged, and no new read of it starts until the backoff
ends. A request with nothing servable in hand fails
fast the same way (UNAVAILABLE at once, naming the last failure) instead of queueing
another read on a dead Vault.

Entries are keyed by name and version: ``None`` is the current version; a number
is that version of a rotating secret (immutable, so refreshed only on TTL like
the rest). ``put`` stores a value the broker itself wrote (rotation) and
``invalidate`` forgets the current value when Vault is known to hold a newer one.
Each does so for good: a source read that started before it (a TTL refresh in
flight) may still answer the callers waiting on it, but does not replace the newer
knowledge in the cache.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from broker.config import CacheConfig, SecretSpec
from broker.errors import SourceUnavailable
from broker.observe.metrics import BrokerMetrics
from broker.sources.base import SecretStore, SecretValue, behind

log = logging.getLogger(__name__)


_Key = tuple[str, int | None]

NEWEST = -1
"""The version part of the key of a read from the active node (``min_version``); it lands as
the current value."""

REFRESH_AHEAD_FRACTION = (0.1, 0.2)
"""A current value is refreshed in the background when read in this last fraction of its TTL;
the fraction is drawn per value."""


@dataclass(frozen=True)
class CachedSecret:
    value: SecretValue
    stale: bool
    from_cache: bool = True
    """False when this request's own read (or the one it joined) fetched the value."""


@dataclass
class _Entry:
    value: SecretValue
    fresh_until: float
    stale_until: float
    refresh_at: float
    """From then on, a hit starts the background refresh (once per value)."""
    retry_after: float = 0.0
    """Until then (a read just failed) no new read starts; requests get the value stale."""
    newest: bool = False
    """Read from the active node for a caller that had seen a newer version (``min_version``):
    what Vault holds, so a lower ``min_version`` asks nothing more of Vault until it expires."""


@dataclass(frozen=True)
class _Failure:
    """A read of a key with no servable value that failed: later requests fail fast until."""

    until: float
    error: SourceUnavailable


class SecretCache:
    def __init__(
        self,
        source: SecretStore,
        config: CacheConfig,
        executor: Executor,
        clock: Callable[[], float] = time.monotonic,
        metrics: BrokerMetrics | None = None,
        on_new_version: Callable[[str], None] | None = None,
    ) -> None:
        self._source = source
        self._metrics = metrics
        self._on_new_version = on_new_version
        """Told the name when a read replaces the cached current value with another version:
        watchers must hear of it, whichever read (a request, a refresh) found it first."""
        self._config = config
        self._executor = executor
        self._clock = clock
        self._entries: dict[_Key, _Entry] = {}
        self._inflight: dict[_Key, asyncio.Future[SecretValue]] = {}
        self._started: dict[_Key, float] = {}
        """When each read in flight started (the clock's time)."""
        self._failures: dict[_Key, _Failure] = {}
        self._source_failing = False
        """The last source read that ended failed: expired values are served stale at once."""
        self._replaced: dict[str, int] = {}
        """How often each name's current value was put or invalidated: a read that started
        under an older count is outdated by the time it lands."""

    def __len__(self) -> int:
        return len(self._entries)

    def current(self, name: str) -> SecretValue | None:
        """The cached current value, fresh or not; no source read."""
        entry = self._entries.get((name, None))
        return entry.value if entry is not None else None

    def put(self, spec: SecretSpec, value: SecretValue) -> None:
        self._replace(spec.name)
        self._store((spec.name, None), spec, value)

    def invalidate(self, name: str) -> None:
        """The next read of the current value goes to the source. Keeps nothing stale: Vault
        is known to hold a newer version, so the old one must not be served as current."""
        self._replace(name)
        self._entries.pop((name, None), None)

    def fresh(self, spec: SecretSpec, version: int | None = None) -> CachedSecret | None:
        """The value if it is fresh, else None: a hit without a coroutine. A hit late in the
        TTL of a current value starts its background refresh (see the module docstring)."""
        entry = self._entries.get((spec.name, version))
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.fresh_until:
            return None
        if now >= entry.refresh_at:
            entry.refresh_at = entry.fresh_until  # once per value; a failure waits for expiry
            self._start((spec.name, version), spec)
        self._count("hit")
        return CachedSecret(entry.value, stale=False)

    async def get(
        self, spec: SecretSpec, version: int | None = None, *, min_version: int = 0
    ) -> CachedSecret:
        """The value, read from the source only when the rules in the module docstring say so.
        ``min_version``: the caller has seen that version of the current value; a cache that
        holds an older one asks the active Vault node before answering."""
        if min_version and version is None:
            newer = await self._at_least(spec, min_version)
            if newer is not None:
                return newer
        hit = self.fresh(spec, version)
        if hit is not None:
            return hit
        key = (spec.name, version)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and now < entry.stale_until:
            return await self._revalidate(key, spec, entry, now)
        failure = self._failures.get(key)
        if failure is not None and now < failure.until:
            self._count("unavailable")
            raise failure.error
        self._count("miss")
        return CachedSecret(await self._refresh(key, spec), stale=False, from_cache=False)

    async def prefetch(self, spec: SecretSpec) -> SecretValue:
        """Read the current value into the cache (or join the read in flight), waiting as long
        as Vault takes: the broker's warm-up, which no request waits on."""
        return await self._refresh((spec.name, None), spec)

    async def _revalidate(
        self, key: _Key, spec: SecretSpec, entry: _Entry, now: float
    ) -> CachedSecret:
        """An expired entry within max_stale: stale-while-revalidate (module docstring)."""
        if now < entry.retry_after:
            self._count("stale")
            return CachedSecret(entry.value, stale=True)
        self._start(key, spec)
        if self._source_failing:  # the last read of any secret failed: do not wait at all
            self._count("stale")
            return CachedSecret(entry.value, stale=True)
        wait = self._started[key] + self._config.revalidate_wait - now
        if wait > 0:
            try:
                value = await asyncio.wait_for(self._refresh(key, spec), wait)
            except (TimeoutError, SourceUnavailable):
                pass  # slow or failing: the stale value below
            else:
                self._count("miss")
                return CachedSecret(value, stale=False, from_cache=False)
        held = self._entries.get(key, entry)
        self._count("stale")
        return CachedSecret(held.value, stale=True)

    async def _at_least(self, spec: SecretSpec, min_version: int) -> CachedSecret | None:
        """The current value read from the active node, when the cached one is older than
        ``min_version`` and was not itself such a read; None when the cache can answer."""
        entry = self._entries.get((spec.name, None))
        if entry is None or entry.value.version >= min_version:
            return None
        if entry.newest and self._clock() < entry.fresh_until:
            return None  # what the active node held a moment ago: Vault has nothing newer
        key = (spec.name, NEWEST)
        try:
            value = await self._refresh(key, spec)
        except SourceUnavailable:
            held = self._entries.get((spec.name, None), entry)
            self._count("stale")
            return CachedSecret(held.value, stale=True)
        self._count("miss")
        return CachedSecret(value, stale=False, from_cache=False)

    async def wait_settled(self) -> None:
        """Until every read in flight has ended (background refreshes included)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def answerable(self, name: str) -> bool:
        """Whether the current value of ``name`` could be served now, fresh or stale."""
        entry = self._entries.get((name, None))
        return entry is not None and self._clock() < entry.stale_until

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_lookup(result)

    def _refresh(self, key: _Key, spec: SecretSpec) -> asyncio.Future[SecretValue]:
        """The one in-flight read of ``key``, started if there is none.

        Shielded: a caller that gives up (deadline, cancellation) does not cancel
        the read the others are waiting for.
        """
        return asyncio.shield(self._start(key, spec))

    def _start(self, key: _Key, spec: SecretSpec) -> asyncio.Future[SecretValue]:
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._load(key, spec))
            self._inflight[key] = future
            self._started[key] = self._clock()
            future.add_done_callback(lambda done: self._settle(key, done))
        return future

    def _settle(self, key: _Key, done: asyncio.Future[SecretValue]) -> None:
        self._inflight.pop(key, None)
        self._started.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here so a read nobody awaits any more is not reported

    async def _load(self, key: _Key, spec: SecretSpec) -> SecretValue:
        newest = key[1] == NEWEST
        key = (spec.name, None) if newest else key
        replaced = self._replaced.get(spec.name, 0)
        loop = asyncio.get_running_loop()
        read = functools.partial(self._source.read, spec, key[1], newest=newest)
        try:
            value = await loop.run_in_executor(self._executor, read)
        except SourceUnavailable as exc:
            self._source_failing = True
            self._failed(key, spec, exc)
            raise
        self._source_failing = False
        self._failures.pop(key, None)
        if key[1] is not None or self._replaced.get(spec.name, 0) == replaced:
            held = self.current(spec.name) if key[1] is None and not newest else None
            if held is not None and behind(value.version, value.created_at, held):
                log.debug(
                    "%r: a vault node answered version %d, older than the cached %d; kept %d",
                    spec.name,
                    value.version,
                    held.version,
                    held.version,
                )
                value = held
            self._store(key, spec, value, newest=newest)
        return value

    def _failed(self, key: _Key, spec: SecretSpec, error: SourceUnavailable) -> None:
        """Requests do not wait on Vault again for error_backoff (module docstring)."""
        until = self._clock() + self._config.error_backoff
        entry = self._entries.get(key)
        if entry is not None and self._clock() < entry.stale_until:
            entry.retry_after = until
            log.warning("serving %r stale: %s", spec.name, error)
        else:
            self._failures[key] = _Failure(until, error)
            log.warning("no value to serve for %r: %s", spec.name, error)

    def _replace(self, name: str) -> None:
        self._replaced[name] = self._replaced.get(name, 0) + 1

    def _store(
        self, key: _Key, spec: SecretSpec, value: SecretValue, *, newest: bool = False
    ) -> None:
        if key[1] is None:
            if self._metrics is not None:
                self._metrics.secret_read(spec.name, value.version, value.fetched_at)
            held = self._entries.get(key)
            if (
                held is not None
                and self._on_new_version is not None
                and (held.value.version, held.value.source) != (value.version, value.source)
            ):
                self._on_new_version(spec.name)
        now = self._clock()
        fresh_until = now + spec.ttl
        # Versions other than the current one never change: nothing to refresh ahead.
        ahead = random.uniform(*REFRESH_AHEAD_FRACTION) if key[1] is None else 0.0  # noqa: S311
        self._entries[key] = _Entry(
            value,
            fresh_until=fresh_until,
            stale_until=fresh_until + self._config.max_stale,
            refresh_at=fresh_until - spec.ttl * ahead,
            newest=newest,
        )
