"""The one bounded memo: the ``capacity`` most recently used entries, the oldest dropped first.

The broker memoises per request what does not change (a certificate's identity, a grant, an
audit record's encoded names, a built response). Caller input can make keys at will (a new
certificate per connection, say), so every memo is bounded. A hit moves the entry to the
young end (a pop and an insert in a plain dict, tens of nanoseconds). Not thread-safe: each
memo is used from the event loop only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedLru(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._data: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        try:
            value = self._data.pop(key)
        except KeyError:
            return None
        self._data[key] = value
        return value

    def put(self, key: K, value: V) -> V:
        self._data.pop(key, None)
        self._data[key] = value
        if len(self._data) > self._capacity:
            del self._data[next(iter(self._data))]
        return value

    def values(self) -> Iterator[V]:
        """The values, oldest first (a snapshot: safe to use while the memo changes)."""
        return iter(list(self._data.values()))

    def __len__(self) -> int:
        return len(self._data)
