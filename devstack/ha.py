"""The HA rig: a bootstrapped OpenBao raft cluster, broker replicas as real processes, and
catalog clients under continuous load that count every failed read.

Shared by the HA chaos tests and the benchmark's failover section, so both measure the same
thing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import hvac

from devstack.bootstrap import AppRoleFiles, RoleTTLs, create_broker_approle, write_policy
from devstack.cluster import OpenBaoCluster
from devstack.harness import wait_until
from secretbroker.client import (
    BrokerClientConfig,
    LiveSecrets,
    Secret,
    SecretBrokerError,
    SecretsClient,
    SecretSource,
    SecretUnavailable,
    channel_credentials,
    channel_target,
    secret_from_message,
)
from secretbroker.v1 import broker_pb2, broker_pb2_grpc


@dataclass
class ClusterVault:
    """A 3-node OpenBao raft cluster with KV v2, the broker's policy and AppRole, and secrets."""

    cluster: OpenBaoCluster
    approle: AppRoleFiles

    @property
    def addresses(self) -> list[str]:
        return self.cluster.addresses

    def admin(self) -> hvac.Client:
        """A root client on the current leader (ask again after a failover)."""
        return hvac.Client(url=self.cluster.leader().address, token=self.cluster.root_token)

    def write(self, path: str, mount: str = "secret", **data: str) -> int:
        response = self.admin().secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, mount_point=mount
        )
        return int(response["data"]["version"])

    def stop(self) -> None:
        self.cluster.stop()


def start_cluster_vault(
    workdir: Path,
    policy: str,
    secrets_: Mapping[str, Mapping[str, str]],
    mount: str = "secret",
    ttls: RoleTTLs | None = None,
) -> ClusterVault:
    cluster = OpenBaoCluster(workdir / "cluster")
    cluster.start()
    try:
        cluster.enable_kv2(mount)
        admin = hvac.Client(url=cluster.leader().address, token=cluster.root_token)
        approle = create_broker_approle(
            admin, write_policy(admin, policy), workdir / "approle-credentials", ttls or RoleTTLs()
        )
        started = ClusterVault(cluster, approle)
        for path, data in secrets_.items():
            started.write(path, mount, **data)
        return started
    except BaseException:
        cluster.stop()
        raise


NON_SDK_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "secretbroker.v1.SecretBroker", "method": "GetSecret"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}
"""What the README tells clients without the SDK (Go, Java, Node) to configure: round_robin
and a retry of GetSecret on UNAVAILABLE and CANCELLED (gRPC core cancels a call that reached
a stopping broker but was not yet dispatched); no client-side health checking, which many do
not have."""
NON_SDK_DEADLINE = 3.0


