"""Outages that hang rather than refuse, against real processes: every OpenBao node of a raft
cluster hung (SIGSTOP) past several TTLs, with a cold replica started and a rollback flipped
during the hang; a replica SIGTERMed under load; a stalled stdout audit sink, fail-open and
fail-closed. Two kinds of client read throughout: the SDK, and a plain grpcio channel set up
the way the README tells non-Python clients (round_robin, retry on UNAVAILABLE, no health
checking). Each case asserts 0 failed reads, and that no read waited for Vault: none took as
long as one Vault timeout (the latency figures themselves are the bench's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devstack.ha import NON_SDK_SERVICE_CONFIG, CatalogLoad, ClusterVault, LoadReport
from devstack.harness import BrokerProcess, client_config, wait_until
from tests.support import (
    API,
    DATABASE,
    SECRET_KEYS,
    Pki,
    Vault,
    VaultServers,
    broker_settings,
    ops_cli,
)

pytestmark = pytest.mark.ha

VAULT_TIMEOUT = 1.0
ENV_VALUES = {f"MEDIA_CATALOG_DATABASE_{key.upper()}": f"env-{key}" for key in SECRET_KEYS}
README = Path(__file__).parents[1] / "README.md"


def document(vault: VaultServers, pki: Pki, **settings: Any) -> dict[str, Any]:
    return broker_settings(
        vault,
        pki,
        secrets_={DATABASE: {"ttl": 1}, API: {"ttl": 1}},  # Vault is read all along
        cache={"max_stale": "1h"},
        timeout=f"{VAULT_TIMEOUT:g}s",
        log_level="INFO",
        **settings,
    )


def loads_on(replicas: list[BrokerProcess], pki: Pki) -> list[CatalogLoad]:
    """An SDK load and a plain-grpcio load on every replica."""
    config = client_config([r.endpoint for r in replicas], pki.ca, pki.catalog)
    return [
        CatalogLoad(config, [DATABASE, API]).start(),
        CatalogLoad(config, [DATABASE, API], plain=True).start(),
    ]


WINDOW = 200
"""Reads of each load per phase of a test (about a second here)."""


def wait_reads(loads: list[CatalogLoad], count: int) -> None:
    for load in loads:
        load.wait_reads(count)


def assert_nothing_failed_or_waited(loads: list[CatalogLoad]) -> list[LoadReport]:
    reports = [load.stop() for load in loads]
    for kind, report in zip(("SDK", "plain grpcio"), reports, strict=True):
        assert report.reads > 100, f"the {kind} load ran"
        assert report.failed == [], (
            f"{kind}: {len(report.failed)} of {report.reads} failed: {report.failed[:3]}"
        )
        assert report.live_missing == 0
        assert report.went_back == []
        slowest = max(report.latencies)
        at = report.ended_at[report.latencies.index(slowest)]
        assert slowest < VAULT_TIMEOUT, (
            f"{kind}: a read took {slowest:.2f}s (ended at {at:.3f}): it waited on Vault"
        )
    return reports


def test_every_vault_node_hung_with_a_cold_replica_and_a_flip_fails_and_delays_no_read(
    cluster_vault: ClusterVault, pki: Pki, tmp_path: Path
) -> None:
    settings = document(cluster_vault, pki, metrics={"vault_probe_interval": "1s"})
    replicas = [
        BrokerProcess(tmp_path / f"broker{i}", settings, environ=ENV_VALUES).start()
        for i in range(2)
    ]
    try:
        loads = loads_on(replicas, pki)
        wait_reads(loads, WINDOW)
        nodes = cluster_vault.cluster.running()
        for node in nodes:
            cluster_vault.cluster.pause(node)
        try:
            wait_until(  # past the TTL: what the clients get now is served stale
                lambda: all(load.report.stale > 0 for load in loads), what="stale answers"
            )
            replicas[1].kill()
            replicas[1].start()  # cold, while every node hangs
            wait_until(
                lambda: replicas[1].scrape("/healthz")[0] == 200,
                what="the cold replica up",
                ignoring=(OSError,),
            )
            wait_reads(loads, WINDOW)
            status, reason = replicas[1].scrape("/readyz")
            assert (status, reason.split(":")[0]) == (503, "warming up, not taking calls yet")
            flipped = ops_cli(replicas[:1], pki, "rollback", "set", '["api"]')
            assert flipped.returncode == 0, flipped.stdout + flipped.stderr
            wait_reads(loads, WINDOW)
        finally:
            for node in nodes:
                cluster_vault.cluster.resume(node)
        cluster_vault.cluster.wait_serving()
        wait_reads(loads, WINDOW)
        reports = assert_nothing_failed_or_waited(loads)
        assert all(r.stale > 0 for r in reports), "the hang was served from the cache, flagged"
        wait_until(lambda: replicas[1].scrape("/readyz")[0] == 200, what="the replica warm")
    finally:
        for replica in replicas:
            replica.stop()


def test_a_replica_sigtermed_under_load_cancels_no_call_of_either_client(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    settings = document(vault, pki)
    replicas = [BrokerProcess(tmp_path / f"broker{i}", settings).start() for i in range(2)]
    try:
        loads = loads_on(replicas, pki)
        wait_reads(loads, WINDOW)
        assert replicas[0].terminate() == 0
        wait_reads(loads, WINDOW)
        assert_nothing_failed_or_waited(loads)
        log = replicas[0].log()
        assert log.index("reported NOT_SERVING") < log.index("broker stopped")
        assert "Traceback" not in log
    finally:
        for replica in replicas:
            replica.stop()


@pytest.mark.parametrize("fail_closed", [False, True])
def test_a_stalled_stdout_audit_sink_fails_no_read(
    vault: Vault, pki: Pki, tmp_path: Path, fail_closed: bool
) -> None:
    """Replica 0 writes its audit trail to a stdout pipe nobody reads (a stuck log pipeline).
    Fail-open: it goes on serving and counts what it drops. Fail-closed: it refuses, says why
    in readiness, leaves the load balancing, and the other replica answers."""
    audit = {"file": "-", "fail_closed": fail_closed, "queue_size": 200}
    stalled = BrokerProcess(
        tmp_path / "stalled", document(vault, pki, audit=audit), stalled_stdout=True
    ).start()
    healthy = BrokerProcess(tmp_path / "healthy", document(vault, pki)).start()
    try:
        loads = loads_on([stalled, healthy], pki)
        if fail_closed:  # the sink fills, a write hangs past audit.write_timeout
            wait_until(lambda: "stalled" in stalled.scrape("/readyz")[1], what="the trail stalled")
        else:  # the sink fills, then the writer's queue
            wait_until(
                lambda: (stalled.metric("secretbroker_audit_dropped_total") or 0) > 0,
                what="records dropped",
            )
        wait_reads(loads, WINDOW)  # and the load goes on through it
        assert_nothing_failed_or_waited(loads)
        assert stalled.scrape("/healthz")[0] == 200, "alive: the event loop never blocked"
        if fail_closed:
            status, reason = stalled.scrape("/readyz")
            assert status == 503
            assert "the audit trail is stalled" in reason
        else:
            assert (stalled.metric("secretbroker_audit_dropped_total") or 0) > 0
            assert stalled.scrape("/readyz")[0] == 200
    finally:
        stalled.kill()  # its graceful stop is not under test here (and waits on the sink)
        stalled.stop()
        healthy.stop()


def test_the_readme_gives_non_sdk_clients_the_service_config_these_tests_use() -> None:
    assert json.dumps(NON_SDK_SERVICE_CONFIG, indent=2) in README.read_text()
