"""The failover section of ``python -m bench``: a 3-node OpenBao raft cluster, two broker
replicas, catalog clients under load (devstack/ha.py, the rig the chaos tests use), and the
raft leader SIGKILLed. Measures what the catalog sees and how soon writes and watches recover,
then the Vault load per number of catalog clients against the per-pod-agent model."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from devstack.broker_config import approle_auth, broker_document
from devstack.ha import CatalogLoad, ClusterVault, LoadReport, start_cluster_vault
from devstack.harness import BrokerProcess, client_config, wait_until
from devstack.stack import CATALOG_SPIFFE_ID, OPS_SPIFFE_ID, issue_dev_certificates
from secretbroker.client import SecretsClient, secure_channel
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

POLICY = Path(__file__).parents[1] / "deploy" / "vault" / "policies" / "secretbroker-prod.hcl"
DATABASE = "media-catalog/database"
API = "media-catalog/api"
SECRETS = (DATABASE, API)
KEYS = ("value", "other")
TTL_SECONDS = 2.0
"""Each value's TTL in the brokers' caches: Vault is read all along, so the failover shows."""


@dataclass(frozen=True)
class FailoverSizes:
    steady_seconds: float
    after_seconds: float
    """Load kept up after the new leader, to see the tail settle."""
    load_clients: tuple[int, ...]
    load_seconds: float
    hung_seconds: float
    """How long every Vault node stays hung (SIGSTOP) in the hang block."""


FULL_FAILOVER = FailoverSizes(5.0, 5.0, (1, 10, 100), 20.0, 9.0)
QUICK_FAILOVER = FailoverSizes(1.0, 1.0, (1, 10), 4.0, 2.0)


@contextmanager
def failover_rig(workdir: Path) -> Iterator[tuple[ClusterVault, list[BrokerProcess], Any]]:
    values = {path: {key: secrets.token_urlsafe(16) for key in KEYS} for path in SECRETS}
    vault = start_cluster_vault(workdir, POLICY.read_text(), values)
    certs = issue_dev_certificates(workdir / "certs")
    document = broker_document(
        listen="127.0.0.1:0",
        server=certs.broker,
        client_ca=certs.ca,
        vault_address=vault.addresses,
        auth=approle_auth(vault.approle.role_id_file, vault.approle.secret_id_file),
        secrets={
            DATABASE: {"keys": list(KEYS), "ttl": TTL_SECONDS},
            API: {"keys": list(KEYS), "ttl": TTL_SECONDS, "rotation": {"key": "value"}},
        },
        access={CATALOG_SPIFFE_ID: ["media-catalog/*"]},
        vault={"timeout": "1s"},
        admin={"identities": [OPS_SPIFFE_ID]},
        rollout={"watch_poll_interval": "1s"},
        audit={"file": "audit.jsonl"},
        log={"level": "WARNING"},
    )
    replicas = [BrokerProcess(workdir / f"broker{i}", document).start() for i in range(2)]
    try:
        yield vault, replicas, certs
    finally:
        for replica in replicas:
            replica.stop()
        vault.stop()


def measure_failover(workdir: Path, sizes: FailoverSizes) -> dict[str, Any]:
    with failover_rig(workdir) as (vault, replicas, certs):
        endpoints = [replica.endpoint for replica in replicas]
        catalog = client_config(endpoints, certs.ca, certs.catalog)
        ops = client_config(endpoints, certs.ca, certs.ops)
        load = CatalogLoad(catalog, SECRETS).start(ready_timeout=60)
        time.sleep(sizes.steady_seconds)
        killed_at = time.time()
        leader = vault.cluster.leader()
        vault.cluster.kill(leader)
        rotated, rotation_recovered_s = _rotate_until_it_works(ops, killed_at)
        watcher_seen_s = _until_watcher_has(load, rotated.version, time.time())
        elected_at = _elected(vault)
        time.sleep(sizes.after_seconds)
        report = load.stop()
        result = {
            "failed_reads": len(report.failed),
            "reads": report.reads,
            "stale_reads": report.stale,
            "live_values_missing": report.live_missing,
            "versions_went_back": len(report.went_back),
            "replica_skew_reads": report.replica_skew,
            "leader_elected_after_s": elected_at - killed_at,
            "rotation_works_again_after_s": rotation_recovered_s,
            "watcher_sees_new_version_after_s": watcher_seen_s,
            **_latency_windows(report, killed_at, elected_at + 1.0),
        }
        result["vault_load"] = vault_load(replicas, catalog, sizes)
        result["all_nodes_hung"] = measure_hang(vault, replicas, catalog, sizes)
        return result


def measure_hang(
    vault: ClusterVault, replicas: list[BrokerProcess], catalog: Any, sizes: FailoverSizes
) -> dict[str, Any]:
    """Every running Vault node SIGSTOPped (a black-holed network) for ``hung_seconds``, values
    with a 2 s TTL, an SDK load and a plain grpcio load (NON_SDK_SERVICE_CONFIG); a third of the
    way in, replica 1 is restarted cold. Failed reads, and p99/max against the steady state
    before the hang, per client kind; and what the cold replica cost."""
    loads = {
        "sdk": CatalogLoad(catalog, SECRETS).start(ready_timeout=60),
        "plain": CatalogLoad(catalog, SECRETS, plain=True).start(ready_timeout=60),
    }
    time.sleep(sizes.steady_seconds)
    nodes = vault.cluster.running()
    hung_at = time.time()
    for node in nodes:
        vault.cluster.pause(node)
    try:
        time.sleep(sizes.hung_seconds / 3)
        cold_at = time.time()
        replicas[1].kill()
        replicas[1].start()
        time.sleep(sizes.hung_seconds * 2 / 3)
    finally:
        for node in nodes:
            vault.cluster.resume(node)
    resumed_at = time.time()
    vault.cluster.wait_serving()
    warm_after = _until_ready(replicas[1], resumed_at)
    time.sleep(1.0)
    reports = {kind: load.stop() for kind, load in loads.items()}
    return {
        "hung_seconds": sizes.hung_seconds,
        **{
            kind: {
                "failed_reads": len(report.failed),
                "reads": report.reads,
                "stale_reads": report.stale,
                **_latency_windows(report, hung_at, resumed_at, labels=("steady", "hung")),
                "cold_replica": _p99_max(_window(report, cold_at, resumed_at)),
            }
            for kind, report in reports.items()
        },
        "cold_replica_ready_after_resume_s": warm_after,
    }


def _until_ready(replica: BrokerProcess, since: float) -> float:
    """Seconds from ``since`` until the replica's /readyz answers 200 (it is warm)."""
    wait_until(
        lambda: replica.scrape("/readyz")[0] == 200, 60, "the cold replica ready", (OSError,)
    )
    return time.time() - since


