"""Vault hung (SIGSTOP), killed or sealed: cached secrets are served stale, uncached ones fail
UNAVAILABLE within the configured Vault timeout, rotations fail without a trace, watches stay
open, metrics and readiness say so, and the broker recovers without a restart."""

from __future__ import annotations

import time

import grpc
import pytest

from devstack.harness import wait_until
from secretbroker.v1 import broker_pb2
from tests.support import API, DATABASE, BrokerFactory, Pki, Vault, Watch, get, metric, status_of

VAULT_TIMEOUT = "1s"
# A client deadline well above the Vault timeout: an answer of UNAVAILABLE (not DEADLINE_EXCEEDED)
# proves the broker gave up on Vault by itself, within its configured timeout.
CLIENT_DEADLINE = 8.0


def test_hung_vault_serves_stale_then_unavailable_and_recovers_after_sigcont(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        private_vault,
        secrets_={DATABASE: {"ttl": "300ms"}, API: {}},
        cache={"max_stale": "3s", "error_backoff": "200ms"},
        timeout=VAULT_TIMEOUT,
    )
    broker.forget(API)
    stub = broker.stub(pki.catalog, pki.ca)
    fresh = get(stub, DATABASE)
    broker.clock.advance(0.4)

    private_vault.server.pause()
    try:
        stale = get(stub, DATABASE, timeout=CLIENT_DEADLINE)
        assert stale.stale
        assert stale.data == fresh.data
        assert stale.version == fresh.version
        assert stale.fetched_at == fresh.fetched_at
        assert (
            status_of(lambda: get(stub, API, timeout=CLIENT_DEADLINE))
            == grpc.StatusCode.UNAVAILABLE
        )
        broker.clock.advance(3.5)  # past max_stale
        assert (
            status_of(lambda: get(stub, DATABASE, timeout=CLIENT_DEADLINE))
            == grpc.StatusCode.UNAVAILABLE
        )
    finally:
        private_vault.server.resume()

    broker.clock.advance(0.3)  # past error_backoff
    recovered = get(stub, DATABASE)
    assert not recovered.stale
    assert recovered.fetched_at.ToNanoseconds() > fresh.fetched_at.ToNanoseconds()
    assert get(stub, API).name == API


def test_killed_vault_serves_cached_secrets_stale_and_uncached_ones_unavailable(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        private_vault,
        secrets_={DATABASE: {"ttl": "200ms"}, API: {}},
        cache={"max_stale": "1h"},
        timeout=VAULT_TIMEOUT,
    )
    broker.forget(API)
    stub = broker.stub(pki.catalog, pki.ca)
    fresh = get(stub, DATABASE)

    private_vault.server.stop()
    broker.clock.advance(0.3)

    stale = get(stub, DATABASE, timeout=CLIENT_DEADLINE)
    assert stale.stale
    assert stale.data == fresh.data
    assert status_of(lambda: get(stub, API, timeout=CLIENT_DEADLINE)) == grpc.StatusCode.UNAVAILABLE


def test_fresh_cache_hits_keep_answering_while_vault_is_hung(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    stub = start_broker(private_vault, secrets_={DATABASE: {"ttl": "1h"}}).stub(pki.catalog, pki.ca)
    get(stub, DATABASE)

    private_vault.server.pause()
    try:
        answers = [get(stub, DATABASE, timeout=CLIENT_DEADLINE) for _ in range(20)]
    finally:
        private_vault.server.resume()

    assert not any(answer.stale for answer in answers)


def test_sealed_vault_serves_cached_secrets_stale_and_uncached_ones_unavailable(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        private_vault,
        secrets_={DATABASE: {"ttl": "200ms"}, API: {}},
        cache={"error_backoff": "100ms"},
        timeout=VAULT_TIMEOUT,
    )
    broker.forget(API)
    stub = broker.stub(pki.catalog, pki.ca)
    fresh = get(stub, DATABASE)

    private_vault.admin.sys.seal()
    broker.clock.advance(0.3)

    stale = get(stub, DATABASE, timeout=CLIENT_DEADLINE)
    assert stale.stale
    assert stale.data == fresh.data
    with pytest.raises(grpc.RpcError) as caught:
        get(stub, API, timeout=CLIENT_DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "sealed" in (caught.value.details() or "")


def test_broker_started_while_vault_is_down_serves_once_vault_answers(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """Like Vault Agent, the broker starts without Vault and logs in when it can; nothing is
    served meanwhile (there is nothing cached to serve): it takes no calls until it is warm."""
    private_vault.server.pause()
    try:
        broker = start_broker(private_vault, secrets_={API: {}}, timeout=VAULT_TIMEOUT)
        stub = broker.stub(pki.catalog, pki.ca)
        assert status_of(lambda: get(stub, API, timeout=1)) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        private_vault.server.resume()

    answer = get(stub, API, timeout=CLIENT_DEADLINE)
    assert not answer.stale
    assert metric(broker, "secretbroker_vault_requests_total", operation="login", outcome="ok") == 1


def test_rotation_against_a_hung_vault_fails_unavailable_and_changes_nothing(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        private_vault, secrets_={DATABASE: {}, API: {"rotation": {"key": "value"}}}
    )
    stub = broker.stub(pki.catalog, pki.ca)
    before = get(stub, API)
    # The schedule's first check runs at start-up: let it finish before Vault hangs, so the
    # only failed rotation counted is the one asked for here.
    wait_until(lambda: metric(broker, "secretbroker_rotation_timestamp_seconds", secret=API) > 0)
    private_vault.server.pause()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            broker.admin(pki.ops, pki.ca).RotateSecret(
                broker_pb2.RotateSecretRequest(name=API), timeout=15
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert get(stub, API).version == before.version, "the cached value is still served"
    finally:
        private_vault.server.resume()
    _, text = broker.scrape()
    assert f'secretbroker_rotations_total{{result="failed",secret="{API}"}} 1.0' in text
    assert get(stub, API).data["value"] == before.data["value"]


def test_a_watch_stays_open_through_a_vault_outage_and_delivers_after_it(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(private_vault, rollout={"watch_poll_interval": "200ms"})
    watch = Watch(broker.stub(pki.catalog, pki.ca), [API], timeout=60)
    first = watch.next()
    private_vault.server.pause()
    time.sleep(1.5)  # several polls fail meanwhile; the stream must not end
    private_vault.server.resume()
    version = private_vault.write(API, value="after-the-outage", other="o")
    pushed = watch.next()
    assert (pushed.version, pushed.data["value"]) == (version, "after-the-outage")
    assert pushed.version > first.version
    watch.cancel()


def test_a_sealed_vault_shows_in_metrics_and_readiness(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(
        private_vault, metrics={"listen": "127.0.0.1:0", "vault_probe_interval": "100ms"}
    )
    wait_until(lambda: broker.scrape("/readyz")[0] == 200)
    private_vault.admin.sys.seal()
    wait_until(lambda: "secretbroker_vault_sealed 1.0" in broker.scrape()[1])
    wait_until(lambda: "vault is sealed" in broker.scrape("/readyz")[1])
    assert broker.scrape("/readyz")[0] == 200, "every declared secret is held: still ready"
    assert "secretbroker_vault_up 0.0" in broker.scrape()[1]
    broker.forget(API)
    wait_until(lambda: broker.scrape("/readyz")[0] == 503)
    assert f"vault is sealed; no value to serve for: {API}" in broker.scrape("/readyz")[1]
