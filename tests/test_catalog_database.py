"""The catalog service's database comes from ``database_url``: SQLite and a real PostgreSQL work
the same way, and a changed URL is followed on the next request."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from catalog.auth import TokenAuthority
from catalog.config import DATABASE_URL, JWT_SECRET_KEY
from catalog.service import CatalogApp, HttpError
from secretbroker.client import Secret, SecretSource
from tests.postgres import running_postgres


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@dataclasses.dataclass
class FakeSecrets:
    """Stands in for LiveSecrets: this test is about the database, not the broker."""

    database_url: str
    jwt_key: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(32))

    def get_secret(self, name: str, version: int | None = None) -> Secret:
        data = {
            DATABASE_URL.name: {DATABASE_URL.key: self.database_url},
            JWT_SECRET_KEY.name: {JWT_SECRET_KEY.key: self.jwt_key},
        }[name]
        return Secret(name, data, 1, SecretSource.VAULT, stale=False, fetched_at=0.0)


def app_for(fake: FakeSecrets) -> tuple[CatalogApp, str]:
    authority = TokenAuthority(fake.get_secret, fake)
    return CatalogApp(fake, authority), f"Bearer {authority.mint('alice')}"


def test_the_same_requests_work_on_sqlite_and_postgresql(postgres_url: str, tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path / 'catalog.db'}", postgres_url):
        app, bearer = app_for(FakeSecrets(url))
        status, created = app.add_media(bearer, b'{"title": "Heat", "kind": "movie", "year": 1995}')
        assert status == HTTPStatus.CREATED
        status, listing = app.list_media()
        assert status == HTTPStatus.OK
        assert listing["items"][-1] == {
            "id": created["id"],
            "title": "Heat",
            "kind": "movie",
            "year": 1995,
            "created_by": "alice",
        }


def test_a_changed_database_url_is_followed_on_the_next_request(
    postgres_url: str, tmp_path: Path
) -> None:
    fake = FakeSecrets(f"sqlite:///{tmp_path / 'before.db'}")
    app, bearer = app_for(fake)
    app.add_media(bearer, b'{"title": "Only in SQLite"}')

    fake.database_url = postgres_url
    app.add_media(bearer, b'{"title": "Only in PostgreSQL"}')

    titles = [item["title"] for item in app.list_media()[1]["items"]]
    assert "Only in PostgreSQL" in titles
    assert "Only in SQLite" not in titles


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/catalog", "unsupported database URL scheme 'mysql'"),
        ("sqlite://relative.db", "a SQLite URL must look like"),
    ],
)
def test_an_unusable_url_is_a_503_that_does_not_echo_it(url: str, message: str) -> None:
    app, _ = app_for(FakeSecrets(url))
    with pytest.raises(HttpError) as caught:
        app.list_media()
    assert caught.value.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert message in str(caught.value)
    assert "relative.db" not in str(caught.value)
    assert "db/catalog" not in str(caught.value)


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
    url = break_url(postgres_url)
    app, _ = app_for(FakeSecrets(url))
    with pytest.raises(HttpError) as caught:
        app.list_media()
    assert caught.value.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert "cannot" in str(caught.value)
    assert "secret-in-url" not in str(caught.value)
    assert "secret-in-url" not in caplog.text