def _rotate_until_it_works(
    ops: Any, killed_at: float
) -> tuple[broker_pb2.RotateSecretResponse, float]:
    """RotateSecret every 100 ms from the kill on: seconds until one succeeds. Each failure is
    a clean UNAVAILABLE (or ABORTED), never a second version."""
    channel = secure_channel(ops)
    admin = broker_pb2_grpc.SecretBrokerAdminStub(channel)

    def rotate() -> broker_pb2.RotateSecretResponse | None:
        try:
            return admin.RotateSecret(broker_pb2.RotateSecretRequest(name=API), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                raise
            return None

    try:
        rotated = wait_until(rotate, 60, "a rotation that works again", interval=0.1)
        return rotated, time.time() - killed_at
    finally:
        channel.close()


def _until_watcher_has(load: CatalogLoad, version: int, since: float) -> float:
    wait_until(lambda: load.live_version(API) >= version, 60, f"version {version}", interval=0.01)
    return time.time() - since


def _elected(vault: ClusterVault) -> float:
    vault.cluster.wait_serving()
    return time.time()


def _latency_windows(
    report: LoadReport,
    start: float,
    end: float,
    labels: tuple[str, str] = ("steady", "election"),
) -> dict[str, Any]:
    """GetSecret latency before ``start`` (steady) and from ``start`` to ``end`` (by default the
    kill to a second after the new leader: the election), p99 and max, in ms."""
    steady = [s for s, t in zip(report.latencies, report.ended_at, strict=True) if t < start]
    return {labels[0]: _p99_max(steady), labels[1]: _p99_max(_window(report, start, end))}


def _window(report: LoadReport, start: float, end: float) -> list[float]:
    return [s for s, t in zip(report.latencies, report.ended_at, strict=True) if start <= t <= end]


def _p99_max(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"p99_ms": 0.0, "max_ms": 0.0, "n": 0}
    ordered = sorted(seconds)
    return {
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "max_ms": ordered[-1] * 1000,
        "n": len(ordered),
    }


def vault_load(replicas: list[BrokerProcess], catalog: Any, sizes: FailoverSizes) -> dict[str, Any]:
    """Vault reads per minute with 1, 10, 100 catalog clients, each reading both secrets about
    10 times a second, against the per-pod-agent model (each client's own agent reads each
    secret once per TTL): the broker's stays at secrets x replicas / TTL."""
    rows = []
    for clients in sizes.load_clients:
        before = sum(replica.vault_reads() for replica in replicas)
        stop = threading.Event()
        threads = [
            threading.Thread(target=_catalog_client, args=(catalog, stop), daemon=True)
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(sizes.load_seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        reads = sum(replica.vault_reads() for replica in replicas) - before
        per_minute = reads * 60 / sizes.load_seconds
        rows.append(
            {
                "clients": clients,
                "broker_vault_reads_per_min": per_minute,
                "per_pod_agent_reads_per_min": clients * len(SECRETS) * 60 / TTL_SECONDS,
            }
        )
    return {
        "secrets": len(SECRETS),
        "replicas": len(replicas),
        "ttl_seconds": TTL_SECONDS,
        "model_broker_reads_per_min": len(SECRETS) * len(replicas) * 60 / TTL_SECONDS,
        "rows": rows,
    }


def _catalog_client(config: Any, stop: threading.Event) -> None:
    client = SecretsClient(config)
    try:
        while not stop.is_set():
            for name in SECRETS:
                client.get_secret(name)
            stop.wait(0.1)
    finally:
        client.close()
