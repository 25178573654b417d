"""The rollback flag: VAULT_ENABLED_SECRETS at start-up, live flips through SecretBrokerAdmin,
persisted across restarts, pushed to watchers, audited. Real OpenBao, real broker, real mTLS."""

from __future__ import annotations

import functools
import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.errors import ConfigError
from broker.sources.env import variable_name
from devstack.harness import broker_command, wait_until
from devstack.pki import CertFiles
from secretbroker.v1 import broker_pb2
from tests.support import (
    API,
    DATABASE,
    ENV_VALUES,
    SECRET_KEYS,
    BrokerFactory,
    Measure,
    Pki,
    RunningBroker,
    Vault,
    Watch,
    example_config,
    get,
    ops_cli,
    status_of,
)

VAULT = broker_pb2.SOURCE_VAULT
ENV = broker_pb2.SOURCE_ENV


def set_override(
    broker: RunningBroker, pki: Pki, categories: list[str], client: CertFiles | None = None
) -> broker_pb2.RollbackState:
    """SetRollbackOverride as ``client`` (ops by default)."""
    request = broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=categories)
    return broker.admin(client or pki.ops, pki.ca).SetRollbackOverride(request, timeout=10).state


def test_variable_name_follows_the_convention() -> None:
    assert variable_name("media-catalog/database", "url") == "MEDIA_CATALOG_DATABASE_URL"
    assert variable_name("a..b/c", "jwt.secret") == "A_B_C_JWT_SECRET"


@pytest.mark.parametrize(
    ("variable", "database_source", "api_source"),
    [
        (None, VAULT, VAULT),
        ("[]", ENV, ENV),
        ('["database"]', VAULT, ENV),
        ('["database", "api"]', VAULT, VAULT),
    ],
)
def test_startup_variable_picks_the_source_per_category(
    vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    variable: str | None,
    database_source: int,
    api_source: int,
) -> None:
    environ = dict(ENV_VALUES)
    if variable is not None:
        environ["VAULT_ENABLED_SECRETS"] = variable
    broker = start_broker(vault, environ=environ)
    stub = broker.stub(pki.catalog, pki.ca)

    for name, expected in ((DATABASE, database_source), (API, api_source)):
        secret = get(stub, name)
        assert secret.source == expected
        if expected == ENV:
            assert dict(secret.data) == {k: f"env-{name}-{k}" for k in SECRET_KEYS}
            assert secret.version == 0
        else:
            assert dict(secret.data) == vault.written[name]