class PlainClient:
    """GetSecret over a plain grpcio channel configured as NON_SDK_SERVICE_CONFIG: how a client
    in another language sees the brokers. Same ``get_secret`` as the SDK's, for CatalogLoad."""

    def __init__(self, config: BrokerClientConfig) -> None:
        target = channel_target(config.target)
        options: list[tuple[str, str | int]] = [
            ("grpc.service_config", json.dumps(NON_SDK_SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
        ]
        if config.server_name is None and target.startswith("ipv4:"):
            options.append(("grpc.ssl_target_name_override", "127.0.0.1"))
        credentials = channel_credentials(config.ca_file, config.cert_file, config.key_file)
        self._channel = grpc.secure_channel(target, credentials, options)
        self._stub = broker_pb2_grpc.SecretBrokerStub(self._channel)

    def get_secret(self, name: str) -> Secret:
        request = broker_pb2.GetSecretRequest(name=name)
        try:
            response = self._stub.GetSecret(request, timeout=NON_SDK_DEADLINE)
        except grpc.RpcError as exc:
            raise SecretUnavailable(name, exc.code(), exc.details() or "") from None
        return secret_from_message(response.secret)

    def close(self) -> None:
        self._channel.close()


@dataclass
class LoadReport:
    reads: int = 0
    failed: list[str] = field(default_factory=list)
    """Each failed GetSecret: the secret and the status code (never a value)."""
    stale: int = 0
    went_back: list[str] = field(default_factory=list)
    """Each time LiveSecrets held a lower Vault version than it had held before."""
    replica_skew: int = 0
    """GetSecret answers with a lower version than the same reader had seen: replicas cache
    independently, so for up to a TTL after a change one may answer the new version and
    another the old. Measured, not a failure: a point read is whichever replica answers;
    LiveSecrets is the monotonic view."""
    live_missing: int = 0
    """LiveSecrets lookups that raised: a value the catalog did not have."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per successful GetSecret, with the wall time it ended at."""
    ended_at: list[float] = field(default_factory=list)


class CatalogLoad:
    """Catalog clients under continuous load, as the chaos tests want them: ``readers`` threads
    calling GetSecret through the SDK, and one LiveSecrets kept current by WatchSecrets and
    read in a loop. Every failed read is recorded; versions must never go back."""

    def __init__(
        self,
        config: BrokerClientConfig,
        names: Sequence[str],
        readers: int = 2,
        pause: float = 0.005,
        plain: bool = False,
    ) -> None:
        """``plain``: the readers call through a PlainClient (no SDK), the watcher is the SDK's."""
        self._config = config
        self._names = list(names)
        self._readers = readers
        self._pause = pause
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.report = LoadReport()
        self.client = SecretsClient(config)
        self._reader: SecretsClient | PlainClient = PlainClient(config) if plain else self.client
        self.live = LiveSecrets(self.client, self._names)
        self._threads: list[threading.Thread] = []

    def start(self, ready_timeout: float = 30) -> CatalogLoad:
        self.live.wait_ready(ready_timeout)
        for index in range(self._readers):
            thread = threading.Thread(target=self._read, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        self._threads.append(threading.Thread(target=self._read_live, daemon=True))
        self._threads[-1].start()
        return self

    def wait_reads(self, count: int, timeout: float = 60) -> None:
        """Let the load run for ``count`` more GetSecret reads (failed ones included): a window
        measured in work done, so a slow machine gets as many reads in it as a fast one."""
        start = self.report.reads + len(self.report.failed)
        wait_until(
            lambda: self.report.reads + len(self.report.failed) >= start + count,
            timeout,
            f"{count} more reads of the catalog load",
        )

    def stop(self) -> LoadReport:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.live.close()
        self.client.close()
        if self._reader is not self.client:
            self._reader.close()
        return self.report

    def _read(self, index: int) -> None:
        seen: dict[str, int] = {}
        turn = index
        while not self._stop.is_set():
            name = self._names[turn % len(self._names)]
            turn += 1
            started = time.perf_counter()
            try:
                secret = self._reader.get_secret(name)
            except SecretUnavailable as exc:
                with self._lock:
                    self.report.reads += 1
                    self.report.failed.append(f"{name}: {exc} at {time.time():.3f}")
                continue
            elapsed = time.perf_counter() - started
            with self._lock:
                report = self.report
                report.reads += 1
                report.latencies.append(elapsed)
                report.ended_at.append(time.time())
                report.stale += secret.stale
                if secret.source is SecretSource.VAULT:
                    if secret.version < seen.get(name, 0):
                        report.replica_skew += 1
                    seen[name] = max(seen.get(name, 0), secret.version)
            self._stop.wait(self._pause)

    def _read_live(self) -> None:
        seen: dict[str, int] = {}
        while not self._stop.is_set():
            for name in self._names:
                try:
                    secret = self.live.get_secret(name)
                except SecretBrokerError:
                    with self._lock:
                        self.report.live_missing += 1
                    continue
                if secret.source is not SecretSource.VAULT:
                    continue  # env values (a rollback) have no versions
                if secret.version < seen.get(name, 0):
                    with self._lock:
                        self.report.went_back.append(
                            f"live {name}: {seen[name]} -> {secret.version}"
                        )
                seen[name] = max(seen.get(name, 0), secret.version)
            self._stop.wait(0.01)

    def live_version(self, name: str) -> int:
        return self.live.get_secret(name).version
