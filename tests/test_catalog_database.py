"""The catalog service's database comes from ``database_url``: SQLite and a real PostgreSQL work
the same way, the schema is created once and connections are pooled, a changed URL switches to
a new database, and one that cannot be used is a 503 that never echoes it. The app runs in
process (httpx's ASGI transport, lifespan included) with a fake in place of the broker."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from catalog.auth import TokenAuthority
from catalog.config import DATABASE_URL, JWT_SECRET_KEY, TMDB_API_KEY, Config
from catalog.database import POOL_MAX_SIZE
from catalog.service import Catalog, create_app, following_database
from devstack.harness import wait_until
from devstack.postgres import running_postgres
from secretbroker.client import Secret, SecretChange, SecretSource


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@dataclasses.dataclass
class FakeSecrets:
    """Stands in for AsyncLiveSecrets: these tests are about the database, not the broker."""

    database_url: str
    jwt_key: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(32))
    listeners: list[Callable[[SecretChange], None]] = dataclasses.field(default_factory=list)

    def get_secret(self, name: str) -> Secret:
        data = {
            DATABASE_URL.name: {DATABASE_URL.key: self.database_url},
            JWT_SECRET_KEY.name: {JWT_SECRET_KEY.key: self.jwt_key},
            TMDB_API_KEY.name: {},  # lacks its key
        }[name]
        return Secret(name, data, 1, SecretSource.VAULT, stale=False, fetched_at=0.0)

    def on_change(self, listener: Callable[[SecretChange], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def move_database(self, url: str) -> None:
        before = self.get_secret(DATABASE_URL.name)
        self.database_url = url
        change = SecretChange(before.name, before, self.get_secret(DATABASE_URL.name))
        for listener in self.listeners:
            listener(change)


Scenario = Callable[[httpx.AsyncClient, Catalog, str], Awaitable[None]]


def run_app(fake: FakeSecrets, scenario: Scenario) -> None:
    """Run ``scenario`` with a client of the app (started and stopped by its lifespan), the
    catalog's resources and a bearer header."""

    @asynccontextmanager
    async def resources() -> AsyncIterator[Catalog]:
        config = Config(fake)
        async with following_database(config, fake) as database:
            yield Catalog(fake, config, TokenAuthority(fake.get_secret), database)

    async def main() -> None:
        app = create_app(resources)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://catalog") as client:
                catalog: Catalog = app.state.catalog
                await scenario(client, catalog, f"Bearer {catalog.auth.mint('alice')}")

    asyncio.run(main())


async def add(client: httpx.AsyncClient, bearer: str, title: str) -> httpx.Response:
    return await client.post(
        "/media", json={"title": title, "year": 1995}, headers={"Authorization": bearer}
    )


def test_the_same_requests_work_on_sqlite_and_postgresql(postgres_url: str, tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, catalog: Catalog, bearer: str) -> None:
        created = await add(client, bearer, "Heat")
        assert created.status_code == 201
        listing = await client.get("/media")
        assert listing.status_code == 200
        assert listing.json()["items"][-1] == {
            "id": created.json()["id"],
            "title": "Heat",
            "kind": "movie",
            "year": 1995,
            "created_by": "alice",
        }

    for url in (f"sqlite:///{tmp_path / 'catalog.db'}", postgres_url):
        run_app(FakeSecrets(url), scenario)


def test_a_changed_database_url_switches_to_the_new_database(
    postgres_url: str, tmp_path: Path
) -> None:
    fake = FakeSecrets(f"sqlite:///{tmp_path / 'before.db'}")

    async def scenario(client: httpx.AsyncClient, catalog: Catalog, bearer: str) -> None:
        assert (await add(client, bearer, "Only in SQLite")).status_code == 201
        fake.move_database(postgres_url)
        await asyncio.to_thread(wait_until, lambda: catalog.database.switches == 1, 20)
        assert (await add(client, bearer, "Only in PostgreSQL")).status_code == 201
        titles = [item["title"] for item in (await client.get("/media")).json()["items"]]
        assert "Only in PostgreSQL" in titles
        assert "Only in SQLite" not in titles

    run_app(fake, scenario)


