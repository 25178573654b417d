"""Rotation: a fresh random value for one key of a secret, written as a new KV v2 version.

Check-and-set on the version read makes rotation safe with several brokers on one
Vault: of two rotations of the same version, exactly one writes; the other gets
WriteConflict. The scheduler rotates a secret whose current version is older than
its period, so every replica may check, and one rotates.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping

from broker.config import RotationSpec, SecretSpec
from broker.core.changes import ChangeFeed
from broker.core.leases import LeaseKeeper
from broker.core.resolver import SecretResolver
from broker.errors import BrokerError, NotApplicable, WriteConflict
from broker.observe.metrics import BrokerMetrics
from broker.sources.base import RunBlocking, SecretValue, SourceKind
from broker.sources.vault import VaultSource, declared_keys_of

log = logging.getLogger(__name__)


class Rotator:
    def __init__(
        self,
        secrets_: Mapping[str, SecretSpec],
        vault: VaultSource,
        resolver: SecretResolver,
        feed: ChangeFeed,
        run_blocking: RunBlocking,
        clock: Callable[[], float] = time.time,
        metrics: BrokerMetrics | None = None,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self._metrics = metrics
        self._leases = leases
        self._rotating = [(s, s.rotation) for s in secrets_.values() if s.rotation is not None]
        for spec, rotation in self._rotating:
            if metrics is not None:
                metrics.rotating(spec.name, rotation.period)
        self._vault = vault
        self._resolver = resolver
        self._feed = feed
        self._run_blocking = run_blocking
        self._clock = clock

    async def rotate(self, spec: SecretSpec) -> SecretValue:
        """Rotate now. Raises NotApplicable, WriteConflict or a source error. A database
        secret gets a new user on this replica (its keeper revokes the old one later)."""
        if self._resolver.source_of(spec) is not SourceKind.VAULT:
            raise NotApplicable(
                "secret is served from environment variables; rotate it where they are set"
            )
        if spec.database is not None and self._leases is not None:
            return await self._leases.rotate(spec)
        rotation = spec.rotation
        if rotation is None:
            raise NotApplicable("secret is not declared rotating in the broker config")
        try:
            written = await self._run_blocking(
                functools.partial(self._rotate_blocking, spec, rotation, None)
            )
        except WriteConflict:
            self._count(spec, "conflict")
            raise
        except BrokerError:
            self._count(spec, "failed")
            raise
        self._written(spec, written)
        return written

    async def rotate_due(self) -> list[SecretValue]:
        """Rotate every rotating secret served from Vault whose version is past its period."""
        rotated = []
        for spec, rotation in self._rotating:
            if self._resolver.source_of(spec) is not SourceKind.VAULT:
                continue
            try:
                written = await self._run_blocking(
                    functools.partial(self._rotate_if_due, spec, rotation)
                )
            except WriteConflict:
                log.info("%r was rotated by another writer first", spec.name)
                self._count(spec, "conflict")
                continue
            except BrokerError as exc:
                log.warning("scheduled rotation of %r failed: %s", spec.name, exc)
                self._count(spec, "failed")
                continue
            if written is not None:
                self._written(spec, written)
                rotated.append(written)
        return rotated

    async def run_schedule(self, interval: float) -> None:
        """Check for due rotations every ``interval`` seconds, until cancelled."""
        if not self._rotating:
            return
        while True:
            await self.rotate_due()
            await asyncio.sleep(interval)

    def _count(self, spec: SecretSpec, result: str, written_at: float | None = None) -> None:
        if self._metrics is not None:
            self._metrics.rotation(spec.name, result, written_at)

    def _written(self, spec: SecretSpec, written: SecretValue) -> None:
        self._count(spec, "rotated", written.created_at)
        self._resolver.serve_written(spec, written)
        self._feed.publish([spec.name])
        log.info("rotated %r: version %d", spec.name, written.version)

    def _rotate_if_due(self, spec: SecretSpec, rotation: RotationSpec) -> SecretValue | None:
        current = self._vault.current_version(spec)
        if self._metrics is not None:
            self._metrics.version_written(spec.name, current.created_at)
        if self._clock() - current.created_at < rotation.period:
            return None
        return self._rotate_blocking(spec, rotation, current.version)

    def _rotate_blocking(
        self, spec: SecretSpec, rotation: RotationSpec, version: int | None
    ) -> SecretValue:
        """Write the new version with every key Vault holds; return it as served (declared
        keys only). A value that lacks a declared key is refused before anything is written."""
        current = self._vault.read_all(spec, version)
        declared_keys_of(spec, current)
        data = dict(current.data)
        data[rotation.key] = secrets.token_urlsafe(rotation.bytes)
        written = self._vault.write_version(spec, data, expected_version=current.version)
        return declared_keys_of(spec, written)
