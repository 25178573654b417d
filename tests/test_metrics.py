"""Metrics, readiness and gRPC health follow real events: a real OpenBao paused and resumed, a
real broker scraped over HTTP. Every label value comes from config or a fixed set."""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import shutil
import string
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.bootstrap import RoleTTLs
from devstack.harness import wait_until
from secretbroker.v1 import broker_pb2
from tests.support import (
    API,
    DATABASE,
    EXTERNAL,
    BrokerFactory,
    Pki,
    Vault,
    get,
    metric,
    samples,
    secure_channel,
    start_vault,
)

PROMTOOL = shutil.which("promtool") or "promtool"  # Debian package prometheus; .ci/run installs it
FAST_PROBE = {"listen": "127.0.0.1:0", "vault_probe_interval": "100ms"}


def test_requests_hits_misses_and_denials_are_counted(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault)
    broker.forget(DATABASE)
    stub = broker.stub(pki.catalog, pki.ca)
    get(stub, DATABASE)
    get(stub, DATABASE)
    with pytest.raises(grpc.RpcError):
        get(broker.stub(pki.intruder, pki.ca), DATABASE)

    assert metric(broker, "secretbroker_cache_lookups_total", result="miss") == 1
    assert metric(broker, "secretbroker_cache_lookups_total", result="hit") == 1
    assert metric(broker, "secretbroker_grpc_requests_total", method="GetSecret", code="OK") == 2
    assert (
        metric(
            broker, "secretbroker_grpc_requests_total", method="GetSecret", code="PERMISSION_DENIED"
        )
        == 1
    )
    assert metric(broker, "secretbroker_access_denied_total", method="GetSecret") == 1
    assert (
        metric(broker, "secretbroker_grpc_request_duration_seconds_count", method="GetSecret") == 3
    )
    vault_reads = metric(
        broker, "secretbroker_vault_requests_total", operation="read", outcome="ok"
    )
    assert vault_reads == 2 + 1, "the warm-up's two, and the miss"
    assert metric(broker, "secretbroker_secret_version", secret=DATABASE) >= 1
    assert metric(broker, "secretbroker_cache_entries") == 2
    assert metric(broker, "process_resident_memory_bytes") > 0


def test_vault_up_goes_to_0_and_back_and_stale_serving_is_counted(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        private_vault, cache={"default_ttl": "200ms", "max_stale": "1h"}, metrics=FAST_PROBE
    )
    stub = broker.stub(pki.catalog, pki.ca)
    get(stub, DATABASE)
    wait_until(lambda: metric(broker, "secretbroker_vault_up") == 1)

    private_vault.server.pause()
    try:
        wait_until(lambda: metric(broker, "secretbroker_vault_up") == 0)
        broker.clock.advance(0.3)
        assert get(stub, DATABASE, timeout=15).stale
        assert metric(broker, "secretbroker_cache_lookups_total", result="stale") >= 1
    finally:
        private_vault.server.resume()
    wait_until(lambda: metric(broker, "secretbroker_vault_up") == 1)


def test_token_expiry_moves_forward_after_renewal(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, start_broker: BrokerFactory
) -> None:
    vault = start_vault(
        tmp_path_factory.mktemp("short-ttl"), RoleTTLs(token_ttl="3s", token_max_ttl="60s")
    )
    try:
        broker = start_broker(vault)
        get(broker.stub(pki.catalog, pki.ca), DATABASE)
        first = metric(broker, "secretbroker_vault_token_expiry_timestamp_seconds")
        assert time.time() < first <= time.time() + 3.5
        wait_until(
            lambda: metric(broker, "secretbroker_vault_token_expiry_timestamp_seconds") > first
        )
        assert (
            metric(broker, "secretbroker_vault_requests_total", operation="renew", outcome="ok")
            >= 1
        )
    finally:
        vault.server.stop()


