"""``python -m devstack`` (``make dev``): OpenBao, bootstrapped like production, a broker over
mTLS, and the catalog reading its Config through it. Ctrl-C stops everything; re-running starts
afresh."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import hvac

from broker.config_loader import load_config
from broker.observe.logs import configure_logging
from broker.sources.env import variable_name
from broker.tools.vault_policy import vault_policy
from catalog.config import CONFIG_PROPERTIES, Config
from devstack.bootstrap import (
    BROKER_POLICY,
    AppRoleFiles,
    create_broker_approle,
    dev_secret_values,
    ensure_kv2_mount,
    random_token,
    seed_secrets,
    write_policy,
)
from devstack.broker_config import approle_auth, broker_document
from devstack.cluster import OpenBaoCluster
from devstack.database_engine import (
    DatabaseEngineSetup,
    configure_engine,
    create_static_user,
    prepare_postgres,
)
from devstack.harness import (
    BrokerProcess,
    die_with_parent,
    free_port_pair,
    scrape,
    stop_process,
    wait_until,
)
from devstack.openbao import OpenBaoDevServer
from devstack.pki import CertFiles, DevCA, issue_loopback_server
from devstack.postgres import running_passworded_postgres
from secretbroker.client import (
    ENV_PREFIX,
    BrokerClientConfig,
    LiveSecrets,
    SecretChange,
    SecretsClient,
)

log = logging.getLogger("devstack")

KV_MOUNT = "secret"
BROKER_SPIFFE_ID = "spiffe://media.local/broker"
CATALOG_SPIFFE_ID = "spiffe://media.local/catalog"
OPS_SPIFFE_ID = "spiffe://media.local/ops"


@dataclass(frozen=True)
class DevCertificates:
    ca: Path
    broker: CertFiles
    catalog: CertFiles
    ops: CertFiles


def issue_dev_certificates(directory: Path) -> DevCertificates:
    ca = DevCA("secretbroker dev CA")
    return DevCertificates(
        ca=ca.write_ca(directory / "ca.pem"),
        broker=issue_loopback_server(ca, directory, uri=BROKER_SPIFFE_ID),
        catalog=ca.issue_files(directory, "catalog", "catalog", uri=CATALOG_SPIFFE_ID),
        ops=ca.issue_files(directory, "ops", "ops", uri=OPS_SPIFFE_ID),
    )


DEV_SECRETS: dict[str, dict[str, Any]] = {
    "media-catalog/database": {"keys": ["url", "password"]},
    "media-catalog/api": {
        "keys": ["jwt_secret", "session_secret"],
        "ttl": "1m",
        "rotation": {"key": "jwt_secret", "period": "7d"},
    },
    "media-catalog/external": {"keys": ["tmdb_api_key"]},
}


@dataclass(frozen=True)
class DevDatabase:
    """``--postgres``: PostgreSQL, its users issued by OpenBao's database engine."""

    setup: DatabaseEngineSetup
    static_url: str
    """A fixed user's URL: what a rollback of the database category serves from env."""


STATIC_USER = "catalog_static"


def start_dev_database(stack: contextlib.ExitStack, admin: hvac.Client) -> DevDatabase:
    server = stack.enter_context(running_passworded_postgres())
    admin_password, static_password = random_token(), random_token()
    prepare_postgres(server.superuser_url, admin_password)
    create_static_user(server.superuser_url, STATIC_USER, static_password)
    setup = DatabaseEngineSetup("database", "catalog", "127.0.0.1", server.port, "postgres")
    configure_engine(admin, setup, admin_password, default_ttl="1h", max_ttl="24h")
    log.info("PostgreSQL on 127.0.0.1:%d, users issued by OpenBao's database engine", server.port)
    return DevDatabase(
        setup, f"postgresql://{STATIC_USER}:{static_password}@127.0.0.1:{server.port}/postgres"
    )


