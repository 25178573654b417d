"""Database users from OpenBao's database engine, through the broker, into the catalog's pool.

A PostgreSQL with password logins and the engine on the rig's OpenBao (devstack's setup: a
non-superuser admin, revocation that ends sessions); a broker of its own serving the catalog's
secrets, ``media-catalog/database`` from the engine, logged in with the policy derived from
its config; the catalog service on it, under load from a worker process. ``database`` in
results.json:

- ``issue_ms``: RotateSecret on the database secret (the engine issues a user, the broker
  serves it and pushes it to watchers), p50 and p99; ``hvac_issue_ms``: the engine's issue
  called directly with hvac in the same run; ``issue_ratio``: the p50s' ratio.
- ``rotations`` in a row under load; ``failed_queries``: requests that failed meanwhile (must
  be 0); ``users_left``: issued users left after the handovers besides the one in use (must be
  0); ``switch_ms``: from the RotateSecret call until the catalog has no session of the old
  user (its pool is all on the new one), p50 and max.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import hvac
import psycopg

from bench.catalog import CatalogService, running_catalog
from bench.rig import Rig
from bench.stats import percentiles
from broker.config_loader import parse_config
from broker.tools.vault_policy import vault_policy
from devstack.bootstrap import create_broker_approle, write_policy
from devstack.broker_config import approle_auth, broker_document
from devstack.database_engine import DatabaseEngineSetup, configure_engine, prepare_postgres
from devstack.harness import (
    BrokerProcess,
    client_config,
    die_with_parent,
    stop_process,
    wait_until,
)
from devstack.postgres import PasswordedPostgres, running_passworded_postgres
from devstack.stack import CATALOG_SPIFFE_ID, OPS_SPIFFE_ID
from secretbroker.client import secure_channel
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

DATABASE = "media-catalog/database"
HANDOVER = "2s"
ISSUED = "SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'"


def measure_database(rig: Rig, rotations: int, issues: int) -> dict[str, Any]:
    with running_passworded_postgres() as postgres, _engine_broker(rig, postgres) as broker:
        admin = broker_pb2_grpc.SecretBrokerAdminStub(
            secure_channel(client_config(broker.endpoint, rig.certs.ca, rig.certs.ops))
        )
        rotate = broker_pb2.RotateSecretRequest(name=DATABASE)
        through_broker = []
        for _ in range(issues):
            started = time.perf_counter()
            admin.RotateSecret(rotate, timeout=30)
            through_broker.append((time.perf_counter() - started) * 1000)
        direct = _hvac_issues(rig, issues)
        with running_catalog(rig, broker.endpoint) as catalog:
            under_load = _rotations_under_load(rig, postgres, admin, catalog, rotations)
        time.sleep(_seconds(HANDOVER) + 1)  # the last old user's handover
        current = _current_user(rig, broker)
        left = sorted(_issued(postgres) - {current})
    issue = percentiles(through_broker)
    hvac_issue = percentiles(direct)
    return {
        "issue_ms": issue,
        "hvac_issue_ms": hvac_issue,
        "issue_ratio": issue["p50"] / hvac_issue["p50"],
        **under_load,
        "users_left": len(left),
        "handover_s": _seconds(HANDOVER),
    }


@contextlib.contextmanager
def _engine_broker(rig: Rig, postgres: PasswordedPostgres) -> Iterator[BrokerProcess]:
    admin_password = secrets.token_urlsafe(18)
    prepare_postgres(postgres.superuser_url, admin_password)
    setup = DatabaseEngineSetup("database", "catalog", "127.0.0.1", postgres.port, "postgres")
    vault = hvac.Client(url=rig.bao.address, token=rig.bao.root_token, timeout=30)
    configure_engine(vault, setup, admin_password, default_ttl="1h", max_ttl="2h")
    database = {"role": setup.role, "url": setup.url_template(), "handover": HANDOVER}
    secrets_: dict[str, dict[str, Any]] = {
        DATABASE: {"keys": ["url"], "category": "database", "database": database},
        "media-catalog/api": {"keys": ["jwt_secret"], "category": "jwt"},
        "media-catalog/external": {"keys": ["tmdb_api_key"], "category": "external"},
    }
    workdir = rig.workdir / "database-broker"

    def document(auth: dict[str, str]) -> dict[str, Any]:
        return broker_document(
            server=rig.certs.broker,
            client_ca=rig.certs.ca,
            vault_address=rig.bao.address,
            auth=auth,
            secrets=secrets_,
            access={CATALOG_SPIFFE_ID: ["media-catalog/*"]},
            log={"level": "WARNING"},
            audit={"file": str(workdir / "audit.jsonl")},
            admin={"identities": [OPS_SPIFFE_ID]},
        )

    # The policy comes from the config itself (any AppRole's files will do to parse it).
    unbound = document(approle_auth(rig.approle.role_id_file, rig.approle.secret_id_file))
    unbound["server"]["listen"] = "127.0.0.1:0"
    policy = vault_policy(parse_config(unbound, rig.workdir, environ={}))
    approle = create_broker_approle(
        vault,
        write_policy(vault, policy, name="bench-database-broker"),
        workdir / "approle",
        role="bench-database-broker",
    )
    vault.adapter.close()
    broker = BrokerProcess(
        workdir, document(approle_auth(approle.role_id_file, approle.secret_id_file))
    ).start()
    try:
        wait_until(lambda: _current_user(rig, broker), 60, "the database broker", (grpc.RpcError,))
        yield broker
    finally:
        broker.stop()


def _hvac_issues(rig: Rig, issues: int) -> list[float]:
    """The engine's issue without the broker (root token), each lease revoked after."""
    vault = hvac.Client(url=rig.bao.address, token=rig.bao.root_token, timeout=30)
    timings = []
    for _ in range(issues):
        started = time.perf_counter()
        issued = vault.secrets.database.generate_credentials("catalog")
        timings.append((time.perf_counter() - started) * 1000)
        vault.sys.revoke_lease(issued["lease_id"])
    vault.adapter.close()
    return timings


