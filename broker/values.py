"""Where a declared secret's value comes from right now: Vault through the cache, or the
broker's environment when its category is rolled back. Also the version window."""

from __future__ import annotations

from broker.cache import CachedSecret, SecretCache
from broker.config import SecretSpec
from broker.errors import InvalidRequest, NotApplicable, VersionOutOfRange
from broker.metrics import BrokerMetrics
from broker.rollback import RollbackState
from broker.sources.base import SecretValue, SourceKind
from broker.sources.env import EnvSource


class SecretValues:
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

    def answerable(self, spec: SecretSpec) -> bool:
        """Whether the current value could be served now without asking Vault."""
        if self.source_of(spec) is SourceKind.ENV:
            return not self._env.missing(spec)
        return self._cache.answerable(spec.name)

    def cached(self, spec: SecretSpec) -> SecretValue | None:
        """The cached current value, fresh or not; no source read."""
        return self._cache.current(spec.name)

    def written(self, spec: SecretSpec, value: SecretValue) -> None:
        """The broker wrote ``value`` as the current version (a rotation): serve it from now."""
        self._cache.put(spec, value)

    def outdated(self, spec: SecretSpec) -> None:
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

    async def get(self, spec: SecretSpec, version: int | None = None) -> CachedSecret:
        if version is not None and version <= 0:
            raise InvalidRequest("version must be a positive number")
        if not self._rollback.from_vault(spec.category):
            if version is not None:
                raise NotApplicable(
                    "secret is served from environment variables, which keep no versions"
                )
            value = self._env.read(spec)
            if self._metrics is not None:
                self._metrics.secret_read(spec.name, value.version, value.fetched_at)
            return CachedSecret(value, stale=False, from_cache=False)
        current = await self._cache.get(spec)
        if version is None or version == current.value.version:
            return current
        newest = current.value.version
        oldest = max(1, newest - self._previous_versions)
        if not oldest <= version < newest:
            raise VersionOutOfRange(f"readable versions are {oldest} to {newest}")
        return await self._cache.get(spec, version)
