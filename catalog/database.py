"""The catalog's database, from the URL the broker serves as ``database_url``: opened once (the
schema created then), used through short units of work, closed when no request uses it.

``sqlite:////absolute/path.db`` uses the standard library, each statement in a worker thread
(never on the event loop); ``postgresql://...`` uses a psycopg_pool.AsyncConnectionPool.
Errors name the driver's error class only: libpq quotes the offending part of a malformed URL,
which can be the password.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

CONNECT_TIMEOUT_SECONDS = 5
POOL_MIN_SIZE = 2
POOL_MAX_SIZE = 10
POOL_WAIT_SECONDS = 10.0
"""How long a request waits for a pooled connection before it gets a 503."""


class DatabaseUrlError(Exception):
    """The database URL is not one the catalog can use. Never carries the URL itself."""


class DatabaseUnavailable(Exception):
    """The database cannot be opened or used now. Never carries the URL."""


Row = tuple[Any, ...]


class Connection(Protocol):
    """One unit of work: statements in one transaction, committed when it ends without error."""

    mark: str
    """The driver's parameter placeholder ("?" or "%s")."""

    async def fetch(self, query: str, params: Sequence[Any] = ()) -> list[Row]: ...


class Database(Protocol):
    url: str

    def connection(self) -> AbstractAsyncContextManager[Connection]: ...
    async def close(self) -> None: ...


_COLUMNS = """
    title TEXT NOT NULL,
    kind TEXT NOT NULL,
    year INTEGER,
    created_by TEXT NOT NULL
)"""
SQLITE_SCHEMA = "CREATE TABLE IF NOT EXISTS media (id INTEGER PRIMARY KEY AUTOINCREMENT," + _COLUMNS
POSTGRES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS media (id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    + _COLUMNS
)


async def open_database(url: str) -> Database:
    """The database at ``url``, opened, its schema in place; DatabaseUrlError or
    DatabaseUnavailable otherwise."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return await SqliteDatabase.open(url)
    if scheme in ("postgresql", "postgres"):
        return await PostgresDatabase.open(url)
    raise DatabaseUrlError(f"unsupported database URL scheme {scheme!r}")


class SqliteDatabase:
    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self._path = path

    @classmethod
    async def open(cls, url: str) -> SqliteDatabase:
        path = url.removeprefix("sqlite:///")
        if not path or path == url:
            raise DatabaseUrlError('a SQLite URL must look like "sqlite:////absolute/path.db"')
        database = cls(url, "/" + path.lstrip("/"))
        async with database.connection() as connection:
            await connection.fetch(SQLITE_SCHEMA)
        return database

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        try:
            opened = await asyncio.to_thread(
                sqlite3.connect, self._path, timeout=10, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"cannot open the database ({type(exc).__name__})") from None
        try:
            yield _SqliteConnection(opened)
            await asyncio.to_thread(opened.commit)
        finally:
            await asyncio.to_thread(opened.close)

    async def close(self) -> None:
        """Nothing stays open between units of work."""


class _SqliteConnection:
    mark = "?"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    async def fetch(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return await asyncio.to_thread(self._fetch, query, params)

    def _fetch(self, query: str, params: Sequence[Any]) -> list[Row]:
        try:
            return self._connection.execute(query, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise DatabaseUnavailable(f"the database failed ({type(exc).__name__})") from None


class PostgresDatabase:
    def __init__(self, url: str, pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]]) -> None:
        self.url = url
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresDatabase:
        try:
            import psycopg
            from psycopg_pool import AsyncConnectionPool, PoolTimeout
        except ImportError:
            raise DatabaseUrlError(
                "a PostgreSQL URL needs psycopg-pool: pip install 'secretbroker[catalog]'"
            ) from None
        try:
            # One connection of our own first: its error is caught here and named by class only,
            # where the pool's workers would log libpq's message (which can quote the URL).
            probe = await psycopg.AsyncConnection.connect(
                url, connect_timeout=CONNECT_TIMEOUT_SECONDS
            )
            async with probe:
                # Only when missing: a user without CREATE on the schema (a rotated or dynamic
                # one, which must not own objects) is refused even CREATE ... IF NOT EXISTS.
                found = await (await probe.execute("SELECT to_regclass('media')")).fetchone()
                if found is None or found[0] is None:
                    await probe.execute(POSTGRES_SCHEMA)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(
                f"cannot connect to the database ({type(exc).__name__})"
            ) from None
        pool = AsyncConnectionPool(
            url,
            min_size=POOL_MIN_SIZE,
            max_size=POOL_MAX_SIZE,
            timeout=POOL_WAIT_SECONDS,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
            open=False,
            name="catalog",
        )
        try:
            # Filled before it serves: a request in the first moments would otherwise wait for
            # the background opens, and the pool would grow past min_size for nothing.
            await pool.open(wait=True, timeout=POOL_WAIT_SECONDS)
        except PoolTimeout:
            await pool.close()
            raise DatabaseUnavailable("the pool's first connections did not open in time") from None
        return cls(url, pool)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            async with self._pool.connection() as connection:
                yield _PostgresConnection(connection)
        except PoolTimeout:
            raise DatabaseUnavailable("no database connection free in time") from None
        except psycopg.Error as exc:
            # Also what is not "operational" to psycopg: a session ended by the user's revocation
            # (then "the connection is closed"), rights taken away (InsufficientPrivilege).
            raise DatabaseUnavailable(f"the database failed ({type(exc).__name__})") from None

    async def close(self) -> None:
        await self._pool.close()


class _PostgresConnection:
    mark = "%s"

    def __init__(self, connection: psycopg.AsyncConnection[Row]) -> None:
        self._connection = connection

    async def fetch(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        cursor = await self._connection.execute(query, params)
        return await cursor.fetchall()