def test_missing_variables_are_named_never_valued(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    environ = {"VAULT_ENABLED_SECRETS": "[]", variable_name(API, "value"): "env-only-value"}
    broker = start_broker(vault, environ=environ)
    stub = broker.stub(pki.catalog, pki.ca)

    with pytest.raises(grpc.RpcError) as caught:
        get(stub, API)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "MEDIA_CATALOG_API_OTHER is not set" in details
    assert "env-only-value" not in details


def test_malformed_startup_variable_stops_serve_with_the_key(tmp_path: Path) -> None:
    result = broker_command(
        "serve",
        "--config",
        str(example_config(tmp_path)),
        env={"VAULT_ENABLED_SECRETS": "database,api"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "config error: VAULT_ENABLED_SECRETS: must be a JSON list" in result.stderr


def test_live_flip_takes_effect_for_the_next_request_both_ways(
    vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    measure: Measure,
) -> None:
    broker = start_broker(vault, environ=ENV_VALUES)
    stub = broker.stub(pki.catalog, pki.ca)
    assert get(stub, API).source == VAULT

    started = time.perf_counter()
    state = set_override(broker, pki, ["database"])
    first = get(stub, API)
    to_env = time.perf_counter() - started
    assert first.source == ENV, "the first request after the flip answered must see it"
    assert list(state.env_categories) == ["api"]
    assert get(stub, DATABASE).source == VAULT

    started = time.perf_counter()
    broker.admin(pki.ops, pki.ca).ClearRollbackOverride(
        broker_pb2.ClearRollbackOverrideRequest(), timeout=10
    )
    back = get(stub, API)
    to_vault = time.perf_counter() - started
    assert back.source == VAULT
    assert dict(back.data) == vault.written[API]
    measure("rollback flip RPC + next read, to env (ms)", to_env * 1000)
    measure("rollback flip RPC + next read, back to vault (ms)", to_vault * 1000)


def test_flip_is_pushed_to_watchers(vault: Vault, pki: Pki, start_broker: BrokerFactory) -> None:
    broker = start_broker(vault, environ=ENV_VALUES)
    watch = Watch(broker.stub(pki.catalog, pki.ca), [API, DATABASE])
    first = [watch.next() for _ in range(2)]
    assert {(s.name, s.source) for s in first} == {(API, VAULT), (DATABASE, VAULT)}

    set_override(broker, pki, ["database"])
    pushed = watch.next()
    assert (pushed.name, pushed.source, pushed.data["value"]) == (API, ENV, f"env-{API}-value")

    set_override(broker, pki, ["database", "api"])
    pushed = watch.next()
    assert (pushed.name, pushed.source) == (API, VAULT)
    assert dict(pushed.data) == vault.written[API]
    watch.cancel()


def test_only_admins_may_flip_or_read_the_state(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, environ=ENV_VALUES)
    for client in (pki.catalog, pki.intruder, pki.cn_only):
        admin = broker.admin(client, pki.ca)
        request = broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=[])
        calls: list[Callable[[], object]] = [
            functools.partial(admin.SetRollbackOverride, request, timeout=10),
            functools.partial(
                admin.GetRollbackState, broker_pb2.GetRollbackStateRequest(), timeout=10
            ),
            functools.partial(
                admin.ClearRollbackOverride, broker_pb2.ClearRollbackOverrideRequest(), timeout=10
            ),
        ]
        for call in calls:
            assert status_of(call) == grpc.StatusCode.PERMISSION_DENIED
    assert get(broker.stub(pki.catalog, pki.ca), API).source == VAULT, "nothing was flipped"


def test_unknown_category_is_invalid_and_changes_nothing(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, environ=ENV_VALUES)
    with pytest.raises(grpc.RpcError) as caught:
        set_override(broker, pki, ["databse"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown category 'databse'" in (caught.value.details() or "")
    assert get(broker.stub(pki.catalog, pki.ca), API).source == VAULT


def test_override_survives_restart_and_wins_over_the_variable_until_cleared(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    admin_settings = {"identities": ["spiffe://media.local/ops"], "state_file": "override.json"}
    environ = {**ENV_VALUES, "VAULT_ENABLED_SECRETS": '["database", "api"]'}
    first = start_broker(vault, environ=environ, admin=admin_settings)
    set_override(first, pki, ["database"])
    first.stop()

    second = start_broker(vault, environ=environ, admin=admin_settings)
    stub = second.stub(pki.catalog, pki.ca)
    admin = second.admin(pki.ops, pki.ca)
    state = admin.GetRollbackState(broker_pb2.GetRollbackStateRequest(), timeout=10).state
    assert state.rule == broker_pb2.ROLLBACK_RULE_OVERRIDE
    assert state.override.set_by == "spiffe://media.local/ops"
    assert state.startup_variable == '["database", "api"]'
    assert get(stub, API).source == ENV

    cleared = admin.ClearRollbackOverride(
        broker_pb2.ClearRollbackOverrideRequest(), timeout=10
    ).state
    assert cleared.rule == broker_pb2.ROLLBACK_RULE_STARTUP_VARIABLE
    assert not cleared.HasField("override")
    assert get(stub, API).source == VAULT
    assert not (tmp_path / "override.json").exists()


def test_flips_are_in_the_audit_trail(vault: Vault, pki: Pki, start_broker: BrokerFactory) -> None:
    broker = start_broker(vault, environ=ENV_VALUES, audit={"file": "audit.jsonl"})
    set_override(broker, pki, [])
    status_of(
        lambda: broker.admin(pki.catalog, pki.ca).SetRollbackOverride(
            broker_pb2.SetRollbackOverrideRequest(), timeout=10
        )
    )
    records = [json.loads(line) for line in broker.audit_lines()]

    admin = [r for r in records if r["event"] == "admin"]
    assert [(r["identity"], r["decision"]) for r in admin] == [
        ("spiffe://media.local/ops", "allow"),
        ("spiffe://media.local/catalog", "deny"),
    ]
    assert admin[0]["vault_enabled_categories"] == []
    flips = [r for r in admin if r.get("changed_categories")]
    assert [sorted(r["changed_categories"]) for r in flips] == [["api", "database"]]
    assert flips[0]["secrets"] == [API, DATABASE]


def test_a_flip_whose_record_cannot_be_written_changes_nothing_when_audit_is_fail_closed(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    state_file = tmp_path / "override.json"
    broker = start_broker(
        vault,
        environ=ENV_VALUES,
        audit={"file": "/dev/full", "fail_closed": True},
        admin={"identities": ["spiffe://media.local/ops"], "state_file": str(state_file)},
    )
    admin = broker.admin(pki.ops, pki.ca)
    before = broker.broker.rollback.status()

    # First: the trail's first refusal closes the doors (every later call meets a stopped
    # server, UNAVAILABLE), and only a call that reaches its handler can be denied.
    denied = status_of(lambda: set_override(broker, pki, [], client=pki.catalog))
    flip = status_of(lambda: set_override(broker, pki, []))
    clear = status_of(
        lambda: admin.ClearRollbackOverride(broker_pb2.ClearRollbackOverrideRequest(), timeout=10)
    )
    read_state = status_of(
        lambda: admin.GetRollbackState(broker_pb2.GetRollbackStateRequest(), timeout=10)
    )

    assert (flip, clear, read_state) == (grpc.StatusCode.UNAVAILABLE,) * 3
    assert denied == grpc.StatusCode.PERMISSION_DENIED  # not UNKNOWN: the refusal stands
    assert broker.broker.rollback.status() == before
    assert not state_file.exists()


def test_a_flip_that_cannot_be_saved_answers_unavailable_and_changes_nothing(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    state_file = tmp_path / "override.json"
    broker = start_broker(
        vault,
        environ=ENV_VALUES,
        admin={"identities": ["spiffe://media.local/ops"], "state_file": str(state_file)},
    )
    state_file.mkdir()  # a folder where the file should go: the save fails
    before = broker.broker.rollback.status()

    code = status_of(lambda: set_override(broker, pki, []))

    assert code == grpc.StatusCode.UNAVAILABLE
    assert broker.broker.rollback.status() == before
    assert get(broker.stub(pki.catalog, pki.ca), DATABASE).source == VAULT
    records = [json.loads(line) for line in broker.audit_lines()]
    flips = [r for r in records if r.get("rpc") == "SetRollbackOverride"]
    assert [r["decision"] for r in flips] == ["allow", "failed"]
    assert "cannot be saved" in flips[-1]["reason"]


def test_ops_cli_flips_and_shows_status(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, environ=ENV_VALUES)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return ops_cli([broker], pki, *args)

    flipped = cli("rollback", "set", '["database"]')
    assert flipped.returncode == 0, flipped.stderr
    assert "from env:   api" in flipped.stdout
    assert get(broker.stub(pki.catalog, pki.ca), API).source == ENV

    status = cli("status")
    assert "rule in force: live override" in status.stdout
    assert 'override: ["database"] set by spiffe://media.local/ops' in status.stdout

    bad = cli("rollback", "set", "database")
    assert bad.returncode == 2
    assert "must be a list of categories" in bad.stderr

    cleared = cli("rollback", "clear")
    assert "rule in force: default" in cleared.stdout
    assert get(broker.stub(pki.catalog, pki.ca), API).source == VAULT


def test_an_unreadable_override_file_stops_start_up_naming_the_key(
    vault: Vault, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    (tmp_path / "override.json").write_text('{"vault_enabled_categories": ')
    with pytest.raises(ConfigError) as caught:
        start_broker(vault, admin={"identities": [], "state_file": "override.json"})
    assert caught.value.key == "admin.state_file"


def test_ready_means_every_secret_is_answerable_from_its_current_source(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """All rolled back to env, the variables missing: Vault is fine, yet nothing can be served,
    so the broker is not ready, says which variables are missing, at start-up and in status."""
    missing_api = {k: v for k, v in ENV_VALUES.items() if not k.startswith("MEDIA_CATALOG_API")}
    broker = start_broker(vault, environ={"VAULT_ENABLED_SECRETS": "[]", **missing_api})

    wait_until(lambda: "no value to serve for" in broker.scrape("/readyz")[1])
    status, reason = broker.scrape("/readyz")
    assert status == 503
    assert f"no value to serve for: {API} (env: MEDIA_CATALOG_API_OTHER" in reason
    assert DATABASE not in reason
    assert "MEDIA_CATALOG_API_VALUE is not set" not in caplog.text
    assert "MEDIA_CATALOG_API_OTHER, MEDIA_CATALOG_API_VALUE are not set" in caplog.text
    state = (
        broker.admin(pki.ops, pki.ca)
        .GetRollbackState(broker_pb2.GetRollbackStateRequest(), timeout=10)
        .state
    )
    assert [(m.secret, list(m.variables), m.served_from_env) for m in state.missing_env] == [
        (API, ["MEDIA_CATALOG_API_OTHER", "MEDIA_CATALOG_API_VALUE"], True)
    ]

    set_override(broker, pki, ["api"])  # api back to Vault: everything answerable again
    wait_until(lambda: broker.scrape("/readyz")[0] == 200)


def test_readiness_says_not_logged_in_when_vault_answers_but_refuses_the_login(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    """Its own OpenBao: refused logins count towards the role's lockout (5 in 15 minutes)."""
    wrong = tmp_path / "wrong-secret-id"
    wrong.write_text("not-the-secret-id")
    auth = {
        "method": "approle",
        "role_id_file": str(private_vault.approle.role_id_file),
        "secret_id_file": str(wrong),
    }
    offset = private_vault.audit_offset()
    broker = start_broker(private_vault, auth=auth)

    wait_until(lambda: "no value to serve for" in broker.scrape("/readyz")[1])
    status, reason = broker.scrape("/readyz")
    assert status == 503
    assert reason.startswith(
        "warming up, not taking calls yet: the broker is not logged in to vault yet;"
        " no value to serve for"
    )
    # The token keeper's first login and its retries (1 s, then up to 2 s): reads add none.
    assert private_vault.logins_since(offset) <= 3, "reads add no login after a refusal"


def test_a_read_waiting_on_a_hung_vault_is_answered_from_env_the_moment_a_flip_moves_it(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """The flip helps the calls already waiting, not only those after it (in-process: the
    read waits on a Vault read held back by the test)."""
    broker = start_broker(vault, environ=dict(ENV_VALUES), timeout="30s")
    broker.forget(DATABASE)
    release = threading.Event()
    vault_source = broker.broker.vault
    real_read = vault_source.read

    def hung_read(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return real_read(*args, **kwargs)

    vault_source.read = hung_read  # type: ignore[method-assign]
    try:
        stub = broker.stub(pki.catalog, pki.ca)
        waiting = stub.GetSecret.future(broker_pb2.GetSecretRequest(name=DATABASE), timeout=20)
        time.sleep(0.3)
        assert not waiting.done(), "the read waits on Vault"
        admin = broker.admin(pki.ops, pki.ca)
        admin.SetRollbackOverride(
            broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=["api"]), timeout=10
        )
        answer = waiting.result(timeout=5).secret
    finally:
        release.set()
    assert answer.source == ENV
    assert dict(answer.data) == {k: f"env-{DATABASE}-{k}" for k in SECRET_KEYS}
