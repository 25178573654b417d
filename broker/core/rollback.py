"""Which categories are served from Vault: the ADR's rollback flag, flippable live.

One rule decides, and ``RollbackState.rule`` names it:

1. a live override (set through SecretBrokerAdmin) wins while it is set; it is
   persisted in ``admin.state_file``, so it survives a restart, until cleared;
2. else ``VAULT_ENABLED_SECRETS`` as read at start-up;
3. else every category is served from Vault.

Reads (``from_vault``) are one set lookup on the event loop. Flips are applied on the
event loop too (the file is written in a thread first), so a flip takes effect for the
very next request.

A flip is all or nothing, in two steps: ``plan_set``/``plan_clear`` validate and say
what would change, touching nothing; the caller records it in the audit trail; then
``commit`` persists, applies and publishes it. A record that cannot be written, or
an override that cannot be saved, leaves the rule in force as it was.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.config import StartupRollback
from broker.config_loader import check_categories
from broker.errors import ConfigError, InvalidRequest, StateUnavailable

log = logging.getLogger(__name__)


class Rule(enum.Enum):
    DEFAULT = "default"
    STARTUP_VARIABLE = "startup-variable"
    OVERRIDE = "override"


@dataclass(frozen=True)
class Override:
    vault_categories: frozenset[str]
    set_by: str
    set_at: float


@dataclass(frozen=True)
class Flip:
    """A planned change of the override, not applied yet."""

    override: Override | None
    vault_categories: frozenset[str]
    """Categories served from Vault once committed."""
    changed: frozenset[str]
    """Categories whose source the commit changes."""


@dataclass(frozen=True)
class RollbackStatus:
    vault_categories: frozenset[str]
    env_categories: frozenset[str]
    rule: Rule
    startup: StartupRollback
    override: Override | None


class RollbackState:
    def __init__(
        self,
        categories: frozenset[str],
        startup: StartupRollback,
        state_file: Path | None,
        on_flip: Callable[[frozenset[str]], None] = lambda changed: None,
    ) -> None:
        """``on_flip`` is called with the categories whose source changed."""
        self._categories = categories
        self._startup = startup
        self._state_file = state_file
        self._on_flip = on_flip
        self._committing = asyncio.Lock()
        self._override = _load_override(state_file, categories)
        self._vault = self._in_force(self._override)
        status = self.status()
        log.info(
            "serving from vault: [%s]; from env: [%s] (rule: %s)",
            ", ".join(sorted(status.vault_categories)),
            ", ".join(sorted(status.env_categories)),
            status.rule.value,
        )

    def from_vault(self, category: str) -> bool:
        return category in self._vault

    def status(self) -> RollbackStatus:
        if self._override is not None:
            rule = Rule.OVERRIDE
        elif self._startup.vault_categories is not None:
            rule = Rule.STARTUP_VARIABLE
        else:
            rule = Rule.DEFAULT
        return RollbackStatus(
            self._vault, self._categories - self._vault, rule, self._startup, self._override
        )

    def plan_set(self, vault_categories: list[str], by: str) -> Flip:
        """Validate an override; raises InvalidRequest. Changes nothing."""
        try:
            check_categories("vault_enabled_categories", vault_categories, self._categories)
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        return self._plan(Override(frozenset(vault_categories), by, time.time()))

    def plan_clear(self) -> Flip:
        return self._plan(None)

    async def commit(self, flip: Flip) -> RollbackStatus:
        """Persist (in a thread: the file is fsynced), then apply and publish ``flip``. Raises
        StateUnavailable, having changed nothing, when the override cannot be saved."""
        async with self._committing:  # one flip at a time: the file and the state agree
            try:
                await asyncio.to_thread(_save_override, self._state_file, flip.override)
            except OSError as exc:
                raise StateUnavailable(
                    f"the rollback override cannot be saved in admin.state_file ({exc.strerror})"
                ) from None
            changed = self._vault ^ flip.vault_categories
            self._override, self._vault = flip.override, flip.vault_categories
            if changed:
                self._on_flip(changed)
            return self.status()

    def _plan(self, override: Override | None) -> Flip:
        after = self._in_force(override)
        return Flip(override, after, self._vault ^ after)

    def _in_force(self, override: Override | None) -> frozenset[str]:
        if override is not None:
            return override.vault_categories
        if self._startup.vault_categories is not None:
            return self._startup.vault_categories
        return self._categories


def _load_override(path: Path | None, categories: frozenset[str]) -> Override | None:
    if path is None or not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
        override = Override(
            frozenset(document["vault_enabled_categories"]),
            str(document["set_by"]),
            float(document["set_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        problem = f"cannot read the rollback override in {path}"
        raise ConfigError("admin.state_file", problem) from None
    unknown = override.vault_categories - categories
    if unknown:
        log.warning(
            "the persisted rollback override names categories no secret has any more: %s",
            ", ".join(sorted(unknown)),
        )
    return override


def _save_override(path: Path | None, override: Override | None) -> None:
    """Write atomically (temporary file, fsync, rename): a crash leaves the old or the new."""
    if path is None:
        return
    if override is None:
        path.unlink(missing_ok=True)
        return
    document = {
        "vault_enabled_categories": sorted(override.vault_categories),
        "set_by": override.set_by,
        "set_at": override.set_at,
    }
    temporary = path.with_name(path.name + ".tmp")
    try:
        with temporary.open("w") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
