"""Database secrets from OpenBao's database engine, against a real OpenBao and a real
PostgreSQL with password logins: the broker issues one user, renews its lease, succeeds it
before the role's max TTL, revokes the old user only after the handover, and a stopping
broker leaves no user behind. The broker's AppRole has only the policy derived from its
config (least privilege)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import hvac
import psycopg
import pytest

from broker.config_loader import parse_config
from broker.tools.vault_policy import vault_policy
from devstack.bootstrap import RoleTTLs, create_broker_approle, write_policy
from devstack.broker_config import approle_auth
from devstack.database_engine import (
    CREATION_STATEMENTS,
    REVOCATION_STATEMENTS,
    DatabaseEngineSetup,
    configure_engine,
    create_static_role,
    create_static_user,
    prepare_postgres,
)
from devstack.ha import ClusterVault
from devstack.harness import BrokerProcess, client_config, wait_until
from devstack.postgres import PasswordedPostgres, running_passworded_postgres
from secretbroker.client import LiveSecrets, Secret, SecretsClient
from secretbroker.v1 import broker_pb2, broker_pb2_grpc
from tests.support import (
    DATABASE,
    BrokerFactory,
    Pki,
    RunningBroker,
    Vault,
    VaultServers,
    Watch,
    broker_settings,
    get,
    metric,
    secure_channel,
)

ISSUED_USERS = "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%'"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PasswordedPostgres]:
    with running_passworded_postgres() as server:
        yield server


@dataclass
class Engine:
    vault: VaultServers
    admin: hvac.Client
    postgres: PasswordedPostgres
    setup: DatabaseEngineSetup

    def users(self) -> int:
        with psycopg.connect(self.postgres.superuser_url) as db:
            row = db.execute(ISSUED_USERS).fetchone()
        assert row is not None
        return int(row[0])

    def issued_users(self) -> set[str]:
        with psycopg.connect(self.postgres.superuser_url) as db:
            rows = db.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'").fetchall()
        return {str(row[0]) for row in rows}

    def valid_until(self, user: str) -> float | None:
        with psycopg.connect(self.postgres.superuser_url) as db:
            row = db.execute(
                "SELECT extract(epoch FROM rolvaliduntil) FROM pg_roles WHERE rolname = %s",
                (user,),
            ).fetchone()
        return None if row is None else float(row[0])


@pytest.fixture
def engine(private_vault: Vault, postgres: PasswordedPostgres) -> Iterator[Engine]:
    """One role per test (its own name), on a fresh OpenBao; no user left after the test."""
    with engine_on(private_vault, private_vault.admin, postgres) as found:
        yield found


@contextlib.contextmanager
def engine_on(
    vault: VaultServers, admin: hvac.Client, postgres: PasswordedPostgres
) -> Iterator[Engine]:
    role = f"catalog-{secrets.token_hex(3)}"
    admin_password = secrets.token_urlsafe(18)
    if not _prepared(postgres):
        prepare_postgres(postgres.superuser_url, admin_password)
    else:
        with psycopg.connect(postgres.superuser_url, autocommit=True) as db:
            db.execute(
                psycopg.sql.SQL("ALTER ROLE secretbroker_admin PASSWORD {}").format(
                    psycopg.sql.Literal(admin_password)
                )
            )
    setup = DatabaseEngineSetup("database", role, "127.0.0.1", postgres.port, "postgres")
    configure_engine(admin, setup, admin_password, default_ttl="3s", max_ttl="8s")
    found = Engine(vault, admin, postgres, setup)
    assert found.users() == 0, "a test before this one left users"
    yield found
    _drop_issued_users(postgres)  # OpenBao stops with the test, before it could revoke them


def _drop_issued_users(postgres: PasswordedPostgres) -> None:
    with psycopg.connect(postgres.superuser_url, autocommit=True) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename LIKE 'v-%'"
        )
        for (user,) in db.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'"
        ).fetchall():
            db.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(user)))


def _prepared(postgres: PasswordedPostgres) -> bool:
    with psycopg.connect(postgres.superuser_url) as db:
        row = db.execute("SELECT 1 FROM pg_roles WHERE rolname = 'secretbroker_admin'").fetchone()
    return row is not None


def engine_settings(
    engine: Engine,
    pki: Pki,
    tmp_path: Path,
    handover: str,
    ttls: RoleTTLs | None = None,
    *,
    static: bool = False,
) -> dict[str, Any]:
    """Settings of a broker serving DATABASE from the engine, logged in with the policy
    derived from them only."""
    database: dict[str, Any] = {
        "role": engine.setup.role,
        "url": engine.setup.url_template(),
        "handover": handover,
        "static": static,
    }
    secrets_ = {DATABASE: {"keys": ["url", "username", "expires_at"], "database": database}}
    config = parse_config(broker_settings(engine.vault, pki, secrets_=secrets_), tmp_path, {})
    approle = create_broker_approle(
        engine.admin,
        write_policy(engine.admin, vault_policy(config), name="database-broker"),
        tmp_path / "database-approle",
        ttls or RoleTTLs(),
    )
    auth = approle_auth(approle.role_id_file, approle.secret_id_file)
    return {"secrets_": secrets_, "auth": auth}


def start(
    engine: Engine,
    pki: Pki,
    tmp_path: Path,
    start_broker: BrokerFactory,
    handover: str,
    ttls: RoleTTLs | None = None,
) -> RunningBroker:
    return start_broker(engine.vault, **engine_settings(engine, pki, tmp_path, handover, ttls))


def set_role_ttls(engine: Engine, default_ttl: str, max_ttl: str) -> None:
    engine.admin.secrets.database.create_role(
        engine.setup.role,
        db_name="postgres-connection",
        creation_statements=CREATION_STATEMENTS,
        revocation_statements=REVOCATION_STATEMENTS,
        default_ttl=default_ttl,
        max_ttl=max_ttl,
        mount_point=engine.setup.mount,
    )


def lease_operations(broker: RunningBroker, operation: str, result: str) -> float:
    """The broker's count of one kind of lease operation on DATABASE, from its scrape."""
    return metric(
        broker,
        "secretbroker_database_lease_operations_total",
        secret=DATABASE,
        operation=operation,
        result=result,
    )


