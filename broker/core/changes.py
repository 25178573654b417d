"""Fan-out of "this secret may have changed" to WatchSecrets streams.

A publish marks the name dirty in every subscription that follows it and wakes
it: no queue grows, bursts coalesce, and 1,000 subscribers cost 1,000 set
insertions. Each stream then reads the value (a cache hit) and sends it only if it
differs from what it sent last. Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from broker.errors import ShuttingDown


class Subscription:
    """One stream's interest: a set of names, and what changed since it last looked. Slotted,
    and a waiting stream holds one future, not an Event and its queue of waiters: a broker
    holds one per open watch stream, tens of thousands of them."""

    __slots__ = ("_dirty", "_ended", "_feed", "_waiter", "names")

    def __init__(self, feed: ChangeFeed, names: frozenset[str]) -> None:
        self.names = names
        self._feed = feed
        self._dirty: set[str] = set()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False

    def _mark(self, name: str) -> None:
        self._dirty.add(name)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def changed(self) -> set[str]:
        """Wait for, then take, the names marked since the last call. Raises ShuttingDown once
        the feed has ended every subscription (the broker stops taking calls)."""
        if not self._dirty and not self._ended:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._ended:
            raise ShuttingDown("the broker is shutting down: resume the watch on another replica")
        dirty, self._dirty = self._dirty, set()
        return dirty

    def close(self) -> None:
        self._feed._unsubscribe(self)


class ChangeFeed:
    def __init__(self) -> None:
        self._by_name: dict[str, set[Subscription]] = {}
        self._open: set[Subscription] = set()

    def subscribe(self, names: Iterable[str]) -> Subscription:
        subscription = Subscription(self, frozenset(names))
        for name in subscription.names:
            self._by_name.setdefault(name, set()).add(subscription)
        self._open.add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._open.discard(subscription)
        for name in subscription.names:
            followers = self._by_name.get(name)
            if followers is not None:
                followers.discard(subscription)
                if not followers:
                    del self._by_name[name]

    def publish(self, names: Iterable[str]) -> None:
        for name in names:
            for subscription in self._by_name.get(name, ()):
                subscription._mark(name)

    def end_all(self) -> None:
        """End every open subscription: each stream's next wait raises ShuttingDown, so it
        ends UNAVAILABLE (clients resume it elsewhere), not cancelled with the server."""
        for subscription in self._open:
            subscription._ended = True
            subscription._wake()

    def watched(self) -> frozenset[str]:
        """Names with at least one subscriber."""
        return frozenset(self._by_name)

    def __len__(self) -> int:
        """Open subscriptions. Safe from any thread (the metrics scrape reads it): one len()
        of a set, where counting over the per-name sets could meet one that changes."""
        return len(self._open)
