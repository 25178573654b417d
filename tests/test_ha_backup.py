"""The backup and disaster-recovery drill (the ADR's phase 4), against a real 3-node OpenBao raft
cluster: snapshot it, lose every node's data, form a new cluster, restore the snapshot. The
brokers log in again and serve the snapshot's versions; catalog clients lose no read meanwhile
(they are served from cache, within max_stale). RTO and RPO are measured, never asserted."""

from __future__ import annotations

import time

import pytest

from devstack.ha import ClusterVault
from devstack.harness import wait_until
from tests.support import (
    API,
    BrokerFactory,
    Measure,
    Pki,
    RunningBroker,
    assert_no_read_lost,
    get,
    load_on,
    replicas_of,
)

pytestmark = pytest.mark.ha


def fresh_version(broker: RunningBroker, pki: Pki) -> int | None:
    """The version the broker answers fresh from Vault, or None while it serves stale."""
    answer = get(broker.stub(pki.catalog, pki.ca), API)
    return None if answer.stale else answer.version


def test_a_cluster_restored_from_a_snapshot_serves_its_versions_and_no_catalog_read_fails(
    cluster_vault: ClusterVault, pki: Pki, start_broker: BrokerFactory, measure: Measure
) -> None:
    brokers = replicas_of(cluster_vault, start_broker)
    load = load_on(brokers, pki)
    saved = cluster_vault.write(API, value="in-the-snapshot", other="x")
    wait_until(lambda: all(fresh_version(b, pki) == saved for b in brokers), timeout=30)
    snapshot = cluster_vault.cluster.snapshot()
    root_token = cluster_vault.cluster.root_token
    lost = cluster_vault.write(API, value="after-the-snapshot", other="x")  # the RPO
    wait_until(lambda: all(fresh_version(b, pki) == lost for b in brokers), timeout=30)

    lost_at = time.monotonic()
    cluster_vault.cluster.rebuild()
    cluster_vault.cluster.restore(snapshot, root_token)
    wait_until(
        lambda: all(fresh_version(b, pki) == saved for b in brokers),
        what="fresh reads of the snapshot's version from the restored cluster",
        timeout=60,
    )
    measure("DR drill: cluster lost to first fresh read (RTO, s)", time.monotonic() - lost_at)
    measure("DR drill: versions lost (RPO, writes after the snapshot)", lost - saved)

    assert_no_read_lost(load)
    for broker in brokers:
        assert broker.broker.vault.session.authenticated
