"""A 3-node OpenBao raft cluster on loopback, for the HA dev stack and the HA tests.

Each node is a real ``bao server`` on integrated raft storage. The nodes unseal themselves
with a static seal (a 32-byte key file in the work folder: fine for dev and tests only),
join the first node with ``retry_join``, and use ``performance_multiplier = 1`` and fast
autopilot settings, so elections and voter promotion take seconds. The cluster is
initialised once; the root token stays in memory and in no log. Nodes can be killed,
paused (hung, not dead), resumed and restarted, to test failover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from devstack.harness import die_with_parent, free_port_pair, stop_process, wait_until
from devstack.openbao import bao_binary
from devstack.pki import write_private

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
JOIN_GRACE = 20.0
"""Seconds a node of a new cluster may take to join before it is wiped and started again."""

NODE_HCL = """
storage "raft" {{
  path = "{data}"
  node_id = "{node_id}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "1s"
  autopilot_update_interval = "1s"
{joins}
}}
listener "tcp" {{
  address = "127.0.0.1:{api_port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
seal "static" {{
  current_key_id = "k1"
  current_key = "file://{key_file}"
}}
api_addr = "http://127.0.0.1:{api_port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
disable_mlock = true
ui = false
"""

JOIN_HCL = """  retry_join {{
    leader_api_addr = "{address}"
  }}"""


@dataclass
class ClusterNode:
    node_id: str
    api_port: int
    cluster_port: int
    config: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.node_id} is not running")
        return self.process.pid

    def health(self) -> int | None:
        """The node's /sys/health status code (200 active, 429 standby, 503 sealed, ...); None
        when it does not answer within a second."""
        try:
            return requests.get(f"{self.address}/v1/sys/health", timeout=1).status_code
        except requests.RequestException:
            return None


class OpenBaoCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.nodes: list[ClusterNode] = []
        self._size = size
        self._key_file = workdir / "static-seal.key"
        self.root_token = ""

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def start(self) -> None:
        """Start every node, initialise the cluster once, and wait until every node is unsealed
        and serving (one active, the others standbys)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_private(self._key_file, secrets.token_bytes(32))
        ports = [free_port_pair() for _ in range(self._size)]
        for index, port in enumerate(ports):
            node_id = f"node{index + 1}"
            folder = self.workdir / node_id
            (folder / "data").mkdir(parents=True, exist_ok=True)
            joins = "\n".join(
                JOIN_HCL.format(address=f"http://127.0.0.1:{other}")
                for other in ports
                if other != port
            )
            config = folder / "node.hcl"
            config.write_text(
                NODE_HCL.format(
                    data=folder / "data",
                    node_id=node_id,
                    joins=joins,
                    api_port=port,
                    cluster_port=port + 1,
                    key_file=self._key_file,
                )
            )
            self.nodes.append(ClusterNode(node_id, port, port + 1, config, folder / "openbao.log"))
        self._form()

    def _form(self, attempts: int = 2) -> None:
        """Launch every node on empty data, initialise once, make every node a voter. A cluster
        that does not come up (a busy machine: an init or join that timed out half-way) is
        stopped, wiped and formed again, up to ``attempts`` times in all: for a new cluster
        (start) and for one rebuilt after a disaster (rebuild) alike."""
        for attempt in range(1, attempts + 1):
            try:
                self._form_once()
                return
            except RuntimeError as exc:
                if attempt == attempts:
                    raise
                log.warning("forming the OpenBao cluster again on empty data: %s", exc)
                self.stop()
                self._wipe()

    def _wipe(self) -> None:
        for node in self.nodes:
            data = node.config.parent / "data"
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)

    def _form_once(self) -> None:
        for node in self.nodes:
            self._launch(node)
        self._initialise(self.nodes[0])
        leader = self._wait_joined()
        # Promote joined nodes to voters after 3 s of health instead of autopilot's 10 s.
        self._api(
            leader,
            "post",
            "sys/storage/raft/autopilot/configuration",
            {"server_stabilization_time": "3s"},
        )
        self.wait_voters()

    def _wait_joined(self) -> ClusterNode:
        """wait_serving for a new cluster, mending a node whose join got half-way: on a loaded
        machine a join can time out after the leader added the node to the raft configuration,
        and the node then waits for unseal keys that never come ("stored unseal keys are
        supported, but none were found"). Such a node is removed from the configuration,
        wiped and started again, at most twice, so it joins afresh."""
        deadline = time.monotonic() + START_TIMEOUT
        started = time.monotonic()
        mended: dict[str, int] = {}
        while True:
            leader = self._serving_leader()
            if leader is not None:
                return leader
            states = {node.node_id: node.health() for node in self.running()}
            active = [node for node in self.running() if states[node.node_id] == 200]
            stuck = [
                node
                for node in self.running()
                if states[node.node_id] not in (200, 429, 473) and mended.get(node.node_id, 0) < 2
            ]
            if len(active) == 1 and stuck and time.monotonic() - started > JOIN_GRACE:
                for node in stuck:
                    mended[node.node_id] = mended.get(node.node_id, 0) + 1
                    self._rejoin(node, active[0])
                started = time.monotonic()
                deadline += JOIN_GRACE
            for node in self.running():
                self._check_alive(node, deadline)
            time.sleep(0.2)

    def _rejoin(self, node: ClusterNode, leader: ClusterNode) -> None:
        stop_process(node.process)
        with contextlib.suppress(requests.RequestException):
            self._api(leader, "post", "sys/storage/raft/remove-peer", {"server_id": node.node_id})
        data = node.config.parent / "data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        self._launch(node)

    def snapshot(self) -> bytes:
        """A raft snapshot of the whole cluster (`bao operator raft snapshot save`)."""
        response = requests.get(
            f"{self.leader().address}/v1/sys/storage/raft/snapshot",
            headers={"X-Vault-Token": self.root_token},
            timeout=60,
        )
        response.raise_for_status()
        return response.content

    def rebuild(self) -> None:
        """The disaster a backup is for: every node's data is lost. An empty cluster is formed
        on the same addresses with the same seal key (in production: the same KMS key), and
        gets a root token of its own."""
        self.stop()
        self._wipe()
        self._form()

    def restore(self, snapshot: bytes, root_token: str) -> None:
        """Restore ``snapshot`` into this cluster (`bao operator raft snapshot restore
        -force`, as it comes from another cluster); its tokens come back with it, the root
        token ``root_token`` among them. Waits until every node serves again."""
        response = requests.post(
            f"{self.leader().address}/v1/sys/storage/raft/snapshot-force",
            data=snapshot,
            headers={"X-Vault-Token": self.root_token},
            timeout=60,
        )
        response.raise_for_status()
        self.root_token = root_token
        self.wait_serving()

    def wait_voters(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every node is a raft voter: only then does the cluster survive the loss of
        any one node."""

        def every_node_votes() -> bool:
            servers = self._api(self.leader(), "get", "sys/storage/raft/configuration")["data"][
                "config"
            ]["servers"]
            return len(servers) == len(self.nodes) and all(s["voter"] for s in servers)

        try:
            wait_until(
                every_node_votes,
                timeout,
                "every OpenBao node a voter",
                (requests.RequestException, RuntimeError, KeyError),
                interval=0.2,
            )
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"not every OpenBao node became a voter; see {self.workdir}"
            ) from None

    def _api(
        self, node: ClusterNode, method: str, path: str, body: dict[str, object] | None = None
    ) -> dict[str, Any]:
        response = requests.request(
            method,
            f"{node.address}/v1/{path}",
            json=body,
            headers={"X-Vault-Token": self.root_token},
            timeout=10,
        )
        response.raise_for_status()
        return response.json() if response.content else {}

    def _launch(self, node: ClusterNode) -> None:
        env = {**os.environ, "BAO_LOG_LEVEL": "warn", "HOME": str(self.workdir)}
        with node.log_path.open("ab") as log_file:
            node.process = subprocess.Popen(  # noqa: S603 - fixed argv, our own binary
                die_with_parent([bao_binary(), "server", f"-config={node.config}"]),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def _initialise(self, node: ClusterNode) -> None:
        deadline = time.monotonic() + START_TIMEOUT

        def answers() -> bool:
            self._check_alive(node, deadline)
            return node.health() is not None

        wait_until(answers, START_TIMEOUT + 1, f"OpenBao {node.node_id} to answer", interval=0.1)
        try:
            response = requests.put(
                f"{node.address}/v1/sys/init",
                json={"recovery_shares": 1, "recovery_threshold": 1},
                timeout=30,
            )
            response.raise_for_status()
        except requests.RequestException as exc:
            raise RuntimeError(f"initialising OpenBao {node.node_id} failed: {exc}") from None
        self.root_token = str(response.json()["root_token"])

    def wait_serving(self, timeout: float = START_TIMEOUT) -> ClusterNode:
        """Wait until one node is active and every running node answers (active or standby);
        returns the active node."""
        deadline = time.monotonic() + timeout

        def serving() -> ClusterNode | None:
            for node in self.running():
                self._check_alive(node, deadline)
            return self._serving_leader()

        return wait_until(serving, timeout + 1, "the OpenBao cluster serving", interval=0.2)

    def _serving_leader(self) -> ClusterNode | None:
        """The active node, when there is exactly one and every running node answers."""
        states = {node.node_id: node.health() for node in self.running()}
        active = [node for node in self.running() if states[node.node_id] == 200]
        if len(active) == 1 and all(code in (200, 429, 473) for code in states.values()):
            return active[0]
        return None

    def enable_kv2(self, mount: str = "secret", timeout: float = START_TIMEOUT) -> None:
        """Mount KV v2 and wait until every node serves it: right after the mount, standbys
        answer 400 ("upgrading from non-versioned to versioned data") for a few seconds."""
        leader = self.leader()
        self._api(
            leader, "post", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "2"}}
        )
        probe = f"{mount}/data/.mount-ready"

        def served_everywhere() -> bool:
            self._api(self.leader(), "post", probe, {"data": {"ready": "yes"}})
            for node in self.running():
                self._api(node, "get", probe)
            return True

        wait_until(
            served_everywhere,
            timeout,
            f"KV v2 at {mount}/ on every node",
            (requests.RequestException, RuntimeError),
            interval=0.2,
        )

    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def leader(self) -> ClusterNode:
        for node in self.running():
            if node.health() == 200:
                return node
        raise RuntimeError("no active node")

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL: the node dies without a goodbye, as a crashed machine would."""
        if node.process is not None:
            node.process.kill()
            node.process.wait()

    def pause(self, node: ClusterNode) -> None:
        """SIGSTOP: hung, not dead; connections are accepted and never answered."""
        os.kill(node.pid, signal.SIGSTOP)

    def resume(self, node: ClusterNode) -> None:
        os.kill(node.pid, signal.SIGCONT)

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again: it unseals itself and rejoins as a standby."""
        self._launch(node)

    def stop(self) -> None:
        for node in self.nodes:
            stop_process(node.process)

    def _check_alive(self, node: ClusterNode, deadline: float) -> None:
        if node.process is not None and node.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"OpenBao {node.node_id} exited; see {node.log_path}")
        if time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"the OpenBao cluster did not come up; see {self.workdir}/*/")
