"""Where a declared secret's value comes from right now: Vault through the cache, or the
broker's environment when its category is rolled back. Also the version window.

Env-served secrets never touch Vault, and a flip takes effect for reads already waiting
on Vault too: such a read is answered from env the moment its category moves there,
not when Vault gives up (the Vault read itself goes on, for the cache)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from broker.config import SecretSpec
from broker.core.cache import CachedSecret, SecretCache
from broker.core.rollback import RollbackState
from broker.errors import InvalidRequest, NotApplicable, VersionOutOfRange
from broker.observe.metrics import BrokerMetrics
from broker.sources.base import SecretValue, SourceKind
from broker.sources.env import EnvSource

CLOCK_SKEW_MS = 60_000
"""A database secret's versions are issue times (ms): a ``min_version`` further in the future
than this is no replica's, and does not make this one issue a new user."""


class SecretResolver:
    """Resolves a declared secret to the value served now (see the module docstring)."""

    def __init__(
        self,
        cache: SecretCache,
        env: EnvSource,
        rollback: RollbackState,
        previous_versions: int,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._cache = cache
        self._env = env
        self._metrics = metrics
        self._rollback = rollback
        self._previous_versions = previous_versions
        self._waiting: set[asyncio.Future[None]] = set()
        """One future per read waiting on Vault, resolved by a flip."""

    def on_flip(self) -> None:
        """A rollback flip was committed: reads waiting on Vault look at their source again."""
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)

    def answerable(self, spec: SecretSpec) -> bool:
        """Whether the current value could be served now without asking Vault."""
        if self.source_of(spec) is SourceKind.ENV:
            return not self._env.missing(spec)
        return self._cache.answerable(spec.name)

    def held_value(self, spec: SecretSpec) -> SecretValue | None:
        """The cached current value, fresh or not; no source read."""
        return self._cache.current(spec.name)

    def serve_written(self, spec: SecretSpec, value: SecretValue) -> None:
        """The broker wrote ``value`` as the current version (a rotation): serve it from now."""
        self._cache.put(spec, value)

    def invalidate(self, spec: SecretSpec) -> None:
        """Vault holds a newer version than the cached one: read it on the next request."""
        self._cache.invalidate(spec.name)

    def missing_env_variables(self, spec: SecretSpec) -> list[str]:
        """The secret's environment variables that are not set: what a rollback would lack."""
        return self._env.missing(spec)

    def source_of(self, spec: SecretSpec) -> SourceKind:
        return SourceKind.VAULT if self._rollback.from_vault(spec.category) else SourceKind.ENV

    def fresh(self, spec: SecretSpec) -> CachedSecret | None:
        """A fresh cached Vault value, or None: the common case, answered without awaiting."""
        return self._cache.fresh(spec) if self._rollback.from_vault(spec.category) else None

    async def prefetch(self, spec: SecretSpec) -> None:
        """Read a Vault-served secret into the cache (the warm-up); raises broker errors."""
        await self._cache.prefetch(spec)

    async def get(
        self, spec: SecretSpec, version: int | None = None, *, min_version: int = 0
    ) -> CachedSecret:
        if version is not None and version <= 0:
            raise InvalidRequest("version must be a positive number")
        if spec.database is not None and min_version > time.time() * 1000 + CLOCK_SKEW_MS:
            min_version = 0  # no user was issued then: not a reason to issue one
        if version is None and not min_version:
            hit = self.fresh(spec)  # no task, no wait: a rotation's fan-out reads this 10,000 times
            if hit is not None:
                return hit
        while True:
            if not self._rollback.from_vault(spec.category):
                return self._from_env(spec, version)
            current = await self._unless_flipped(self._cache.get(spec, min_version=min_version))
            if current is not None:
                break
        if version is None or version == current.value.version:
            return current
        newest = current.value.version
        oldest = max(1, newest - self._previous_versions)
        if not oldest <= version < newest:
            raise VersionOutOfRange(f"readable versions are {oldest} to {newest}")
        answer = await self._unless_flipped(self._cache.get(spec, version))
        return answer if answer is not None else self._from_env(spec, version)

    async def _unless_flipped(self, read: Coroutine[Any, Any, CachedSecret]) -> CachedSecret | None:
        """The read's answer, or None when a flip came first (the read goes on in the cache)."""
        task = asyncio.ensure_future(read)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.add(waiter)
        try:
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting.discard(waiter)
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        return None

    def _from_env(self, spec: SecretSpec, version: int | None) -> CachedSecret:
        if version is not None:
            raise NotApplicable(
                "secret is served from environment variables, which keep no versions"
            )
        value = self._env.read(spec)
        if self._metrics is not None:
            self._metrics.secret_read(spec.name, value.version, value.fetched_at)
        return CachedSecret(value, stale=False, from_cache=False)