def test_rollback_and_rotation_gauges(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        private_vault, secrets_={DATABASE: {}, API: {"rotation": {"key": "value", "period": "1d"}}}
    )
    admin = broker.admin(pki.ops, pki.ca)
    assert metric(broker, "secretbroker_vault_enabled", category="api") == 1
    admin.SetRollbackOverride(
        broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=["database"]), timeout=10
    )
    assert metric(broker, "secretbroker_vault_enabled", category="api") == 0
    assert metric(broker, "secretbroker_vault_enabled", category="database") == 1
    admin.ClearRollbackOverride(broker_pb2.ClearRollbackOverrideRequest(), timeout=10)

    rotated = admin.RotateSecret(broker_pb2.RotateSecretRequest(name=API), timeout=30)
    assert metric(broker, "secretbroker_rotations_total", secret=API, result="rotated") == 1
    assert metric(broker, "secretbroker_rotation_timestamp_seconds", secret=API) == pytest.approx(
        rotated.created_at.ToNanoseconds() / 1e9, abs=0.001
    )
    assert metric(broker, "secretbroker_rotation_period_seconds", secret=API) == 86400
    assert metric(broker, "secretbroker_secret_version", secret=API) == rotated.version
    watch = broker.stub(pki.catalog, pki.ca).WatchSecrets(
        broker_pb2.WatchSecretsRequest(names=[API]), timeout=30
    )
    next(iter(watch))
    assert metric(broker, "secretbroker_watch_streams") == 1
    watch.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped


def test_label_space_stays_fixed_after_10000_random_invalid_names(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, log_level="WARNING")
    stub = broker.stub(pki.catalog, pki.ca)
    get(stub, DATABASE)
    before = set(samples(broker))
    rng = random.Random(4)  # noqa: S311 - test input, not cryptography
    alphabet = string.printable + "é/\x00"
    names = ["".join(rng.choices(alphabet, k=rng.randint(0, 300))) for _ in range(10_000)]

    def ask(name: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            stub.GetSecret(broker_pb2.GetSecretRequest(name=name), timeout=30)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(ask, names))

    after = samples(broker)
    new_series = {key for key in set(after) - before if not key[0].startswith("process_")}
    codes = {dict(labels).get("code") for name, labels in new_series}
    assert {name for name, _ in new_series} <= {
        "secretbroker_grpc_requests_total",
        "secretbroker_grpc_requests_created",
    }, "only status-code series, from a fixed set, may appear"
    assert codes <= {"INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND"}
    assert (
        sum(v for (n, labels), v in after.items() if n == "secretbroker_grpc_requests_total")
        == 10_001
    )


def test_promtool_finds_the_scrape_clean(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault)
    get(broker.stub(pki.catalog, pki.ca), DATABASE)
    _, text = broker.scrape()
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
    for secret_value in vault.written[DATABASE].values():
        assert secret_value not in text


def test_readiness_and_grpc_health_follow_vault(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(private_vault, secrets_={DATABASE: {}, EXTERNAL: {}}, metrics=FAST_PROBE)
    health = health_pb2_grpc.HealthStub(secure_channel(broker.port, pki.ca, pki.catalog))

    def serving() -> int:
        request = health_pb2.HealthCheckRequest(service="secretbroker.v1.SecretBroker")
        status: int = health.Check(request, timeout=10).status
        return status

    wait_until(lambda: broker.scrape("/readyz")[0] == 200)
    wait_until(lambda: serving() == health_pb2.HealthCheckResponse.SERVING)
    broker.forget(EXTERNAL)  # DATABASE is cached (the warm-up read it); EXTERNAL is not

    private_vault.server.pause()
    try:
        wait_until(lambda: broker.scrape("/readyz")[0] == 503)
        _, reason = broker.scrape("/readyz")
        assert f"no value to serve for: {EXTERNAL}" in reason
        assert DATABASE not in reason
        wait_until(lambda: serving() == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert broker.scrape("/healthz")[0] == 200, "alive even when not ready"
    finally:
        private_vault.server.resume()
    wait_until(lambda: broker.scrape("/readyz")[0] == 200)
    wait_until(lambda: serving() == health_pb2.HealthCheckResponse.SERVING)
