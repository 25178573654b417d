"""Cache rules with a fake source and a fake clock: what is served fresh, stale, or not at all."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.config import CacheConfig, SecretSpec
from broker.core.cache import CachedSecret, SecretCache
from broker.errors import SecretMissingInSource, SourceDenied, SourceUnavailable
from broker.lru import BoundedLru
from broker.sources.base import SecretValue, SourceKind

SPEC = SecretSpec(name="app/db", path="app/db", category="db", ttl=10)


class FakeSource:
    def __init__(self) -> None:
        self.reads = 0
        self.failure: Exception | None = None

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        return SecretValue({"k": f"v{self.reads}"}, self.reads, SourceKind.VAULT, fetched_at=0.0)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts() -> tuple[SecretCache, FakeSource, Clock]:
    source, clock = FakeSource(), Clock()
    executor = ThreadPoolExecutor(1)
    config = CacheConfig(default_ttl=10, max_stale=100, error_backoff=5)
    return SecretCache(source, config, executor, clock), source, clock


def get(cache: SecretCache) -> tuple[int, bool]:
    """One request, then whatever reads it started in the background, ended."""

    async def request() -> CachedSecret:
        cached = await cache.get(SPEC)
        await cache.wait_settled()
        return cached

    cached = asyncio.run(request())
    return cached.value.version, cached.stale


def test_fresh_within_ttl_then_read_again(parts: tuple[SecretCache, FakeSource, Clock]) -> None:
    cache, source, clock = parts
    assert get(cache) == (1, False)
    clock.now += 7.9  # before the refresh-ahead window (the last 10-20% of the TTL)
    assert get(cache) == (1, False)
    clock.now += 2.2
    assert get(cache) == (2, False)
    assert source.reads == 2


def test_a_hit_late_in_the_ttl_refreshes_in_the_background_once(
    parts: tuple[SecretCache, FakeSource, Clock],
) -> None:
    cache, source, clock = parts

    async def scenario() -> list[tuple[int, bool]]:
        first = await cache.get(SPEC)
        clock.now += 9.0  # inside the window whatever fraction was drawn (10-20% of 10 s)
        late = [cache.fresh(SPEC) for _ in range(50)]  # answered at once, from the cache
        await cache.wait_settled()  # the refresh-ahead read started in the background
        refreshed = cache.fresh(SPEC)
        assert refreshed is not None
        return [(c.value.version, c.from_cache) for c in [first, *late, refreshed] if c]

    answers = asyncio.run(scenario())

    assert answers[0] == (1, False)
    assert set(answers[1:-1]) == {(1, True)}, "nobody waited for the refresh"
    assert answers[-1] == (2, True), "the refreshed value is served from then on"
    assert source.reads == 2, "one background read for 50 late hits"


def test_unavailable_source_serves_stale_within_max_stale_with_backoff(
    parts: tuple[SecretCache, FakeSource, Clock],
) -> None:
    cache, source, clock = parts
    get(cache)
    source.failure = SourceUnavailable("down")
    clock.now += 11
    assert get(cache) == (1, True)
    assert get(cache) == (1, True)
    assert source.reads == 2, "within error_backoff the stale value is served without a read"
    clock.now += 6
    assert get(cache) == (1, True)
    assert source.reads == 3
    clock.now += 100  # past ttl + max_stale
    with pytest.raises(SourceUnavailable):
        get(cache)


@pytest.mark.parametrize("failure", [SourceDenied("denied"), SecretMissingInSource("gone")])
def test_deliberate_refusals_are_not_papered_over_with_stale_values(
    parts: tuple[SecretCache, FakeSource, Clock], failure: Exception
) -> None:
    cache, source, clock = parts
    get(cache)
    source.failure = failure
    clock.now += 11
    with pytest.raises(type(failure)):
        get(cache)


class BlockedSource:
    """A source whose read waits until the test releases it: a refresh in flight."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        self.started.set()
        self.release.wait(timeout=10)
        return SecretValue({"k": "old"}, 1, SourceKind.VAULT, fetched_at=0.0)


@pytest.mark.parametrize("newer_knowledge", ["put", "invalidate"])
def test_a_read_in_flight_does_not_undo_a_rotation_or_an_invalidation(
    newer_knowledge: str,
) -> None:
    source = BlockedSource()
    cache = SecretCache(source, CacheConfig(), ThreadPoolExecutor(1), Clock())
    rotated = SecretValue({"k": "new"}, 2, SourceKind.VAULT, fetched_at=0.0)

    async def scenario() -> SecretValue:
        late = asyncio.ensure_future(cache.get(SPEC))
        await asyncio.to_thread(source.started.wait, 10)
        if newer_knowledge == "put":
            cache.put(SPEC, rotated)
        else:
            cache.invalidate(SPEC.name)
        source.release.set()
        return (await late).value

    assert asyncio.run(scenario()).version == 1, "its own caller still gets what it read"
    assert cache.current(SPEC.name) == (rotated if newer_knowledge == "put" else None)


