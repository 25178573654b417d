"""Broker replicas and client failover: the SDK spreads calls over every replica (round_robin),
leaves one that reports NOT_SERVING, retries a GetSecret that meets a dying one, and LiveSecrets
resumes its watch elsewhere. Against real broker processes and a real OpenBao: 0 failed reads on
the catalog side while replicas are SIGKILLed and SIGTERMed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.ha import CatalogLoad
from devstack.harness import BrokerProcess, client_config, wait_until
from secretbroker.client import (
    RESUME_BACKOFF,
    ROUTING_HEALTH_SERVICE,
    LiveSecrets,
    SecretsClient,
    channel_credentials,
)
from secretbroker.v1 import broker_pb2_grpc
from tests.support import (
    API,
    DATABASE,
    BrokerFactory,
    Measure,
    Pki,
    Vault,
    assert_no_read_lost,
    broker_settings,
    get,
    status_of,
)

pytestmark = pytest.mark.ha

LOAD_READS = 400
"""Reads of catalog load per phase (a second or two here)."""


@pytest.fixture
def replicas(vault: Vault, pki: Pki, tmp_path: Path) -> Iterator[list[BrokerProcess]]:
    document = broker_settings(
        vault,
        pki,
        secrets_={DATABASE: {"ttl": 1}, API: {"ttl": 1}},  # Vault is read all along
        audit={"file": "audit.jsonl"},
        metrics={"vault_probe_interval": "1s"},
        log_level="INFO",
    )
    started = [BrokerProcess(tmp_path / f"broker{i}", document).start() for i in range(3)]
    yield started
    for replica in started:
        replica.stop()


def allowed(replica: BrokerProcess, rpc: str) -> list[dict[str, Any]]:
    """The records of the answers this replica gave to ``rpc``, from its audit trail: whole
    lines only (the trail's writer may be half-way through its last one)."""
    trail = replica.workdir / "audit.jsonl"
    if not trail.exists():
        return []
    whole = trail.read_text().rpartition("\n")[0]
    records = (json.loads(line) for line in whole.splitlines())
    return [r for r in records if r.get("rpc") == rpc and r.get("decision") == "allow"]


def served_by(replica: BrokerProcess) -> int:
    """GetSecret answers this replica gave."""
    return len(allowed(replica, "GetSecret"))


def load_on(replicas: list[BrokerProcess], pki: Pki) -> CatalogLoad:
    config = client_config([r.endpoint for r in replicas], pki.ca, pki.catalog)
    return CatalogLoad(config, [DATABASE, API])


def test_calls_spread_over_every_replica(replicas: list[BrokerProcess], pki: Pki) -> None:
    load = load_on(replicas, pki).start()
    load.wait_reads(LOAD_READS)
    assert_no_read_lost(load)

    counts = [served_by(replica) for replica in replicas]
    assert all(count > 0 for count in counts), f"GetSecret answers per replica: {counts}"


def test_a_replica_that_dies_loses_no_catalog_read(replicas: list[BrokerProcess], pki: Pki) -> None:
    """SIGKILL: gone without a goodbye. (SIGTERM, with a client without health checks beside
    the SDK: tests/test_resilience.py.)"""
    load = load_on(replicas, pki).start()
    load.wait_reads(LOAD_READS // 2)

    replicas[0].kill()
    load.wait_reads(LOAD_READS)

    before = [served_by(replica) for replica in replicas[1:]]
    load.wait_reads(LOAD_READS // 4)
    assert_no_read_lost(load)
    after = [served_by(replica) for replica in replicas[1:]]
    assert all(a > b for a, b in zip(after, before, strict=True)), "both survivors serve"


def watches_opened(replica: BrokerProcess, since: float = 0.0) -> list[float]:
    """When this replica sent each watch stream its first message (a change pushed to many
    streams at once is one record, naming how many: not an opening)."""
    return [
        r["time"]
        for r in allowed(replica, "WatchSecrets")
        if r["time"] > since and "streams" not in r
    ]


WATCHERS = 240


def test_the_watchers_of_a_lost_replica_resume_spread_out_not_in_one_tick(
    replicas: list[BrokerProcess], pki: Pki, measure: Measure
) -> None:
    """When a replica dies, every stream it held breaks at the same moment, in every catalog
    pod. Each LiveSecrets waits a delay drawn below RESUME_BACKOFF's first cap before it
    resumes, so the survivors see the fleet arrive spread over that window, not in one tick."""
    config = client_config([r.endpoint for r in replicas], pki.ca, pki.catalog)
    with SecretsClient(config) as client:
        lives = [LiveSecrets(client, [API]) for _ in range(WATCHERS)]
        try:
            for live in lives:
                live.wait_ready(30)
            wait_until(
                lambda: sum(len(watches_opened(r)) for r in replicas) == WATCHERS,
                what="every watch's first message in the audit trails",
            )
            # round_robin's share per replica varies with which connected first: lose the
            # replica that holds the most watches (at least a third of them)
            victim = max(replicas, key=lambda r: len(watches_opened(r)))
            survivors = [r for r in replicas if r is not victim]
            lost = len(watches_opened(victim))
            killed_at = time.time()
            victim.kill()

            def resumed() -> list[float]:
                arrivals = [t for r in survivors for t in watches_opened(r, killed_at)]
                return arrivals if len(arrivals) == lost else []

            arrivals = sorted(wait_until(resumed, what="the lost replica's watches to resume"))
        finally:
            for live in lives:
                live.close()

    spread = arrivals[-1] - arrivals[0]
    measure(f"resume arrival spread of {lost} watchers of a killed replica (ms)", spread * 1000)
    ticks = {int((t - killed_at) / 0.1) for t in arrivals}
    # Uniform below 1 s, 80 or more arrivals fill about 10 of these 100 ms windows; all at
    # once, 1 or 2.
    assert RESUME_BACKOFF.cap(0) >= 1.0
    assert len(ticks) >= 4, f"arrivals fell in only {len(ticks)} windows of 100 ms"


def test_a_stopping_broker_reports_not_serving_first_then_still_answers_while_it_drains(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault)
    # A channel without the SDK's health checking, to ask and call the broker whatever it says.
    plain = grpc.secure_channel(
        f"127.0.0.1:{broker.port}",
        channel_credentials(pki.ca, pki.catalog.cert, pki.catalog.key),
    )
    health = health_pb2_grpc.HealthStub(plain)

    def routing() -> int:
        request = health_pb2.HealthCheckRequest(service=ROUTING_HEALTH_SERVICE)
        status: int = health.Check(request, timeout=5).status
        return status

    assert routing() == health_pb2.HealthCheckResponse.SERVING
    sdk_stub = broker.stub(pki.catalog, pki.ca)
    assert get(sdk_stub, API).name == API
    stopping = threading.Thread(target=broker.stop, kwargs={"delay": 2.0, "grace": 1.0})
    stopping.start()
    try:
        wait_until(lambda: routing() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=2)
        stub = broker_pb2_grpc.SecretBrokerStub(plain)
        assert get(stub, API).name == API, "a client that did not look still gets its answer"
        wait_until(
            lambda: status_of(lambda: get(sdk_stub, API, timeout=1)) == grpc.StatusCode.UNAVAILABLE,
            what="the SDK's channel sends nothing to a broker that said NOT_SERVING",
            timeout=1.5,
        )
    finally:
        stopping.join(timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        get(broker.stub(pki.catalog, pki.ca), API, timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
