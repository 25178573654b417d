"""The catalog on database users issued by OpenBao's database engine, under continuous load:
20 rotations in a row (each a new PostgreSQL user, the old one revoked by the broker after the
handover) fail no request and leave no user behind. Real OpenBao, broker, PostgreSQL (password
logins) and uvicorn processes."""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from broker.config_loader import parse_config
from broker.tools.vault_policy import vault_policy
from devstack.bootstrap import create_broker_approle, write_policy
from devstack.broker_config import approle_auth
from devstack.database_engine import (
    DatabaseEngineSetup,
    configure_engine,
    create_static_user,
    prepare_postgres,
)
from devstack.harness import wait_until
from devstack.postgres import PasswordedPostgres, running_passworded_postgres
from secretbroker.v1 import broker_pb2
from tests.catalog_process import CATALOG_SECRETS, catalog_service, http, under_load
from tests.support import (
    API,
    DATABASE,
    EXTERNAL,
    BrokerFactory,
    Measure,
    Pki,
    RunningBroker,
    Vault,
    Watch,
    broker_settings,
)

ROTATIONS = 20
ISSUED = "SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'"


@pytest.fixture
def postgres() -> Iterator[PasswordedPostgres]:
    with running_passworded_postgres() as server:
        yield server


def issued_users(postgres: PasswordedPostgres) -> set[str]:
    with psycopg.connect(postgres.superuser_url) as db:
        return {str(row[0]) for row in db.execute(ISSUED).fetchall()}


def sessions_of(postgres: PasswordedPostgres, user: str) -> int:
    with psycopg.connect(postgres.superuser_url) as db:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (user,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def no_session_of(postgres: PasswordedPostgres, user: str) -> bool:
    return sessions_of(postgres, user) == 0


def only_sessions_of(postgres: PasswordedPostgres, user: str, not_user: str) -> bool:
    return sessions_of(postgres, user) > 0 and sessions_of(postgres, not_user) == 0


@dataclass
class EngineBroker:
    broker: RunningBroker
    values: list[str]
    """The catalog's other secret values."""


def start_engine_broker(
    private_vault: Vault,
    postgres: PasswordedPostgres,
    pki: Pki,
    start_broker: BrokerFactory,
    tmp_path: Path,
    handover: str,
    environ: Mapping[str, str] | None = None,
) -> EngineBroker:
    """A broker serving the catalog's secrets, its database users from the engine, logged in
    with the policy derived from its config only."""
    admin_password = secrets.token_urlsafe(18)
    prepare_postgres(postgres.superuser_url, admin_password)
    setup = DatabaseEngineSetup("database", "catalog", "127.0.0.1", postgres.port, "postgres")
    configure_engine(private_vault.admin, setup, admin_password, default_ttl="1h", max_ttl="2h")
    values = [secrets.token_urlsafe(32), secrets.token_urlsafe(16)]
    private_vault.write(API, jwt_secret=values[0])
    private_vault.write(EXTERNAL, tmdb_api_key=values[1])
    database = {"role": setup.role, "url": setup.url_template(), "handover": handover}
    secrets_: dict[str, Mapping[str, Any]] = {
        **CATALOG_SECRETS,
        DATABASE: {"keys": ["url"], "database": database},
    }
    config = parse_config(broker_settings(private_vault, pki, secrets_=secrets_), tmp_path, {})
    approle = create_broker_approle(
        private_vault.admin,
        write_policy(private_vault.admin, vault_policy(config), name="catalog-broker"),
        tmp_path / "approle",
    )
    broker = start_broker(
        private_vault,
        environ,
        secrets_=secrets_,
        auth=approle_auth(approle.role_id_file, approle.secret_id_file),
    )
    return EngineBroker(broker, values)


def test_twenty_user_rotations_under_load_fail_no_request_and_leave_no_user(
    private_vault: Vault,
    postgres: PasswordedPostgres,
    pki: Pki,
    start_broker: BrokerFactory,
    tmp_path: Path,
    measure: Measure,
) -> None:
    started = start_engine_broker(private_vault, postgres, pki, start_broker, tmp_path, "2s")
    broker, values = started.broker, started.values
    admin = broker.admin(pki.ops, pki.ca)
    # Every user the catalog is given, seen as the catalog sees it: their passwords must not
    # reach its output (catalog_service checks at its end).
    watch = Watch(broker.stub(pki.catalog, pki.ca), [DATABASE])
    served = [watch.next().data["url"]]
    passwords = [*values, str(urlsplit(served[0]).password)]

    with catalog_service(broker.port, pki, passwords) as catalog:
        tokens = [catalog.token("load")]

        def steps() -> None:
            for _ in range(ROTATIONS):
                old_user = str(urlsplit(served[-1]).username)
                issued = time.monotonic()
                rotated = admin.RotateSecret(
                    broker_pb2.RotateSecretRequest(name=DATABASE), timeout=30
                )
                served.append(watch.next().data["url"])
                passwords.append(str(urlsplit(served[-1]).password))
                catalog.wait_for(DATABASE, version=rotated.version)
                wait_until(
                    functools.partial(no_session_of, postgres, old_user),
                    30,
                    "the catalog's old pool to close",
                )
                measure(
                    "database user rotation: issue until the catalog's pool is all on the new"
                    " user (ms)",
                    (time.monotonic() - issued) * 1000,
                )
                time.sleep(0.2)

        under_load(catalog, tokens, steps)
        watch.cancel()
        current = str(urlsplit(served[-1]).username)
        # The old users are revoked a handover (2 s) after their successor: only the current one
        # is left, and the catalog is on it.
        wait_until(lambda: issued_users(postgres) == {current}, 20, "the old users revoked")
        assert len({urlsplit(url).username for url in served}) == ROTATIONS + 1
        assert sessions_of(postgres, current) > 0
    broker.stop()
    wait_until(lambda: not issued_users(postgres), 20, "the stopped broker's user revoked")


def test_a_query_that_outlives_the_handover_is_ended_with_a_503_and_the_next_requests_succeed(
    private_vault: Vault,
    postgres: PasswordedPostgres,
    pki: Pki,
    start_broker: BrokerFactory,
    tmp_path: Path,
) -> None:
    """The handover bounds how long a query on the old user may run: one still running when
    the old user is revoked is ended by the revocation (its session terminated), and its
    request is answered 503 naming that, not left hanging or a 500."""
    started = start_engine_broker(private_vault, postgres, pki, start_broker, tmp_path, "1s")
    admin = started.broker.admin(pki.ops, pki.ca)
    with catalog_service(started.broker.port, pki, started.values) as catalog:
        token = catalog.token("writer")
        assert catalog.add(token, "before") == 201
        old_user = next(iter(issued_users(postgres)))
        with psycopg.connect(postgres.superuser_url) as locker, ThreadPoolExecutor(1) as pool:
            locker.execute("LOCK TABLE media IN ACCESS EXCLUSIVE MODE")  # until rolled back
            stuck = pool.submit(http, "POST", f"{catalog.url}/media", token, {"title": "stuck"})
            wait_until(lambda: waiting_on_a_lock(postgres, old_user), 10, "the query to wait")
            admin.RotateSecret(broker_pb2.RotateSecretRequest(name=DATABASE), timeout=30)
            wait_until(lambda: old_user not in issued_users(postgres), 20, "the revocation")
            status, body = stuck.result(timeout=20)
            locker.rollback()
        assert (status, body) == (503, {"error": "database: the database failed (AdminShutdown)"})
        assert catalog.add(token, "after") == 201


def waiting_on_a_lock(postgres: PasswordedPostgres, user: str) -> bool:
    with psycopg.connect(postgres.superuser_url) as db:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND wait_event_type = 'Lock'",
            (user,),
        ).fetchone()
    return row is not None and row[0] > 0