def test_the_bounded_memo_keeps_the_most_recently_used() -> None:
    memo: BoundedLru[str, int] = BoundedLru(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recently used
    memo.put("c", 3)

    assert (memo.get("a"), memo.get("b"), memo.get("c"), len(memo)) == (1, None, 3, 2)


class Replayed:
    """A source that answers a fixed sequence: what lagging and current Vault nodes said. An
    answer may carry how many seconds ago it was read (default: just now)."""

    def __init__(self, *answers: tuple[int, float] | tuple[int, float, float]) -> None:
        self._answers = list(answers)

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        number, written, *age = self._answers.pop(0)
        fetched = time.time() - (age[0] if age else 0.0)
        return SecretValue({"k": f"v{number}"}, number, SourceKind.VAULT, fetched, written)


@pytest.mark.parametrize(
    ("answers", "served"),
    [
        # v5 from the active node, then v4 (written before v5) from a lagging standby: kept v5.
        (((5, 500.0), (4, 400.0)), [5, 5]),
        # The secret was deleted and written anew: its v1 is newer than the cached v5.
        (((5, 500.0), (1, 900.0)), [5, 1]),
        (((5, 500.0), (6, 600.0)), [5, 6]),
        # v5 was read 11 s ago and Vault now says v4 everywhere: a restore from a snapshot.
        (((5, 500.0, 11.0), (4, 400.0)), [5, 4]),
    ],
)
def test_a_lagging_node_never_takes_the_cached_value_back_but_a_restored_vault_does(
    answers: tuple[tuple[int, float], ...], served: list[int]
) -> None:
    clock = Clock()
    cache = SecretCache(
        Replayed(*answers), CacheConfig(default_ttl=10), ThreadPoolExecutor(1), clock
    )
    seen = [get(cache)[0]]
    clock.now += 11
    seen.append(get(cache)[0])
    assert seen == served


def test_a_read_that_finds_a_new_version_tells_the_watchers_whoever_asked() -> None:
    """A request's read (not only the version poller) can be first to meet a new version."""
    clock = Clock()
    told: list[str] = []
    answers = Replayed((5, 500.0), (5, 500.0), (4, 400.0), (6, 600.0))
    cache = SecretCache(
        answers,
        CacheConfig(default_ttl=10),
        ThreadPoolExecutor(1),
        clock,
        on_new_version=told.append,
    )
    for _ in range(4):
        get(cache)
        clock.now += 11
    assert told == [SPEC.name], "once: for version 6, not for the same 5 or the lagging 4"


class Gated:
    """A source whose reads wait for ``release`` (a slow or hung Vault), counting them; it can
    also fail at once, or answer a given version."""

    def __init__(self) -> None:
        self.reads = 0
        self.newest_reads = 0
        self.release = threading.Event()
        self.version = 1
        self.failure: Exception | None = None

    def read(
        self, spec: SecretSpec, version: int | None = None, *, newest: bool = False
    ) -> SecretValue:
        self.reads += 1
        self.newest_reads += newest
        if self.failure is not None:
            raise self.failure
        self.release.wait(timeout=10)
        number = self.version
        return SecretValue({"k": f"v{number}"}, number, SourceKind.VAULT, time.time(), 0.0)


def gated_cache(source: Gated, clock: Clock) -> SecretCache:
    config = CacheConfig(default_ttl=10, max_stale=100, error_backoff=5, revalidate_wait=0.05)
    return SecretCache(source, config, ThreadPoolExecutor(2), clock)


def test_an_expired_value_is_served_stale_while_a_slow_vault_revalidates_it() -> None:
    source, clock = Gated(), Clock()
    cache = gated_cache(source, clock)

    async def scenario() -> list[tuple[int, bool]]:
        source.release.set()
        await cache.get(SPEC)
        source.release.clear()  # Vault hangs from now on
        source.version = 2
        clock.now += 11
        first = await cache.get(SPEC)  # waits revalidate_wait at most, then stale
        rest = [await cache.get(SPEC) for _ in range(20)]  # the read is slow: no wait at all
        source.release.set()
        await cache.wait_settled()  # the slow read lands
        rest.append(await cache.get(SPEC))
        return [(c.value.version, c.stale) for c in [first, *rest]]

    answers = asyncio.run(scenario())

    assert answers[:21] == [(1, True)] * 21
    assert answers[-1] == (2, False), "the one background read lands"
    assert source.reads == 2, "one read for 21 requests"


def test_nothing_servable_and_vault_just_failed_is_unavailable_at_once_without_a_read() -> None:
    source, clock = Gated(), Clock()
    cache = gated_cache(source, clock)
    source.failure = SourceUnavailable("vault is not reachable")

    with pytest.raises(SourceUnavailable, match="not reachable"):
        asyncio.run(cache.get(SPEC))
    with pytest.raises(SourceUnavailable, match="not reachable"):
        asyncio.run(cache.get(SPEC))
    assert source.reads == 1, "within error_backoff: no second read of a failing Vault"
    clock.now += 6
    source.failure = None
    source.release.set()
    assert asyncio.run(cache.get(SPEC)).value.version == 1
    assert source.reads == 2


def test_a_caller_that_saw_a_newer_version_gets_it_from_the_active_node_once() -> None:
    source, clock = Gated(), Clock()
    source.release.set()
    cache = gated_cache(source, clock)

    async def versions(*min_versions: int) -> list[int]:
        return [(await cache.get(SPEC, min_version=m)).value.version for m in min_versions]

    assert asyncio.run(versions(1)) == [1]
    source.version = 2  # written elsewhere; another replica served it to the caller
    assert asyncio.run(versions(1, 2, 2, 1)) == [1, 2, 2, 2]
    assert (source.reads, source.newest_reads) == (2, 1)
    assert asyncio.run(versions(3)) == [2], "what the active node said holds for its TTL"
    assert source.newest_reads == 1
    source.version = 1  # a restore: the active node itself holds the older version now
    clock.now += 11
    assert asyncio.run(versions(3, 3, 3)) == [1, 1, 1], "Vault's word, once it is asked again"
    assert source.newest_reads == 2
