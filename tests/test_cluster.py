"""The HA test bed (devstack/cluster.py): a real 3-node OpenBao raft cluster that unseals itself,
makes every node a voter, and survives the loss of its leader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from devstack.cluster import OpenBaoCluster
from tests.conftest import KV_MOUNT, eventually


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
    eventually(lambda: first.health() == 429, what="the old leader back as a standby")
    read = hvac.Client(url=first.address, token=cluster.root_token, timeout=5)
    eventually(
        lambda: (
            read.secrets.kv.v2.read_secret_version(
                path="ha", mount_point=KV_MOUNT, raise_on_deleted_version=True
            )["data"]["data"]["v"]
            == "2"
        ),
        what="the write made during its absence, read on the rejoined node",
        ignoring=(hvac.exceptions.VaultError,),
    )