def dev_broker_document(
    vault_addr: str | list[str],
    certs: DevCertificates,
    role: AppRoleFiles,
    state_dir: Path,
    database: DevDatabase | None = None,
) -> dict[str, Any]:
    """A dev broker's config; BrokerProcess gives it free loopback ports."""
    secrets_ = dict(DEV_SECRETS)
    if database is not None:
        secrets_["media-catalog/database"] = {
            "keys": ["url", "username"],
            "database": {
                "role": database.setup.role,
                "url": database.setup.url_template(),
                "handover": "10s",
            },
        }
    return broker_document(
        server=certs.broker,
        client_ca=certs.ca,
        vault_address=vault_addr
        if isinstance(vault_addr, str) or len(vault_addr) > 1
        else vault_addr[0],
        auth=approle_auth(role.role_id_file, role.secret_id_file),
        secrets=secrets_,
        access={CATALOG_SPIFFE_ID: ["media-catalog/*"]},
        vault={"mount": KV_MOUNT, "timeout": "2s"},
        cache={"default_ttl": "5m", "max_stale": "1h"},
        audit={"file": str(state_dir / "audit.jsonl")},
        admin={
            "identities": [OPS_SPIFFE_ID],
            "state_file": str(state_dir / "rollback-override.json"),
        },
        rollout={"watch_poll_interval": "2s"},
    )


CONFIG_HEADER = "Written by `python -m devstack`; see deploy/broker.example.toml for every key."


class CatalogProcess:
    """``python -m catalog serve`` as its own process, its output on this terminal."""

    def __init__(self, listen: str, environ: Mapping[str, str]) -> None:
        self.listen = listen
        self._environ = environ
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CatalogProcess:
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            die_with_parent([sys.executable, "-m", "catalog", "serve", "--listen", self.listen]),
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self._environ},
        )
        return self

    def answers(self, path: str) -> bool:
        """Whether GET ``path`` answers; raises when the process has exited."""
        if self.exited() is not None:
            raise RuntimeError(f"the catalog service exited with code {self.exited()}")
        try:
            return scrape(int(self.listen.rsplit(":", 1)[1]), path)[0] == 200
        except OSError:
            return False

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> int | None:
        return stop_process(self.process)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@dataclass
class DevVault:
    """The dev stack's Vault: one OpenBao dev server, or (``--ha``) a 3-node raft cluster."""

    addresses: list[str]
    root_token: str
    stop: Callable[[], None]
    banner: Callable[[], str]


def start_dev_vault(state_dir: Path, ha: bool) -> DevVault:
    if not ha:
        bao = OpenBaoDevServer(state_dir / "openbao", root_token=secrets.token_hex(16))
        bao.start()
        log.info("OpenBao dev server at %s (its log: %s)", bao.address, bao.log_path)
        admin = hvac.Client(url=bao.address, token=bao.root_token, timeout=5)
        ensure_kv2_mount(admin, KV_MOUNT)
        admin.adapter.close()
        return DevVault(
            [bao.address],
            bao.root_token,
            bao.stop,
            lambda: f"  OpenBao (Vault API)  {bao.address}   log: {bao.log_path}",
        )
    cluster = OpenBaoCluster(state_dir / "openbao-cluster")
    cluster.start()
    try:
        cluster.enable_kv2(KV_MOUNT)
    except BaseException:
        cluster.stop()
        raise
    log.info("OpenBao raft cluster: %s", ", ".join(cluster.addresses))
    return DevVault(
        cluster.addresses, cluster.root_token, cluster.stop, lambda: _cluster_lines(cluster)
    )


def _cluster_lines(cluster: OpenBaoCluster) -> str:
    leader = cluster.leader()
    lines = [
        f"  OpenBao node {node.node_id}  {node.address}   pid {node.pid}"
        f"{'   (leader now)' if node is leader else ''}   log: {node.log_path}"
        for node in cluster.nodes
    ]
    lines.append(
        f"  Kill a node to see failover (a new leader in ~2 s; reads go on): kill -9 {leader.pid}"
    )
    lines.append(
        f"  or hang it past an election: kill -STOP {leader.pid}; later kill -CONT {leader.pid}"
    )
    return "\n".join(lines)