def test_the_schema_is_created_once_and_requests_do_not_open_connections(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stdlib service opened a connection and ran CREATE TABLE on every request."""
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened: sqlite3.Connection = connect(*args, **kwargs)
        opened.set_trace_callback(statements.append)
        return opened

    monkeypatch.setattr(sqlite3, "connect", traced)

    def sessions() -> int:
        with psycopg.connect(postgres_url) as admin:
            row = admin.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
        assert row is not None
        return int(row[0])

    async def scenario(client: httpx.AsyncClient, catalog: Catalog, bearer: str) -> None:
        before = await asyncio.to_thread(sessions)
        for number in range(20):
            assert (await add(client, bearer, f"title {number}")).status_code == 201
            assert (await client.get("/media")).status_code == 200
        opened = await asyncio.to_thread(sessions) - before
        # 40 requests; the pool's own (whose stats may land late) and ours are fewer by design.
        assert opened <= POOL_MAX_SIZE + 1, "requests opened connections of their own"

    run_app(FakeSecrets(f"sqlite:///{tmp_path / 'catalog.db'}"), scenario)
    assert sum("CREATE TABLE" in statement for statement in statements) == 1
    assert sum(statement.startswith("INSERT") for statement in statements) == 20
    run_app(FakeSecrets(postgres_url), scenario)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/catalog", "unsupported database URL scheme 'mysql'"),
        ("sqlite://relative.db", "a SQLite URL must look like"),
    ],
)
def test_an_unusable_url_is_a_503_that_does_not_echo_it(url: str, message: str) -> None:
    async def scenario(client: httpx.AsyncClient, catalog: Catalog, bearer: str) -> None:
        response = await client.get("/media")
        assert response.status_code == 503
        assert message in response.json()["error"]
        assert "relative.db" not in response.text
        assert "db/catalog" not in response.text

    run_app(FakeSecrets(url), scenario)


@pytest.mark.parametrize(
    "break_url",
    [
        lambda url: url.replace("catalog@", "catalog:pw%ZZsecret-in-url@"),  # libpq quotes it
        lambda url: (
            url.replace("catalog@", "catalog:pw-secret-in-url@").rsplit(":", 1)[0] + ":1/postgres"
        ),  # nothing listens on port 1
        lambda _: "sqlite:////nonexistent/pw-secret-in-url/catalog.db",
    ],
    ids=["malformed password", "refused connection", "unopenable sqlite file"],
)
def test_a_database_that_cannot_be_opened_is_a_503_without_the_url(
    postgres_url: str, break_url: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(client: httpx.AsyncClient, catalog: Catalog, bearer: str) -> None:
        response = await client.get("/media")
        assert response.status_code == 503
        assert "cannot" in response.json()["error"]
        assert "secret-in-url" not in response.text

    run_app(FakeSecrets(break_url(postgres_url)), scenario)
    assert "secret-in-url" not in caplog.text


def test_health_is_a_503_naming_the_key_a_secret_lacks(tmp_path: Path) -> None:
    """Config comes from a dependency: /healthz reads every property, so a secret without the
    key Config needs makes the service unhealthy, named, before any request needs it."""
    fake = FakeSecrets(f"sqlite:///{tmp_path / 'catalog.db'}")

    async def scenario(client: httpx.AsyncClient, catalog: Catalog, bearer: str) -> None:
        response = await client.get("/healthz")
        assert response.status_code == 503
        assert response.json() == {
            "error": "secret 'media-catalog/external' has no key 'tmdb_api_key'"
        }

    run_app(fake, scenario)


def test_a_new_database_that_hangs_keeps_requests_on_the_one_in_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The new URL's server accepts the connection and never answers (a hung PostgreSQL):
    opening it waits for its connect timeout in the background, requests keep going to the
    database in use meanwhile, and the switch is not made."""
    fake = FakeSecrets(f"sqlite:///{tmp_path / 'catalog.db'}")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hung = f"postgresql://catalog:pw-secret-in-url@127.0.0.1:{silent.getsockname()[1]}/db"

        async def scenario(client: httpx.AsyncClient, catalog: Catalog, bearer: str) -> None:
            fake.move_database(hung)
            for number in range(20):
                assert (await add(client, bearer, f"during {number}")).status_code == 201
            assert catalog.database.switches == 0
            assert "cannot be used" not in caplog.text, "answered while the open still waited"
            listing = (await client.get("/media")).json()["items"]
            assert len(listing) == 20, "all of them in the database in use"

        run_app(fake, scenario)
    assert "secret-in-url" not in caplog.text
