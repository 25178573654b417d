"""The catalog's database, from the URL the broker serves as ``database_url``.

``sqlite:///path/to/file.db`` uses the standard library; ``postgresql://...`` uses
psycopg (the ``postgres`` extra). A connection is opened per unit of work with the
URL current at that moment, so a rotated or rolled-back URL is followed without a
restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit


class DatabaseUrlError(Exception):
    """The database URL is not one the catalog can use. Never carries the URL itself."""


class DatabaseUnavailable(Exception):
    """The database cannot be opened. Names the driver's error class only: libpq quotes the
    offending part of a malformed URL, which can be the password."""


CONNECT_TIMEOUT_SECONDS = 5


class Cursor(Protocol):
    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


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


@contextmanager
def transaction(url: str) -> Iterator[tuple[Cursor, str]]:
    """A cursor in one transaction, and the parameter placeholder of its driver."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = url.removeprefix("sqlite:///")
        if not path or path == url:
            raise DatabaseUrlError('a SQLite URL must look like "sqlite:////absolute/path.db"')
        try:
            connection = sqlite3.connect("/" + path.lstrip("/"), timeout=10)
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"cannot open the database ({type(exc).__name__})") from None
        try:
            with connection:
                cursor = connection.cursor()
                cursor.execute(SQLITE_SCHEMA)
                yield cursor, "?"
        finally:
            connection.close()
    elif scheme in ("postgresql", "postgres"):
        try:
            import psycopg
        except ImportError:
            raise DatabaseUrlError(
                "a PostgreSQL URL needs psycopg: pip install 'secretbroker[postgres]'"
            ) from None
        try:
            pg = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(
                f"cannot connect to the database ({type(exc).__name__})"
            ) from None
        with pg, pg.cursor() as pg_cursor:
            pg_cursor.execute(POSTGRES_SCHEMA)
            yield pg_cursor, "%s"
    else:
        raise DatabaseUrlError(f"unsupported database URL scheme {scheme!r}")