def run_dev_stack(state_dir: Path, ha: bool = False, postgres: bool = False) -> int:
    """The dev stack; with ``ha``, a 3-node OpenBao raft cluster and two broker replicas that
    the catalog spreads its calls over; with ``postgres``, the catalog on PostgreSQL with users
    issued by OpenBao's database engine (and each new user logged)."""
    configure_logging("INFO")
    state_dir = state_dir.resolve()
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(mode=0o700, parents=True)
    # Both stop the stack, even when started with SIGINT ignored (a background job, nohup).
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    vault: DevVault | None = None
    children: dict[str, BrokerProcess | CatalogProcess] = {}
    stack = contextlib.ExitStack()  # PostgreSQL: stopped last
    watching = contextlib.ExitStack()  # the user logger: stopped first, before its broker
    try:
        vault = start_dev_vault(state_dir, ha)
        admin = hvac.Client(url=vault.addresses[0], token=vault.root_token, timeout=5)
        role = create_broker_approle(admin, [BROKER_POLICY], state_dir / "approle")
        database = start_dev_database(stack, admin) if postgres else None
        database_url = f"sqlite:///{state_dir / 'media-catalog.db'}"
        seed_secrets(admin, KV_MOUNT, dev_secret_values(database_url))
        certs = issue_dev_certificates(state_dir / "certs")
        brokers: dict[str, BrokerProcess] = {}
        for index in range(2 if ha else 1):
            name = f"broker-{index + 1}" if ha else "broker"
            folder = state_dir / name if ha else state_dir
            folder.mkdir(mode=0o700, exist_ok=True)
            brokers[name] = BrokerProcess(
                folder,
                dev_broker_document(vault.addresses, certs, role, folder, database),
                environ=rollback_environment(database_url, database),
                to_terminal=True,
                header=CONFIG_HEADER,
            )
        # The broker's Vault policy, derived from the config it runs with.
        first = next(iter(brokers.values()))
        write_policy(admin, vault_policy(load_config(first.config, {})))
        admin.adapter.close()
        for name, broker in brokers.items():
            children[name] = broker.start()
        endpoints = ",".join(broker.endpoint for broker in brokers.values())
        _show_catalog_config(endpoints, certs)
        catalog_url = f"127.0.0.1:{free_port_pair()}"
        catalog = children["catalog service"] = CatalogProcess(
            catalog_url, client_env(endpoints, certs.ca, certs.catalog)
        ).start()
        wait_until(lambda: catalog.answers("/healthz"), 60, f"the catalog service at {catalog_url}")
        banner = _banner(vault, brokers, certs, role.role_id_file.parent, catalog_url, database)
        print(banner, flush=True)  # noqa: T201 - the dev stack talks to its user
        if database is not None:
            watching.enter_context(_logging_database_users(endpoints, certs))
        while True:
            for name, child in children.items():
                if child.exited() is not None:
                    log.error("the %s exited with code %s", name, child.exited())
                    return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        watching.close()
        for child in reversed(children.values()):
            child.stop()
        if vault is not None:
            vault.stop()
        stack.close()
        log.info("dev stack stopped")


def rollback_environment(database_url: str, database: DevDatabase | None = None) -> dict[str, str]:
    """What the broker serves when ops roll a category back to environment variables: fresh
    random values, except the database URL, so the catalog keeps its data through a flip (with
    PostgreSQL: a fixed user's URL)."""
    environ = {
        variable_name(name, key): database_url if key == "url" else random_token()
        for name, keys in dev_secret_values(database_url).items()
        for key in keys
    }
    if database is not None:
        environ[variable_name("media-catalog/database", "url")] = database.static_url
        environ[variable_name("media-catalog/database", "username")] = STATIC_USER
    return environ


