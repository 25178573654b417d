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
from collections.abc import Callable, Mapping
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
from secretbroker.client import ENV_PREFIX, BrokerClientConfig, SecretsClient

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


def dev_broker_document(
    vault_addr: str | list[str],
    certs: DevCertificates,
    role: AppRoleFiles,
    state_dir: Path,
) -> dict[str, Any]:
    """A dev broker's config; BrokerProcess gives it free loopback ports."""
    return broker_document(
        server=certs.broker,
        client_ca=certs.ca,
        vault_address=vault_addr
        if isinstance(vault_addr, str) or len(vault_addr) > 1
        else vault_addr[0],
        auth=approle_auth(role.role_id_file, role.secret_id_file),
        secrets=DEV_SECRETS,
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


def run_dev_stack(state_dir: Path, ha: bool = False) -> int:
    """The dev stack; with ``ha``, a 3-node OpenBao raft cluster and two broker replicas that
    the catalog spreads its calls over."""
    configure_logging("INFO")
    state_dir = state_dir.resolve()
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(mode=0o700, parents=True)
    # Both stop the stack, even when started with SIGINT ignored (a background job, nohup).
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    vault: DevVault | None = None
    children: dict[str, BrokerProcess | CatalogProcess] = {}
    try:
        vault = start_dev_vault(state_dir, ha)
        admin = hvac.Client(url=vault.addresses[0], token=vault.root_token, timeout=5)
        role = create_broker_approle(admin, [BROKER_POLICY], state_dir / "approle")
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
                dev_broker_document(vault.addresses, certs, role, folder),
                environ=rollback_environment(database_url),
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
        banner = _banner(vault, brokers, certs, role.role_id_file.parent, catalog_url)
        print(banner, flush=True)  # noqa: T201 - the dev stack talks to its user
        while True:
            for name, child in children.items():
                if child.exited() is not None:
                    log.error("the %s exited with code %s", name, child.exited())
                    return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        for child in reversed(children.values()):
            child.stop()
        if vault is not None:
            vault.stop()
        log.info("dev stack stopped")


def rollback_environment(database_url: str) -> dict[str, str]:
    """What the broker serves when ops roll a category back to environment variables: fresh
    random values, except the database URL, so the catalog keeps its data through a flip."""
    return {
        variable_name(name, key): database_url if key == "url" else random_token()
        for name, keys in dev_secret_values(database_url).items()
        for key in keys
    }


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
  {python} -m broker rollback clear
Press Ctrl-C to stop everything."""


def _show_catalog_config(listen: str, certs: DevCertificates) -> None:
    """Read the catalog's Config through the broker, as the catalog would; say what came back."""
    client_config = BrokerClientConfig.from_env(client_env(listen, certs.ca, certs.catalog))
    with contextlib.closing(SecretsClient(client_config)) as client:
        client.wait_until_connected(timeout=30)
        config = Config(client)
        for prop in CONFIG_PROPERTIES:
            value = getattr(config, prop)
            log.info("catalog read Config.%s through the broker (%d characters)", prop, len(value))