def _rotations_under_load(
    rig: Rig,
    postgres: PasswordedPostgres,
    admin: broker_pb2_grpc.SecretBrokerAdminStub,
    catalog: CatalogService,
    rotations: int,
) -> dict[str, Any]:
    load = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        die_with_parent(
            [
                sys.executable,
                "-m",
                "bench.workers",
                "catalog_load",
                json.dumps({"url": catalog.url, "token": catalog.token, "clients": 8}),
            ]
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    switches = []
    try:
        time.sleep(1.0)
        for _ in range(rotations):
            old = _sessions_by_user(postgres)
            started = time.monotonic()
            admin.RotateSecret(broker_pb2.RotateSecretRequest(name=DATABASE), timeout=30)
            wait_until(
                lambda old=old: not set(old) & set(_sessions_by_user(postgres)),  # type: ignore[misc]
                60,
                "the catalog's pool on the new user alone",
                interval=0.01,
            )
            switches.append((time.monotonic() - started) * 1000)
            time.sleep(0.3)
        output, _ = load.communicate("stop\n", timeout=60)
    finally:
        stop_process(load, timeout=15)
    outcomes: dict[str, int] = json.loads(output.strip().splitlines()[-1])["outcomes"]
    return {
        "rotations": rotations,
        "requests": sum(outcomes.values()),
        "failed_queries": sum(n for outcome, n in outcomes.items() if outcome != "ok"),
        "failures_by_kind": {k: n for k, n in outcomes.items() if k != "ok"},
        "switch_ms": {"p50": sorted(switches)[len(switches) // 2], "max": max(switches)},
    }


def _sessions_by_user(postgres: PasswordedPostgres) -> list[str]:
    with psycopg.connect(postgres.superuser_url) as db:
        rows = db.execute(
            "SELECT usename FROM pg_stat_activity WHERE usename LIKE 'v-%'"
        ).fetchall()
    return [str(row[0]) for row in rows]


def _issued(postgres: PasswordedPostgres) -> set[str]:
    with psycopg.connect(postgres.superuser_url) as db:
        return {str(row[0]) for row in db.execute(ISSUED).fetchall()}


def _current_user(rig: Rig, broker: BrokerProcess) -> str:
    config = client_config(broker.endpoint, rig.certs.ca, rig.certs.catalog)
    with secure_channel(config) as channel:
        answer = broker_pb2_grpc.SecretBrokerStub(channel).GetSecret(
            broker_pb2.GetSecretRequest(name=DATABASE), timeout=10
        )
    return str(urlsplit(answer.secret.data["url"]).username)


def _seconds(duration: str) -> float:
    return float(duration.rstrip("s"))
