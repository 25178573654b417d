"""The catalog under continuous load from a real HTTP client (httpx) while its JWT key rotates
and its database URL moves to another PostgreSQL user: 0 failed requests, tokens from before
the rotation still verify (within the grace), and the old user's pool is closed after the
switch. Real OpenBao, broker, PostgreSQL and uvicorn processes."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import psycopg
import pytest

from catalog.database import POSTGRES_SCHEMA
from devstack.harness import wait_until
from devstack.postgres import running_postgres
from secretbroker.v1 import broker_pb2
from tests.catalog_process import CATALOG_SECRETS, catalog_service, under_load
from tests.support import API, DATABASE, EXTERNAL, BrokerFactory, Pki, Vault


@pytest.fixture(scope="module")
def postgres_admin_url() -> Iterator[str]:
    """A server with the catalog's table, owned by the admin (as a migration would leave it),
    and two login users that may use it."""
    with running_postgres() as url, psycopg.connect(url, autocommit=True) as admin:
        admin.execute(POSTGRES_SCHEMA)
        for user in ("catalog_a", "catalog_b"):
            admin.execute(f"CREATE ROLE {user} LOGIN")
            admin.execute(f"GRANT SELECT, INSERT ON media TO {user}")
        yield url


def user_url(admin_url: str, user: str) -> str:
    return admin_url.replace("//catalog@", f"//{user}@")


def backends(admin_url: str, user: str) -> int:
    with psycopg.connect(admin_url) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (user,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_no_request_fails_while_the_jwt_key_rotates_and_the_database_moves(
    private_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    postgres_admin_url: str,
) -> None:
    first, second = (user_url(postgres_admin_url, u) for u in ("catalog_a", "catalog_b"))
    private_vault.write(DATABASE, url=first)
    values = [secrets.token_urlsafe(32), secrets.token_urlsafe(16)]
    private_vault.write(API, jwt_secret=values[0])
    private_vault.write(EXTERNAL, tmdb_api_key=values[1])
    # The new URL is written to Vault as ops would; the broker's watch poll finds it.
    broker = start_broker(
        private_vault, secrets_=CATALOG_SECRETS, rollout={"watch_poll_interval": "300ms"}
    )
    admin = broker.admin(pki.ops, pki.ca)

    with catalog_service(broker.port, pki, values) as catalog:
        tokens = [catalog.token("before-rotation")]
        database_version = catalog.health()[DATABASE]["version"]

        def steps() -> None:
            rotated = admin.RotateSecret(broker_pb2.RotateSecretRequest(name=API), timeout=30)
            catalog.wait_for(API, version=rotated.version)
            tokens.append(catalog.token("after-rotation"))
            time.sleep(0.5)
            # The switch comes while every old connection is busy and requests queue for one:
            # a lock holds them on the table until the new pool is open.
            with psycopg.connect(postgres_admin_url) as locker:
                locker.execute("LOCK TABLE media IN ACCESS EXCLUSIVE MODE")
                private_vault.write(DATABASE, url=second)
                catalog.wait_for(DATABASE, version=database_version + 1)
                wait_until(lambda: backends(postgres_admin_url, "catalog_b") > 0, 30)
                time.sleep(0.2)
            wait_until(
                lambda: backends(postgres_admin_url, "catalog_a") == 0,
                30,
                "the old user's pool closed",
            )

        under_load(catalog, tokens, steps)

    with psycopg.connect(postgres_admin_url) as check:
        rows = check.execute(
            "SELECT created_by, count(*) FROM media GROUP BY created_by"
        ).fetchall()
    by_subject: dict[str, int] = dict(rows)
    assert by_subject.get("before-rotation", 0) > 0, "old tokens kept working after rotation"
    assert by_subject.get("after-rotation", 0) > 0
