"""WatchSecrets, independent of transport: current values first, then one per change.

Changes reach a watch through the ChangeFeed from three places: a rotation by this
broker, a rollback flip, and the version poller below, which notices versions
written into Vault by anyone else (ops, another replica). A stream sends a value
only when its source, version or data differ from what it last sent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

from broker.config import LimitsConfig, SecretSpec
from broker.core.cache import CachedSecret
from broker.core.changes import ChangeFeed
from broker.core.reader import SecretReader
from broker.core.resolver import SecretResolver
from broker.errors import BrokerError, InvalidRequest, LimitExceeded
from broker.names import quoted
from broker.observe.logs import Throttle
from broker.observe.metrics import BrokerMetrics
from broker.sources.base import RunBlocking, SecretValue, SourceKind, behind
from broker.sources.vault import VaultSource

log = logging.getLogger(__name__)

LIMIT_LOG_INTERVAL = 60.0
"""Seconds between two log lines about one identity hitting one limit."""


def _same(a: SecretValue, b: SecretValue) -> bool:
    return a.source is b.source and a.version == b.version and a.data == b.data


class Watcher:
    def __init__(
        self,
        reader: SecretReader,
        resolver: SecretResolver,
        feed: ChangeFeed,
        limits: LimitsConfig | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._reader = reader
        self._resolver = resolver
        self._feed = feed
        self._limits = limits or LimitsConfig()
        self._metrics = metrics
        self._streams: dict[str, int] = {}
        """Open streams per identity."""
        self._limit_log = Throttle(LIMIT_LOG_INTERVAL)

    async def watch(
        self, identity: str, names: Sequence[str], min_versions: Mapping[str, int] | None = None
    ) -> AsyncIterator[tuple[str, CachedSecret, bool]]:
        """(name, value, whether it is a change): the current value of each name, then every
        change. Every name is authorized before anything is sent; errors then end the stream.
        ``min_versions``: per name, the version the caller holds (a resumed watch); its first
        value is read as GetSecret's ``min_version`` reads."""
        if not names:
            raise InvalidRequest("names is empty: name at least one secret to watch")
        limits = self._limits
        if len(names) > limits.max_watch_names:
            raise self._refuse(
                identity,
                "watch_names",
                f"the request lists {len(names)} names; limits.max_watch_names is"
                f" {limits.max_watch_names}",
            )
        specs = {name: self._reader.authorize(identity, name) for name in dict.fromkeys(names)}
        open_streams = self._streams.get(identity, 0)
        if open_streams >= limits.max_watch_streams_per_identity:
            raise self._refuse(
                identity,
                "watch_streams_per_identity",
                f"the caller has {open_streams} WatchSecrets streams open;"
                f" limits.max_watch_streams_per_identity is"
                f" {limits.max_watch_streams_per_identity}",
            )
        self._streams[identity] = open_streams + 1
        # Subscribe before the first read, so a change during it is not missed.
        subscription = self._feed.subscribe(specs)
        try:
            sent: dict[str, SecretValue] = {}
            held = min_versions or {}
            for name, spec in specs.items():
                cached = await self._resolver.get(spec, min_version=max(0, held.get(name, 0)))
                sent[name] = cached.value
                yield name, cached, False
            while True:
                for name in sorted(await subscription.changed()):
                    try:
                        cached = await self._resolver.get(specs[name])
                    except BrokerError as exc:
                        log.warning("watch of %r keeps its last value: %s", name, exc)
                        continue
                    if not _same(cached.value, sent[name]):
                        sent[name] = cached.value
                        yield name, cached, True
        finally:
            subscription.close()
            left = self._streams.pop(identity) - 1
            if left:
                self._streams[identity] = left

    def _refuse(self, identity: str, limit: str, problem: str) -> LimitExceeded:
        if self._metrics is not None:
            self._metrics.limit_refused(limit)
        held_back = self._limit_log.allow(f"{limit} {identity}")
        if held_back is not None:
            log.warning(
                "refused %s: %s (%d more refusals of it since the last line)",
                quoted(identity),
                problem,
                held_back,
            )
        return LimitExceeded(problem)


async def poll_watched_versions(
    secrets_: Mapping[str, SecretSpec],
    resolver: SecretResolver,
    vault: VaultSource,
    feed: ChangeFeed,
    run_blocking: RunBlocking,
    interval: float,
) -> None:
    """Every ``interval``, ask Vault for the current version of each watched secret; when it
    is not the cached one, forget the cached value and tell the watchers. Until cancelled."""
    while True:
        await asyncio.sleep(interval)
        for name in feed.watched():
            spec = secrets_[name]
            if spec.database is not None or resolver.source_of(spec) is not SourceKind.VAULT:
                continue  # env keeps no versions; database leases push their own
            try:
                info = await run_blocking(functools.partial(vault.current_version, spec))
            except BrokerError as exc:
                log.debug("version poll of %r failed: %s", name, exc)
                continue
            held = resolver.held_value(spec)
            if behind(info.version, info.created_at, held):
                continue  # a standby that has not applied the newest write yet
            if held is None or held.version != info.version:
                log.info("%r has a new version in vault: %d", name, info.version)
                resolver.invalidate(spec)
                feed.publish([name])
