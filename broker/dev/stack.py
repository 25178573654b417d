"""``python -m broker dev``: OpenBao, bootstrapped like production, a broker over mTLS, and the
catalog reading its Config through it. Ctrl-C stops everything; re-running starts afresh."""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import hvac

from broker.dev.bootstrap import (
    create_broker_approle,
    dev_secret_values,
    ensure_kv2_mount,
    seed_secrets,
    write_policies,
)
from broker.dev.openbao import OpenBaoDevServer, die_with_parent, free_port_pair
from broker.dev.pki import CertFiles, DevCA, issue_loopback_server
from broker.logs import configure_logging
from catalog.config import Config
from catalog.secrets import BrokerClientConfig, SecretsClient

log = logging.getLogger("broker.dev")

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


def broker_toml(
    listen: str, vault_addr: str, certs: DevCertificates, role_dir: Path, state_dir: Path
) -> str:
    return f"""\
# Written by `python -m broker dev`; see deploy/broker.example.toml for every key.
[server]
listen = "{listen}"
cert_file = "{certs.broker.cert}"
key_file = "{certs.broker.key}"
client_ca_file = "{certs.ca}"

[vault]
address = "{vault_addr}"
mount = "{KV_MOUNT}"
timeout = "2s"

[vault.auth]
method = "approle"
role_id_file = "{role_dir / "role_id"}"
secret_id_file = "{role_dir / "secret_id"}"

[cache]
default_ttl = "5m"
max_stale = "1h"

[audit]
file = "{state_dir / "audit.jsonl"}"

[admin]
identities = ["{OPS_SPIFFE_ID}"]
state_file = "{state_dir / "rollback-override.json"}"

[rollout]
watch_poll_interval = "2s"

[secrets."media-catalog/database"]
keys = ["url", "password"]
[secrets."media-catalog/api"]
keys = ["jwt_secret", "session_secret"]
ttl = "1m"
rotation = {{ key = "jwt_secret", period = "7d" }}
[secrets."media-catalog/external"]
keys = ["tmdb_api_key"]

[access]
"{CATALOG_SPIFFE_ID}" = ["media-catalog/*"]
"""


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def run_dev_stack(state_dir: Path) -> int:
    configure_logging("INFO")
    state_dir = state_dir.resolve()
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(mode=0o700, parents=True)
    signal.signal(signal.SIGTERM, _raise_stop)
    bao = OpenBaoDevServer(state_dir / "openbao", root_token=secrets.token_hex(16))
    broker: subprocess.Popen[bytes] | None = None
    try:
        bao.start()
        log.info("OpenBao dev server at %s (its log: %s)", bao.address, bao.log_path)
        admin = hvac.Client(url=bao.address, token=bao.root_token, timeout=5)
        ensure_kv2_mount(admin, KV_MOUNT)
        role = create_broker_approle(admin, write_policies(admin), state_dir / "approle")
        seed_secrets(
            admin, KV_MOUNT, dev_secret_values(f"sqlite:///{state_dir / 'media-catalog.db'}")
        )
        admin.adapter.close()
        certs = issue_dev_certificates(state_dir / "certs")
        listen = f"127.0.0.1:{free_port_pair()}"
        config_path = state_dir / "broker.toml"
        config_path.write_text(
            broker_toml(listen, bao.address, certs, role.role_id_file.parent, state_dir)
        )
        broker = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "broker", "serve", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        _show_catalog_config(listen, certs)
        print(  # noqa: T201 - the dev stack talks to its user
            f"""
Dev stack is up. Nothing below is a secret value.
  OpenBao (Vault API)  {bao.address}   log: {bao.log_path}
  broker (gRPC, mTLS)  {listen}   config: {config_path}
  dev certificates     {certs.ca.parent}/  (CA ca.pem; catalog client catalog.pem)
  broker AppRole       {role.role_id_file.parent}/
See the catalog's view again, from another terminal:
  SECRETBROKER_ADDR={listen} SECRETBROKER_CA_FILE={certs.ca} \\
  SECRETBROKER_CERT_FILE={certs.catalog.cert} \\
  SECRETBROKER_KEY_FILE={certs.catalog.key} \\
  {sys.executable} -m catalog config
Press Ctrl-C to stop everything.""",
            flush=True,
        )
        while broker.poll() is None:
            time.sleep(0.5)
        log.error("the broker exited with code %s", broker.returncode)
        return 1
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        if broker is not None and broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
        bao.stop()
        log.info("dev stack stopped")


def _show_catalog_config(listen: str, certs: DevCertificates) -> None:
    """Read the catalog's Config through the broker, as the catalog would; say what came back."""
    client_config = BrokerClientConfig(
        target=listen, ca_file=certs.ca, cert_file=certs.catalog.cert, key_file=certs.catalog.key
    )
    with contextlib.closing(SecretsClient(client_config)) as client:
        client.wait_until_connected(timeout=30)
        config = Config(client)
        for prop in ("database_url", "jwt_secret_key", "tmdb_api_key"):
            value = getattr(config, prop)
            log.info("catalog read Config.%s through the broker (%d characters)", prop, len(value))
