"""Chaos against a real 3-node OpenBao raft cluster, under continuous load from catalog clients
(GetSecret and WatchSecrets through the SDK, two broker replicas). Each asserts 0 failed reads on
the catalog side, and that no reader ever sees a version go back.

Values live 1 s in the brokers' caches, so Vault is read all through each failure: what the
catalog sees is the broker's failover, not only its cache."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import requests

from broker.config_loader import parse_config
from broker.sources.vault import VaultSource
from devstack.bootstrap import RoleTTLs
from devstack.ha import CatalogLoad, ClusterVault
from devstack.harness import BrokerProcess, client_config, wait_until
from secretbroker.v1 import broker_pb2
from tests.support import (
    API,
    DATABASE,
    HA_ROTATING,
    HA_SETTINGS,
    KV_MOUNT,
    BrokerFactory,
    Pki,
    RunningBroker,
    assert_no_read_lost,
    bootstrapped_cluster,
    broker_settings,
    get,
    load_on,
    metric,
    replicas_of,
)

pytestmark = pytest.mark.ha

STEADY = 300
"""Reads of load before each failure, for a baseline (about 1.5 s here)."""
SETTLE = 200
"""Reads of load after a failure ends, before the load is checked."""


def read_fresh_from_vault(broker: RunningBroker, pki: Pki, version: int) -> None:
    """The broker reads ``version`` from Vault again (not only from its cache)."""
    stub = broker.stub(pki.catalog, pki.ca)
    wait_until(
        lambda: (answer := get(stub, API)).version >= version and not answer.stale,
        what=f"a fresh read of version {version}",
        timeout=30,
    )


def test_the_leader_sigkilled_loses_no_read_and_a_new_version_reaches_the_watchers(
    cluster_vault: ClusterVault, pki: Pki, start_broker: BrokerFactory
) -> None:
    brokers = replicas_of(cluster_vault, start_broker)
    load = load_on(brokers, pki)
    load.wait_reads(STEADY)
    old_leader = cluster_vault.cluster.leader()

    cluster_vault.cluster.kill(old_leader)
    cluster_vault.cluster.wait_serving()
    version = cluster_vault.write(API, value="after-failover", other="x")
    wait_until(lambda: load.live_version(API) == version, what="the watchers get it", timeout=30)
    load.wait_reads(SETTLE)
    assert_no_read_lost(load)

    new_leader = cluster_vault.cluster.leader()
    for broker in brokers:
        read_fresh_from_vault(broker, pki, version)
        wait_until(  # the next health probe (every second here) sees the new roles
            functools.partial(roles_seen, broker, old_leader.address, new_leader.address),
            what="the per-node metrics show the dead node and the new leader",
        )
        seen = broker.admin(pki.ops, pki.ca).GetRollbackState(
            broker_pb2.GetRollbackStateRequest(), timeout=10
        )
        roles = {node.address: (node.reachable, node.role) for node in seen.vault_nodes}
        assert roles[old_leader.address] == (False, broker_pb2.VAULT_NODE_ROLE_UNSPECIFIED)
        assert roles[new_leader.address] == (True, broker_pb2.VAULT_NODE_ROLE_ACTIVE)


def test_a_hung_leader_sigstopped_past_an_election_loses_no_read(
    cluster_vault: ClusterVault, pki: Pki, start_broker: BrokerFactory
) -> None:
    brokers = replicas_of(cluster_vault, start_broker)
    load = load_on(brokers, pki)
    load.wait_reads(STEADY)
    hung = cluster_vault.cluster.leader()

    cluster_vault.cluster.pause(hung)
    try:
        others = [node for node in cluster_vault.cluster.running() if node is not hung]
        wait_until(
            lambda: any(node.health() == 200 for node in others),
            what="a new leader among the others",
            timeout=30,
        )
        version = cluster_vault.write(API, value="while-hung", other="x")
        wait_until(lambda: load.live_version(API) == version, timeout=30)
    finally:
        cluster_vault.cluster.resume(hung)
    wait_until(lambda: hung.health() == 429, what="the hung node back as a standby", timeout=30)
    load.wait_reads(SETTLE)
    assert_no_read_lost(load)
    for broker in brokers:
        read_fresh_from_vault(broker, pki, version)


def test_the_leader_sealed_loses_no_read_and_shows_sealed_until_it_unseals_itself(
    cluster_vault: ClusterVault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """An operator's `bao operator seal` on the active node: it steps down and answers 503; the
    brokers move on, and show it SEALED until a restart unseals it (auto-unseal)."""
    brokers = replicas_of(cluster_vault, start_broker)
    load = load_on(brokers, pki)
    load.wait_reads(STEADY)
    cluster = cluster_vault.cluster
    sealed = cluster.leader()

    requests.put(
        f"{sealed.address}/v1/sys/seal", headers={"X-Vault-Token": cluster.root_token}, timeout=30
    ).raise_for_status()
    wait_until(
        lambda: any(node.health() == 200 for node in cluster.running() if node is not sealed),
        what="another node elected",
        timeout=30,
    )
    version = cluster_vault.write(API, value="one-node-sealed", other="x")
    wait_until(lambda: load.live_version(API) == version, what="the watchers get it", timeout=30)
    for broker in brokers:
        wait_until(
            functools.partial(shows_sealed, broker, sealed.address, 1),
            what="the sealed node shows sealed",
        )
    assert_no_read_lost(load)

    cluster.kill(sealed)
    cluster.restart(sealed)
    wait_until(lambda: sealed.health() == 429, what="unsealed itself, a standby", timeout=60)
    for broker in brokers:
        wait_until(functools.partial(shows_sealed, broker, sealed.address, 0), what="unsealed")


def shows_sealed(broker: RunningBroker, node: str, sealed: int) -> bool:
    return metric(broker, "secretbroker_vault_node_sealed", node=node) == sealed


def test_a_standby_killed_loses_no_read(
    cluster_vault: ClusterVault, pki: Pki, start_broker: BrokerFactory
) -> None:
    brokers = replicas_of(cluster_vault, start_broker)
    load = load_on(brokers, pki)
    load.wait_reads(STEADY)
    leader = cluster_vault.cluster.leader()
    standby = next(node for node in cluster_vault.cluster.running() if node is not leader)

    cluster_vault.cluster.kill(standby)
    load.wait_reads(SETTLE)
    version = cluster_vault.write(API, value="one-standby-down", other="x")
    wait_until(lambda: load.live_version(API) == version, timeout=30)
    assert_no_read_lost(load)


def test_rotation_during_an_election_writes_one_version_per_success_and_loses_none(
    cluster_vault: ClusterVault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """Three replicas rotate the same secret again and again while the leader is killed: each
    answer is a new version or a clean ABORTED/UNAVAILABLE, and Vault ends with exactly one new
    version per success (check-and-set: never two for one version, never a lost one)."""
    brokers = replicas_of(cluster_vault, start_broker, count=3)
    load = load_on(brokers, pki)
    before = current_version(cluster_vault)
    outcomes: list[int | grpc.StatusCode] = []
    lock = threading.Lock()
    stop = threading.Event()

    def keep_rotating(broker: RunningBroker) -> None:
        admin = broker.admin(pki.ops, pki.ca)
        while not stop.is_set():
            try:
                answer = admin.RotateSecret(broker_pb2.RotateSecretRequest(name=API), timeout=30)
                outcome: int | grpc.StatusCode = answer.version
            except grpc.RpcError as exc:
                outcome = exc.code()
            with lock:
                outcomes.append(outcome)
            time.sleep(0.2)

    threads = [threading.Thread(target=keep_rotating, args=(b,)) for b in brokers]
    for thread in threads:
        thread.start()
    load.wait_reads(STEADY)
    wait_until(lambda: any(isinstance(o, int) for o in outcomes), what="a rotation")
    cluster_vault.cluster.kill(cluster_vault.cluster.leader())
    cluster_vault.cluster.wait_serving()
    after_election = len(outcomes)
    wait_until(
        lambda: any(isinstance(o, int) for o in outcomes[after_election:]),
        what="a rotation after the election",
        timeout=30,
    )
    load.wait_reads(SETTLE)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert_no_read_lost(load)

    successes = [o for o in outcomes if isinstance(o, int)]
    refusals = {o for o in outcomes if not isinstance(o, int)}
    assert refusals <= {grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE}, refusals
    assert len(successes) == len(set(successes)), "two rotations claimed one version"
    assert current_version(cluster_vault) == before + len(successes)
    assert len(successes) >= 2, "rotation works again after the election"


def test_every_vault_node_down_serves_stale_within_max_stale_then_recovers_without_restart(
    cluster_vault: ClusterVault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        cluster_vault, secrets_={DATABASE: {"ttl": 1}, API: {"ttl": 1}}, cache={"max_stale": "4s"}
    )
    stub = broker.stub(pki.catalog, pki.ca)
    assert not get(stub, API).stale
    cluster = cluster_vault.cluster

    for node in list(cluster.running()):
        cluster.kill(node)
    broker.clock.advance(1.2)
    assert get(stub, API).stale, "past its TTL: served stale, flagged"
    wait_until(
        lambda: code_of(lambda: get(stub, API, timeout=5)) == grpc.StatusCode.UNAVAILABLE,
        what="UNAVAILABLE once max_stale has passed",
        timeout=15,
    )

    for node in cluster.nodes:
        cluster.restart(node)
    cluster.wait_serving()
    wait_until(
        lambda: not get(stub, API, timeout=5).stale,
        what="fresh reads again, with no broker restart",
        ignoring=(grpc.RpcError,),
        timeout=60,
    )


def test_a_broker_restarted_while_the_leader_is_replaced_loses_no_catalog_read(
    cluster_vault: ClusterVault, pki: Pki, tmp_path: Path
) -> None:
    """The restarted broker logs in during the election (its fresh token is not yet known to
    the standbys): the catalog's calls go to the other replica meanwhile."""
    document = broker_settings(
        cluster_vault, pki, **HA_SETTINGS, audit={"file": "audit.jsonl"}, log_level="INFO"
    )
    parse_config(document, tmp_path, environ={})  # the document is a valid config
    replicas = [BrokerProcess(tmp_path / f"broker{i}", document).start() for i in range(2)]
    try:
        config = client_config([r.endpoint for r in replicas], pki.ca, pki.catalog)
        load = CatalogLoad(config, [DATABASE, API]).start()
        load.wait_reads(STEADY)

        cluster_vault.cluster.kill(cluster_vault.cluster.leader())
        assert replicas[0].terminate() == 0
        replicas[0].start()
        cluster_vault.cluster.wait_serving()
        version = cluster_vault.write(API, value="after-restart", other="x")
        wait_until(lambda: load.live_version(API) == version, timeout=30)
        load.wait_reads(SETTLE)
        assert_no_read_lost(load)
        wait_until(  # the restarted replica logs in, after the election if not before
            lambda: "logged in to vault" in replicas[0].log().split("broker stopped")[-1],
            what="the restarted replica's login",
            timeout=30,
        )
    finally:
        for replica in replicas:
            replica.stop()


