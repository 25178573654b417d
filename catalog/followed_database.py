"""The database the catalog uses now, following ``database_url``.

A changed URL opens a new database (for PostgreSQL a new pool, connected and checked) while
the old one keeps serving; then new units of work go to the new one at once, and the old one is
closed when its last unit of work has ended (or after DRAIN_DEADLINE). No request fails across
the switch, and none waits for it. A URL that cannot be used keeps the current database and is
tried again with backoff; before any database opened, requests get DatabaseUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from catalog.config import MissingSecretKey
from catalog.database import (
    Connection,
    Database,
    DatabaseUnavailable,
    DatabaseUrlError,
    open_database,
)
from secretbroker.client import Backoff, SecretBrokerError

log = logging.getLogger(__name__)

DRAIN_DEADLINE = 60.0
"""Seconds the old database stays open for units of work begun on it: longer than any request
should take. Past it, it is closed under whatever still runs."""
RETRY = Backoff(initial=1.0, maximum=30.0)


class _InUse:
    """A database with a count of the units of work running on it."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.users += 1
        self.idle.clear()

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.idle.set()


class FollowedDatabase:
    def __init__(self, url: Callable[[], str], retry: Backoff = RETRY) -> None:
        """``url`` reads the URL now (Config.database_url: memory, kept current by a watch)."""
        self._url = url
        self._retry = retry
        self._current: _InUse | None = None
        self._failure = "the database is not open yet"
        self._wanted = asyncio.Event()
        self._retiring: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.switches = 0
        """How often a new database took over from an open one."""

    async def start(self) -> None:
        """Open the database at the current URL (once; failures are retried in the background),
        then follow changes."""
        delay = await self._adopt()
        self._task = asyncio.create_task(self._follow(delay), name="database-follower")

    def url_changed(self) -> None:
        """The secret holding the URL changed (a change listener calls this on the loop)."""
        self._wanted.set()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A unit of work on the current database."""
        current = self._current
        if current is None:
            raise DatabaseUnavailable(self._failure)
        current.enter()
        try:
            async with current.database.connection() as connection:
                yield connection
        finally:
            current.leave()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._current is not None:
            await self._current.database.close()

    async def _follow(self, delay: float | None) -> None:
        attempt = 0
        while True:
            if delay is None:
                attempt, timeout = 0, None
            else:
                timeout, attempt = self._retry.delay(attempt), attempt + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), timeout)
            self._wanted.clear()
            try:
                delay = await self._adopt()
            except Exception:  # supervised: a surprise is logged, and the next try comes
                log.exception("following database_url failed")
                delay = self._retry.maximum

    async def _adopt(self) -> float | None:
        """Open the database at the URL now, unless it is the one in use. None when done; a
        delay (for the retry's backoff) when the URL cannot be used yet."""
        try:
            url = self._url()
        except (SecretBrokerError, MissingSecretKey) as exc:
            self._failure = f"database URL: {exc}"
            return self._retry.initial
        current = self._current
        if current is not None and current.database.url == url:
            return None
        try:
            database = await open_database(url)
        except (DatabaseUrlError, DatabaseUnavailable) as exc:
            kept = "kept the database in use" if current else "no database yet"
            log.error("the database URL cannot be used (%s); %s, retrying", exc, kept)
            if current is None:
                self._failure = str(exc)
            return self._retry.initial
        self._current = _InUse(database)
        if current is not None:
            self.switches += 1
            log.info("database switched: new requests use the new one; the old closes when idle")
            task = asyncio.create_task(_close_when_idle(current), name="database-drain")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return None


async def _close_when_idle(old: _InUse) -> None:
    try:
        await asyncio.wait_for(old.idle.wait(), DRAIN_DEADLINE)
    except TimeoutError:
        log.warning("closing the old database with %d units of work still on it", old.users)
    finally:
        await old.database.close()
