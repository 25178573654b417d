"""No secret value or token ever reaches a log line, an error message or the test output.

Runs the real ``python -m broker serve`` at DEBUG through every path (allowed, denied, invalid,
undeclared, watch, rotation, rollback to env and back, Vault hung, token renewal and re-login)
and searches everything it wrote: its log, its audit trail, and the test's own output.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import grpc
import pytest

from broker.sources.env import variable_name
from devstack.bootstrap import RoleTTLs
from devstack.harness import BrokerProcess, wait_until
from secretbroker.v1 import broker_pb2, broker_pb2_grpc
from tests.support import (
    API,
    DATABASE,
    SECRET_KEYS,
    Pki,
    Watch,
    broker_settings,
    get,
    secure_channel,
    start_vault,
)

HANDSHAKES = 5
LOGINS = "secretbroker_vault_requests_total"


def test_logs_of_a_whole_run_contain_no_secret_value_or_token(
    tmp_path: Path, pki: Pki, capfd: pytest.CaptureFixture[str]
) -> None:
    vault = start_vault(tmp_path / "openbao", RoleTTLs(token_ttl="2s", token_max_ttl="5s"))
    settings = broker_settings(
        vault,
        pki,
        secrets_={
            DATABASE: {"ttl": "300ms"},
            API: {"ttl": 0, "rotation": {"key": "value"}},
            "media-catalog/external": {"ttl": "300ms"},  # read at start-up only
        },
        cache={"max_stale": "2s", "error_backoff": "100ms"},
    )
    settings["vault"]["address"] = "http://127.0.0.1:9"  # VAULT_ADDR must win over the file
    settings["metrics"] = {"vault_probe_interval": "200ms"}
    settings["log"]["format"] = "json"
    env_values = {variable_name(DATABASE, key): secrets.token_urlsafe(16) for key in SECRET_KEYS}
    broker = BrokerProcess(
        tmp_path, settings, environ={"VAULT_ADDR": vault.address, **env_values}
    ).start()
    port = broker.port
    try:
        stub = broker_pb2_grpc.SecretBrokerStub(secure_channel(port, pki.ca, pki.catalog))
        intruder = broker_pb2_grpc.SecretBrokerStub(secure_channel(port, pki.ca, pki.intruder))
        grpc.channel_ready_future(secure_channel(port, pki.ca, pki.catalog)).result(timeout=30)
        served = [get(stub, DATABASE), get(stub, API)]
        for name in ["", "/x", "a/../b", "media-catalog/nope", "x\nFORGED LOG LINE"]:
            with pytest.raises(grpc.RpcError):
                get(stub, name)
        with pytest.raises(grpc.RpcError):
            get(intruder, DATABASE)
        for _ in range(HANDSHAKES):  # no client certificate: refused in the TLS handshake
            with pytest.raises(grpc.RpcError):
                get(broker_pb2_grpc.SecretBrokerStub(secure_channel(port, pki.ca, None)), API, 5)
        admin = broker_pb2_grpc.SecretBrokerAdminStub(secure_channel(port, pki.ca, pki.ops))
        watch = Watch(stub, [DATABASE, API])
        served += [watch.next(), watch.next()]
        admin.RotateSecret(broker_pb2.RotateSecretRequest(name=API), timeout=30)
        served.append(watch.next())
        admin.SetRollbackOverride(
            broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=["api"]), timeout=10
        )
        served += [watch.next(), get(stub, DATABASE)]
        assert served[-1].source == broker_pb2.SOURCE_ENV
        admin.ClearRollbackOverride(broker_pb2.ClearRollbackOverrideRequest(), timeout=10)
        served.append(watch.next())
        watch.cancel()

        def read_until_relogin() -> bool:  # across renewals and a re-login at max TTL
            served.append(get(stub, API))
            return (broker.metric(LOGINS, operation="login", outcome="ok") or 0) >= 2

        wait_until(read_until_relogin, timeout=30, what="a re-login at max TTL", interval=0.1)
        served.append(get(stub, DATABASE))  # cached again, within max_stale of the pause
        vault.server.pause()

        def read_until_stale() -> bool:  # past its TTL, with Vault hung
            served.append(get(stub, DATABASE))
            return served[-1].stale

        wait_until(read_until_stale, what="a stale answer")
        with pytest.raises(grpc.RpcError):
            get(stub, "media-catalog/external")  # past max_stale since start-up: UNAVAILABLE
        vault.server.resume()
        assert served[-1].stale
        scraped = "".join(broker.scrape(path)[1] for path in ("/metrics", "/healthz"))
    finally:
        exit_code = broker.terminate(timeout=20)
        vault.server.stop()

    logs = broker.log()
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"rpc":"RotateSecret"' in audit
    assert exit_code == 0, "SIGTERM stops the broker cleanly"
    assert "broker stopped" in logs
    records = [json.loads(line) for line in logs.splitlines()]  # every line, gRPC core's too
    assert len(records) > 10, "log.format = json writes one JSON object per line"
    handshakes = [r for r in records if "handshake failed" in r["message"]]
    assert len(handshakes) == 1, "failed handshakes: one record per interval, not one each"
    assert handshakes[0]["logger"] == "grpc.core"
    assert f"secretbroker_tls_handshake_failures_total {HANDSHAKES}.0" in scraped
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert "logged in to vault" in logs
    assert "serving 'media-catalog/database' stale" in logs
    assert any(
        r["level"] == "WARNING"
        and r["logger"] == "broker.api.calls"
        and r["message"].startswith(
            "GetSecret by 'spiffe://media.local/catalog' failed: UNAVAILABLE"
        )
        for r in records
    )
    assert "FORGED LOG LINE" not in logs
    forbidden = {
        "root token": vault.server.root_token,
        "approle secret_id": vault.approle.secret_id_file.read_text(),
        "approle role_id": vault.approle.role_id_file.read_text(),
    }
    for secret in served:
        forbidden.update({f"{secret.name}.{key}": value for key, value in secret.data.items()})
    for path, data in vault.written.items():
        forbidden.update({f"{path}.{key}": value for key, value in data.items()})
    forbidden.update(env_values)
    captured = capfd.readouterr()
    outputs = {
        "broker log": logs,
        "audit trail": audit,
        "metrics": scraped,
        "test output": captured.out + captured.err,
    }
    for where, text in outputs.items():
        leaked = [label for label, value in forbidden.items() if value and value in text]
        assert not leaked, f"{where} contains {leaked}"
    assert broker.log_path is not None
    assert os.path.getsize(broker.log_path) > 0
