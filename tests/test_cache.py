"""The cache, observed from OpenBao's own audit log: how many reads Vault really served."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from secretbroker.v1 import broker_pb2
from tests.support import API, BrokerFactory, Measure, Pki, Vault, get


def test_cache_hits_do_not_touch_vault(vault: Vault, pki: Pki, start_broker: BrokerFactory) -> None:
    broker = start_broker(vault, secrets_={API: {"ttl": "1h"}})
    broker.forget(API)
    stub = broker.stub(pki.catalog, pki.ca)
    offset = vault.audit_offset()

    versions = {get(stub, API).version for _ in range(50)}

    assert len(versions) == 1
    assert vault.reads_since(offset, API) == 1


def test_concurrent_misses_for_one_secret_coalesce_into_one_vault_read(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, secrets_={API: {"ttl": "1h"}})
    broker.forget(API)
    stub = broker.stub(pki.catalog, pki.ca)
    request = broker_pb2.GetSecretRequest(name=API)
    offset = vault.audit_offset()

    with ThreadPoolExecutor(max_workers=100) as pool:
        futures = [pool.submit(stub.GetSecret, request, timeout=20) for _ in range(100)]
        responses = [future.result() for future in futures]

    assert {r.secret.version for r in responses} != set()
    assert all(r.secret.data == responses[0].secret.data for r in responses)
    assert vault.reads_since(offset, API) == 1


def test_expired_entry_is_read_again_and_picks_up_a_new_version(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    # Waits for the refresh however slow Vault is (stale-while-revalidate is tested below).
    broker = start_broker(vault, secrets_={API: {"ttl": 0}}, cache={"revalidate_wait": "10s"})
    stub = broker.stub(pki.catalog, pki.ca)
    first = get(stub, API)
    new_version = vault.write(API, value="rotated-by-ops", other="o")

    second = get(stub, API)

    versions = (second.version, new_version, first.version)  # ints: no value printed on failure
    assert versions[0] == versions[1] > versions[2]
    assert not second.stale
    assert second.data["value"] == "rotated-by-ops"


def test_steady_reads_never_wait_for_vault_and_cost_about_one_read_per_ttl(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, measure: Measure
) -> None:
    """Refresh-ahead: read continuously across 5 TTL periods; after the first miss, every answer
    comes from the cache (the broker's audit trail says so: no request waited on a Vault read),
    while OpenBao's audit log shows the background refreshes, about one per TTL."""
    ttl = 1.0
    broker = start_broker(vault, secrets_={API: {"ttl": f"{ttl}s"}})
    stub = broker.stub(pki.catalog, pki.ca)
    get(stub, API)  # the first read is a miss
    trail_offset = len(broker.audit_lines())
    vault_offset = vault.audit_offset()

    deadline = time.monotonic() + 5 * ttl
    while time.monotonic() < deadline:
        get(stub, API)
        time.sleep(0.02)

    records = [json.loads(line) for line in broker.audit_lines()]
    sources = {record["source"] for record in records[trail_offset:]}
    assert sources == {"cache"}, "a request waited on Vault"
    reads = vault.reads_since(vault_offset, API)
    measure("Vault reads over 5 TTL periods of continuous reads", reads)
    assert 4 <= reads <= 8, f"{reads} Vault reads in 5 TTL periods"
