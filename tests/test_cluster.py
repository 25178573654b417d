"""The HA test bed (devstack/cluster.py): a real 3-node OpenBao raft cluster that unseals itself,
makes every node a voter, and survives the loss of its leader."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

import devstack.cluster as cluster_module
from devstack.cluster import OpenBaoCluster
from devstack.harness import wait_until
from tests.support import KV_MOUNT

pytestmark = pytest.mark.ha


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[OpenBaoCluster]:
    started = OpenBaoCluster(tmp_path / "cluster")
    started.start()
    yield started
    started.stop()


def test_the_cluster_elects_a_new_leader_when_its_leader_dies_and_takes_it_back(
    cluster: OpenBaoCluster,
) -> None:
    first = cluster.leader()
    cluster.enable_kv2(KV_MOUNT)
    admin = hvac.Client(url=first.address, token=cluster.root_token, timeout=5)
    admin.secrets.kv.v2.create_or_update_secret(path="ha", secret={"v": "1"}, mount_point=KV_MOUNT)

    cluster.kill(first)
    second = cluster.wait_serving()
    written = hvac.Client(url=second.address, token=cluster.root_token, timeout=5)
    written.secrets.kv.v2.create_or_update_secret(
        path="ha", secret={"v": "2"}, mount_point=KV_MOUNT
    )
    cluster.restart(first)

    assert second is not first
    wait_until(lambda: first.health() == 429, what="the old leader back as a standby")
    read = hvac.Client(url=first.address, token=cluster.root_token, timeout=5)
    wait_until(
        lambda: (
            read.secrets.kv.v2.read_secret_version(
                path="ha", mount_point=KV_MOUNT, raise_on_deleted_version=True
            )["data"]["data"]["v"]
            == "2"
        ),
        what="the write made during its absence, read on the rejoined node",
        ignoring=(hvac.exceptions.VaultError,),
    )


def test_a_node_whose_join_got_half_way_is_wiped_and_joins_afresh(
    cluster: OpenBaoCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a loaded machine a join can fail after the leader took the node into its raft
    configuration; the node then waits forever for unseal keys. Starting the cluster mends it."""
    stuck = cluster.nodes[2]
    cluster.kill(stuck)
    data = stuck.config.parent / "data"
    shutil.rmtree(data)
    data.mkdir()
    joined_config = stuck.config.read_text()
    stuck.config.write_text(_without_joins(joined_config))
    cluster.restart(stuck)  # an empty node that will not join: never unsealed
    wait_until(lambda: stuck.health() == 501, what="the node up but not initialised")
    stuck.config.write_text(joined_config)
    monkeypatch.setattr(cluster_module, "JOIN_GRACE", 1.0)

    cluster._wait_joined()

    assert stuck.health() == 429
    cluster.wait_voters()


def test_a_cluster_that_does_not_come_up_is_stopped_wiped_and_formed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() and rebuild() alike: a formation that fails (here: reported failed after it
    came up, so the retry meets nodes holding data and ports) ends in a cluster formed again
    on empty data, every node a voter."""
    cluster = OpenBaoCluster(tmp_path / "cluster")
    form_once = cluster._form_once
    attempts: list[str] = []

    def fails_the_first_time() -> None:
        form_once()
        attempts.append(cluster.root_token)
        if len(attempts) == 1:
            raise RuntimeError("the OpenBao cluster did not come up (in this test)")

    monkeypatch.setattr(cluster, "_form_once", fails_the_first_time)
    try:
        cluster.start()
        assert len(attempts) == 2
        assert attempts[0] != attempts[1], "initialised anew: the first cluster's data is gone"
        cluster.wait_serving()
        cluster.wait_voters()
    finally:
        cluster.stop()


def _without_joins(hcl: str) -> str:
    lines, skipping = [], 0
    for line in hcl.splitlines():
        if line.strip().startswith("retry_join"):
            skipping = 1
            continue
        if skipping:
            if line.strip() == "}":
                skipping = 0
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"
