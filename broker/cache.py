"""In-memory cache of secret values: per-secret TTL, coalesced misses, stale-if-error.

Runs on the event loop. A fresh hit is a dictionary lookup with no lock and no
await. A miss or an expired entry starts one source read in the Vault I/O thread
pool; every request for the same secret meanwhile awaits that same read. When the
source is unavailable, the last good value is served flagged stale until
``max_stale`` past its TTL; after a failed refresh, further requests get the stale
value at once for ``error_backoff`` seconds instead of each waiting on a dead Vault.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from broker.config import CacheConfig, SecretSpec
from broker.errors import SourceUnavailable
from broker.sources.base import SecretSource, SecretValue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedSecret:
    value: SecretValue
    stale: bool


@dataclass
class _Entry:
    value: SecretValue
    fresh_until: float
    stale_until: float
    retry_after: float = 0.0


class SecretCache:
    def __init__(
        self,
        source: SecretSource,
        config: CacheConfig,
        executor: Executor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._config = config
        self._executor = executor
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[SecretValue]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, spec: SecretSpec) -> CachedSecret:
        entry = self._entries.get(spec.name)
        now = self._clock()
        if entry is not None:
            if now < entry.fresh_until:
                return CachedSecret(entry.value, stale=False)
            if now < entry.retry_after and now < entry.stale_until:
                return CachedSecret(entry.value, stale=True)
        try:
            return CachedSecret(await self._refresh(spec), stale=False)
        except SourceUnavailable as exc:
            entry = self._entries.get(spec.name)
            now = self._clock()
            if entry is None or now >= entry.stale_until:
                raise
            entry.retry_after = now + self._config.error_backoff
            log.warning("serving %r stale: %s", spec.name, exc)
            return CachedSecret(entry.value, stale=True)

    def _refresh(self, spec: SecretSpec) -> asyncio.Future[SecretValue]:
        """The one in-flight read of ``spec``, started if there is none.

        Shielded: a caller that gives up (deadline, cancellation) does not cancel
        the read the others are waiting for.
        """
        future = self._inflight.get(spec.name)
        if future is None:
            future = asyncio.ensure_future(self._load(spec))
            self._inflight[spec.name] = future
            future.add_done_callback(lambda done: self._settle(spec.name, done))
        return asyncio.shield(future)

    def _settle(self, name: str, done: asyncio.Future[SecretValue]) -> None:
        self._inflight.pop(name, None)
        if not done.cancelled():
            done.exception()  # retrieved here so a read nobody awaits any more is not reported

    async def _load(self, spec: SecretSpec) -> SecretValue:
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(self._executor, self._source.read, spec)
        now = self._clock()
        self._entries[spec.name] = _Entry(
            value, fresh_until=now + spec.ttl, stale_until=now + spec.ttl + self._config.max_stale
        )
        return value