@contextlib.contextmanager
def _logging_database_users(endpoints: str, certs: DevCertificates) -> Iterator[None]:
    """Say which PostgreSQL user the catalog is given, now and at every change."""
    config = BrokerClientConfig.from_env(client_env(endpoints, certs.ca, certs.catalog))
    with SecretsClient(config) as client, LiveSecrets(client, ["media-catalog/database"]) as live:

        def say(change: SecretChange) -> None:
            log.info(
                "the catalog's database user is now %s (was %s)",
                change.current.data["username"],
                change.previous.data["username"],
            )

        live.wait_ready(timeout=30)
        log.info(
            "the catalog's database user is %s",
            live.get_secret("media-catalog/database").data["username"],
        )
        live.on_change(say)
        yield


def client_env(listen: str, ca: Path, client: CertFiles) -> dict[str, str]:
    """The SECRETBROKER_* settings a client with certificate ``client`` uses."""
    return {
        f"{ENV_PREFIX}ADDR": listen,
        f"{ENV_PREFIX}CA_FILE": str(ca),
        f"{ENV_PREFIX}CERT_FILE": str(client.cert),
        f"{ENV_PREFIX}KEY_FILE": str(client.key),
    }


def _shell_env(env: dict[str, str]) -> str:
    return " \\\n  ".join(f"{key}={value}" for key, value in env.items())


def _banner(
    vault: DevVault,
    brokers: Mapping[str, BrokerProcess],
    certs: DevCertificates,
    role_dir: Path,
    catalog_url: str,
    database: DevDatabase | None = None,
) -> str:
    python = sys.executable
    endpoints = ",".join(broker.endpoint for broker in brokers.values())
    catalog = _shell_env(client_env(endpoints, certs.ca, certs.catalog))
    ops = _shell_env(client_env(endpoints, certs.ca, certs.ops))
    broker_lines = "\n".join(
        f"  {name + ' (gRPC, mTLS)':<22}{broker.endpoint}   config: {broker.config}\n"
        f"  {name + ' metrics':<22}http://{broker.metrics_endpoint}/metrics"
        "   (also /healthz, /readyz)\n"
        f"  {name + ' audit trail':<22}{broker.workdir / 'audit.jsonl'}"
        for name, broker in brokers.items()
    )
    return f"""
Dev stack is up. Nothing below is a secret value.
{vault.banner()}
{broker_lines}
  catalog service      http://{catalog_url}   (GET /healthz, GET /media, POST /media)
  dev certificates     {certs.ca.parent}/  (CA ca.pem; clients catalog.pem, ops.pem)
  broker AppRole       {role_dir}/
As the catalog, from another terminal (config, or a token for POST /media):
  export {catalog}
  {python} -m catalog config
  curl -H "Authorization: Bearer $({python} -m catalog token --sub me)" \\
    --json '{{"title": "Heat", "year": 1995}}' http://{catalog_url}/media
  (the API: http://{catalog_url}/docs)
As ops (rollback to env vars, rotate the JWT key; status and rollback reach every replica):
  export {ops}
  {python} -m broker status
  {python} -m broker rotate media-catalog/api
  {python} -m broker rollback set '["database", "external"]'   # api from env vars
  {python} -m broker rollback clear{_database_lines(database, python)}
Press Ctrl-C to stop everything."""


def _database_lines(database: DevDatabase | None, python: str) -> str:
    if database is None:
        return ""
    return f"""
PostgreSQL on 127.0.0.1:{database.setup.port}, one user per broker from OpenBao's database engine
(this terminal logs each new one; the old is revoked 10 s later). A new user now, as ops:
  {python} -m broker rotate media-catalog/database"""


def _show_catalog_config(listen: str, certs: DevCertificates) -> None:
    """Read the catalog's Config through the broker, as the catalog would; say what came back."""
    client_config = BrokerClientConfig.from_env(client_env(listen, certs.ca, certs.catalog))
    with contextlib.closing(SecretsClient(client_config)) as client:
        client.wait_until_connected(timeout=30)
        config = Config(client)
        for prop in CONFIG_PROPERTIES:
            value = getattr(config, prop)
            log.info("catalog read Config.%s through the broker (%d characters)", prop, len(value))