def test_a_rollback_moves_the_catalog_to_the_url_from_env_and_back_with_no_failed_request(
    private_vault: Vault,
    postgres: PasswordedPostgres,
    pki: Pki,
    start_broker: BrokerFactory,
    tmp_path: Path,
) -> None:
    """The ADR's emergency switch still works for a database secret from the engine: rolled
    back, the catalog moves to the static URL from the broker's environment; cleared, back to
    the engine's user. Under load, 0 failed requests."""
    static_password = secrets.token_urlsafe(18)
    static_url = f"postgresql://catalog_static:{static_password}@127.0.0.1:{postgres.port}/postgres"
    environ = {"MEDIA_CATALOG_DATABASE_URL": static_url}
    started = start_engine_broker(
        private_vault, postgres, pki, start_broker, tmp_path, "2s", environ
    )
    create_static_user(postgres.superuser_url, "catalog_static", static_password)
    admin = started.broker.admin(pki.ops, pki.ca)
    engine_user = next(iter(issued_users(postgres)))
    with catalog_service(started.broker.port, pki, [*started.values, static_password]) as catalog:
        tokens = [catalog.token("load")]

        def steps() -> None:
            flips = (
                (
                    broker_pb2.SetRollbackOverrideRequest(
                        vault_enabled_categories=["api", "external"]
                    ),
                    "catalog_static",
                    engine_user,
                ),
                (None, engine_user, "catalog_static"),
            )
            for flip, now_on, now_off in flips:
                if flip is None:
                    admin.ClearRollbackOverride(
                        broker_pb2.ClearRollbackOverrideRequest(), timeout=10
                    )
                else:
                    admin.SetRollbackOverride(flip, timeout=10)
                wait_until(
                    functools.partial(only_sessions_of, postgres, now_on, now_off),
                    30,
                    f"the catalog's pool on {now_on} alone",
                )
                time.sleep(0.5)

        under_load(catalog, tokens, steps)