def test_a_read_on_a_standby_right_after_the_brokers_own_write_is_never_the_version_before(
    cluster_vault: ClusterVault, pki: Pki, tmp_path: Path
) -> None:
    """Read-your-writes: the broker talks to a standby only (writes are forwarded to the
    leader), writes a version and reads it back at once, 30 times: the write's X-Vault-Index
    makes a standby that has not applied it yet forward the read."""
    leader = cluster_vault.cluster.leader()
    standby = next(node for node in cluster_vault.cluster.running() if node is not leader)
    config = parse_config(
        broker_settings(cluster_vault, pki, secrets_=HA_ROTATING), tmp_path, environ={}
    )
    source = VaultSource(dataclasses.replace(config.vault, addresses=(standby.address,)))
    spec = config.secrets[API]
    try:
        for round_ in range(30):
            current = source.read_all(spec)
            data = {**current.data, "value": f"round-{round_}"}
            written = source.write_version(spec, data, expected_version=current.version)
            assert source.read(spec).version == written.version
    finally:
        source.session.nodes.close()


def test_the_brokers_token_is_renewed_across_a_leader_change(
    pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    """A 4 s token: renewals (writes) meet the election and go on with the new leader."""
    cluster_vault = bootstrapped_cluster(tmp_path, RoleTTLs(token_ttl="4s", token_max_ttl="1h"))
    try:
        brokers = replicas_of(cluster_vault, start_broker, count=1)
        load = load_on(brokers, pki)
        load.wait_reads(STEADY)
        cluster_vault.cluster.kill(cluster_vault.cluster.leader())
        cluster_vault.cluster.wait_serving()
        renewed = renewals(brokers[0])
        wait_until(lambda: renewals(brokers[0]) >= renewed + 2, what="renewals", timeout=30)
        assert_no_read_lost(load)
        read_fresh_from_vault(brokers[0], pki, 1)
    finally:
        cluster_vault.stop()


def renewals(broker: RunningBroker) -> float:
    return metric(broker, "secretbroker_vault_requests_total", operation="renew", outcome="ok")


def current_version(cluster_vault: ClusterVault) -> int:
    metadata = cluster_vault.admin().secrets.kv.v2.read_secret_metadata(
        path=API, mount_point=KV_MOUNT
    )
    return int(metadata["data"]["current_version"])


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The call's status code: OK when it answers."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def roles_seen(broker: RunningBroker, dead: str, leader: str) -> bool:
    return (
        metric(broker, "secretbroker_vault_node_up", node=dead) == 0
        and metric(broker, "secretbroker_vault_node_active", node=leader) == 1
    )