def logged_in_user(url: str) -> str:
    with psycopg.connect(url, connect_timeout=5) as db:
        row = db.execute("SELECT current_user, count(*) FROM media").fetchone()
    assert row is not None
    return str(row[0])


def test_the_served_user_logs_in_and_its_lease_is_renewed_while_served(
    engine: Engine, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    broker = start(engine, pki, tmp_path, start_broker, handover="2s")
    secret = get(broker.stub(pki.catalog, pki.ca), DATABASE)
    user = secret.data["username"]
    assert user.startswith("v-")
    assert logged_in_user(secret.data["url"]) == user, "the URL's password logs in"
    assert float(secret.data["expires_at"]) > time.time()
    first_valid_until = engine.valid_until(user)
    assert first_valid_until is not None
    # Each renewal (at 2 s of a 3 s lease) moves VALID UNTIL to 3 s (+5 s) from then.
    wait_until(lambda: (engine.valid_until(user) or 0) > first_valid_until + 1, 10, "a renewal")
    assert get(broker.stub(pki.catalog, pki.ca), DATABASE).data["username"] == user
    assert engine.users() == 1


def test_a_lease_near_its_max_ttl_is_succeeded_and_the_old_user_revoked_after_the_handover(
    engine: Engine,
    pki: Pki,
    tmp_path: Path,
    start_broker: BrokerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    broker = start(engine, pki, tmp_path, start_broker, handover="1s")
    watch = Watch(broker.stub(pki.catalog, pki.ca), [DATABASE])
    first = watch.next()
    old_user = first.data["username"]
    held = psycopg.connect(first.data["url"], autocommit=True)  # the old user's open session
    try:
        # Renewals at 2 s and 4 s get 3 s; the one at 6 s gets 2 s (max TTL 8 s): a successor.
        second = watch.next()
        served_at = time.monotonic()
        new_user = second.data["username"]
        assert new_user != old_user
        assert second.version > first.version
        assert logged_in_user(second.data["url"]) == new_user
        # Within the handover (1 s) the old user still works on its open session.
        assert held.execute("SELECT count(*) FROM media").fetchone() is not None
        assert engine.valid_until(old_user) is not None
        # Then it is revoked: its session ended, the user dropped.
        wait_until(lambda: engine.valid_until(old_user) is None, 15, "the old user's revocation")
        assert time.monotonic() - served_at >= 0.5, "revoked before the handover ended"
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT count(*) FROM media")
    finally:
        held.close()
        watch.cancel()

    def lease_records() -> list[dict[str, Any]]:
        records = [json.loads(line) for line in broker.audit_lines()]
        return [r for r in records if r["event"] == "database_lease"]

    def done() -> set[tuple[str, str]]:
        return {(r["operation"], r["user"]) for r in lease_records() if r["result"] == "ok"}

    # The trail is written by its own thread: the revocation's record may follow its effect.
    wait_until(lambda: ("revoke", old_user) in done(), 10, "the revocation's audit record")
    assert {("issue", old_user), ("renew", old_user), ("issue", new_user)} <= done()
    assert all(r["lease_id"].startswith("database/creds/") for r in lease_records())
    for operation, at_least in (("issue", 2), ("renew", 1), ("revoke", 1)):
        assert lease_operations(broker, operation, "ok") >= at_least, operation
    assert metric(broker, "secretbroker_database_leases_held", secret=DATABASE) == 1
    assert metric(broker, "secretbroker_database_lease_at_risk", secret=DATABASE) == 0
    expiry = metric(broker, "secretbroker_database_lease_expiry_timestamp_seconds", secret=DATABASE)
    assert expiry > time.time()
    logged = caplog.text + "".join(broker.audit_lines())
    assert old_user in caplog.text, "the log names the users"
    for served in (first, second):
        leaked = str(urlsplit(served.data["url"]).password) in logged  # no operand printed
        assert not leaked, "a password reached the log or the audit trail"


def test_a_new_broker_login_moves_the_credentials_to_a_lease_of_the_new_token(
    engine: Engine, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    """Leases die with the token that read them: before the old token ends (max TTL 6 s, so
    a new login at about 4 s), a successor is read with the new token, and the old user is
    revoked by the broker after the handover, not dropped with the old token."""
    set_role_ttls(engine, "60s", "120s")
    broker = start(engine, pki, tmp_path, start_broker, handover="1s", ttls=RoleTTLs("3s", "6s"))
    watch = Watch(broker.stub(pki.catalog, pki.ca), [DATABASE])
    try:
        first = watch.next()
        held = psycopg.connect(first.data["url"], autocommit=True)
        try:
            second = watch.next()
            assert second.data["username"] != first.data["username"]
            # The old user works until the broker revokes it, a handover after the successor.
            assert held.execute("SELECT count(*) FROM media").fetchone() is not None
        finally:
            held.close()
        wait_until(lambda: engine.valid_until(first.data["username"]) is None, 10, "revocation")
        assert logged_in_user(second.data["url"]) == second.data["username"]
    finally:
        watch.cancel()


def test_a_stopping_broker_leaves_no_database_user_behind(
    engine: Engine, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    broker = start(engine, pki, tmp_path, start_broker, handover="2s")
    user = get(broker.stub(pki.catalog, pki.ca), DATABASE).data["username"]
    assert engine.valid_until(user) is not None
    broker.stop()
    # Shortened to the handover at stop, then revoked by OpenBao at the lease's end.
    wait_until(lambda: engine.users() == 0, 20, "OpenBao to revoke the stopped broker's user")


def test_a_replica_killed_after_issuing_a_user_loses_no_query_and_leaves_no_user(
    engine: Engine, pki: Pki, tmp_path: Path
) -> None:
    """Two replicas, each with its own user. The watched one issues a new user and is killed
    before it revokes the old (between issue and handover): the watch resumes on the other
    replica with the version it holds, that replica issues a newer user, and the client never
    goes back a version. Queries (each on a new connection, with the URL held at that moment)
    never fail, and the dead replica's users end with their leases."""
    set_role_ttls(engine, "6s", "60s")  # a dead replica's users end at most 6 s after it
    document = broker_settings(engine.vault, pki, **engine_settings(engine, pki, tmp_path, "1s"))
    replicas = [BrokerProcess(tmp_path / f"broker{i}", document).start() for i in range(2)]
    users = {
        wait_until(functools.partial(user_of, replica, pki), 30, "a replica", (grpc.RpcError,)): (
            replica
        )
        for replica in replicas
    }
    failed: list[str] = []
    queries = 0
    try:
        config = client_config([r.endpoint for r in replicas], pki.ca, pki.catalog)
        with SecretsClient(config) as client, LiveSecrets(client, [DATABASE]) as live:
            live.wait_ready(timeout=10)
            watched = users[live.get_secret(DATABASE).data["username"]]
            other = next(r for r in replicas if r is not watched)
            admin = broker_pb2_grpc.SecretBrokerAdminStub(
                secure_channel(watched.port, pki.ca, pki.ops)
            )
            admin.RotateSecret(broker_pb2.RotateSecretRequest(name=DATABASE), timeout=10)
            newest = wait_until(lambda: newer_than(live, set(users)), 10, "the new user")
            watched.kill()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                held = live.get_secret(DATABASE)
                assert held.version >= newest.version, "went back a version"
                try:
                    logged_in_user(held.data["url"])
                    queries += 1
                except psycopg.Error as exc:
                    failed.append(type(exc).__name__)
            final = live.get_secret(DATABASE)
        assert final.version > newest.version, "the other replica issued a newer user"
        assert final.data["username"] == user_of(other, pki)
        assert queries > 20
        assert failed == [], f"{len(failed)} of {queries} queries failed"
        wait_until(
            lambda: engine.issued_users() == {final.data["username"]},
            20,
            "the killed replica's users to end with their leases, the other's old one revoked",
        )
    finally:
        for replica in replicas:
            replica.stop()


def user_of(replica: BrokerProcess, pki: Pki) -> str:
    """The user this replica serves now (a point read on it alone)."""
    stub = broker_pb2_grpc.SecretBrokerStub(secure_channel(replica.port, pki.ca, pki.catalog))
    return get(stub, DATABASE).data["username"]


def newer_than(live: LiveSecrets, users: set[str]) -> Secret | None:
    held = live.get_secret(DATABASE)
    return held if held.data["username"] not in users else None


@pytest.mark.ha
def test_renewals_and_new_users_go_on_across_a_raft_leader_kill(
    cluster_vault: ClusterVault,
    postgres: PasswordedPostgres,
    pki: Pki,
    tmp_path: Path,
    start_broker: BrokerFactory,
) -> None:
    """Renewals and issues are writes: they fail over to the new leader as the broker's other
    writes do. The served user lives on (its session too), and a new one can be issued."""
    with engine_on(cluster_vault, cluster_vault.admin(), postgres) as engine:
        set_role_ttls(engine, "12s", "120s")  # renewed every 8 s: across the election
        broker = start(engine, pki, tmp_path, start_broker, handover="1s")
        stub = broker.stub(pki.catalog, pki.ca)
        served = get(stub, DATABASE)
        held = psycopg.connect(served.data["url"], autocommit=True)
        try:
            renewed = functools.partial(lease_operations, broker, "renew", "ok")
            before = renewed()
            cluster_vault.cluster.kill(cluster_vault.cluster.leader())
            wait_until(lambda: renewed() > before, 30, "a renewal after the leader's death")
            assert get(stub, DATABASE).data["username"] == served.data["username"]
            assert held.execute("SELECT count(*) FROM media").fetchone() is not None
            admin = broker.admin(pki.ops, pki.ca)
            admin.RotateSecret(broker_pb2.RotateSecretRequest(name=DATABASE), timeout=30)
            new = get(stub, DATABASE)
            assert new.data["username"] != served.data["username"]
            assert logged_in_user(new.data["url"]) == new.data["username"]
        finally:
            held.close()


@pytest.mark.parametrize("dependency", ["vault", "postgres"])
def test_a_hung_dependency_delays_renewal_or_revocation_but_no_answer(
    engine: Engine,
    private_vault: Vault,
    pki: Pki,
    tmp_path: Path,
    start_broker: BrokerFactory,
    dependency: str,
) -> None:
    """OpenBao or PostgreSQL stopped (SIGSTOP) while a lease is due for renewal or revocation:
    the calls to it time out off the event loop and are retried; the broker answers at once
    all along, with the user it holds; once the dependency is back, the renewal lands, or the
    old user is revoked."""
    set_role_ttls(engine, "12s", "120s")  # renewed at 8 s, while hung; it ends at 12 s
    broker = start(engine, pki, tmp_path, start_broker, handover="1s")
    stub = broker.stub(pki.catalog, pki.ca)
    first = get(stub, DATABASE).data["username"]
    operation = "renew" if dependency == "vault" else "revoke"
    renewed = functools.partial(lease_operations, broker, operation, "failed")
    hung = private_vault.server if dependency == "vault" else engine.postgres
    if dependency == "postgres":  # a new user now: the old one is revoked 1 s later
        broker.admin(pki.ops, pki.ca).RotateSecret(
            broker_pb2.RotateSecretRequest(name=DATABASE), timeout=30
        )
    hung.pause()
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            # Within a deadline shorter than one Vault call may take (vault.call_budget, 3 s).
            assert get(stub, DATABASE, timeout=2).data["username"] != ""
            time.sleep(0.1)
        wait_until(lambda: renewed() > 0, 10, "the call to the hung dependency to fail")
    finally:
        hung.resume()
    if dependency == "vault":
        wait_until(lambda: lease_operations(broker, "renew", "ok") > 0, 30, "the renewal once back")
        assert get(stub, DATABASE).data["username"] == first
    else:
        wait_until(lambda: engine.valid_until(first) is None, 30, "the revocation once back")


def test_a_static_role_is_served_and_its_rotated_password_pushed(
    engine: Engine, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    """A static role: one existing user, whose password the engine rotates (every 5 s here).
    The broker reads it again when the rotation is due and pushes the new password; its policy
    reads the static role and nothing else of the engine."""
    user = f"static_{secrets.token_hex(3)}"
    create_static_user(engine.postgres.superuser_url, user, secrets.token_urlsafe(12))
    create_static_role(engine.admin, engine.setup, user, rotation_period=5)
    static = dataclasses.replace(
        engine, setup=dataclasses.replace(engine.setup, role=engine.setup.static_role)
    )
    broker = start_broker(engine.vault, **engine_settings(static, pki, tmp_path, "1s", static=True))
    watch = Watch(broker.stub(pki.catalog, pki.ca), [DATABASE])
    try:
        first = watch.next()
        assert first.data["username"] == user
        assert logged_in_user(first.data["url"]) == user
        second = watch.next()  # the engine's next rotation, read and pushed by the broker
        assert second.data["username"] == user
        assert second.version > first.version
        changed = second.data["url"] != first.data["url"]  # no password printed on failure
        assert changed, "the password did not change"
        assert logged_in_user(second.data["url"]) == user
        with pytest.raises(psycopg.OperationalError):
            logged_in_user(first.data["url"])  # no overlap: the old password stopped
    finally:
        watch.cancel()


def test_point_reads_spread_over_two_replicas_issue_no_new_users(
    engine: Engine, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    """Each replica serves its own user to point reads, and the SDK takes it: reads that
    alternate between replicas (round robin) do not make them issue users back and forth."""
    set_role_ttls(engine, "60s", "120s")
    settings = engine_settings(engine, pki, tmp_path, "1s")
    brokers = [start_broker(engine.vault, **settings) for _ in range(2)]
    config = client_config([f"127.0.0.1:{b.port}" for b in brokers], pki.ca, pki.catalog)
    with SecretsClient(config) as client:
        users = {client.get_secret(DATABASE).data["username"] for _ in range(20)}
    assert len(users) == 2, "both replicas answered, each with its own user"
    assert engine.issued_users() == users, "no user was issued for the reads"
