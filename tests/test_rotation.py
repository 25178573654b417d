"""Rotation against a real OpenBao: new versions with check-and-set, on demand and on schedule,
once across replicas; previous versions stay readable for a while."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import pytest
import requests

from broker.config import SecretSpec
from broker.sources import vault as vault_module
from broker.sources.base import SecretValue
from devstack.harness import wait_until
from secretbroker.v1 import broker_pb2
from tests.support import (
    API,
    DATABASE,
    KV_MOUNT,
    BrokerFactory,
    Pki,
    RunningBroker,
    Vault,
    get,
    metric,
    samples,
    status_of,
)

ROTATING = {DATABASE: {}, API: {"rotation": {"key": "value", "bytes": 24}}}


def rotate(broker: RunningBroker, pki: Pki, name: str = API) -> broker_pb2.RotateSecretResponse:
    return broker.admin(pki.ops, pki.ca).RotateSecret(
        broker_pb2.RotateSecretRequest(name=name), timeout=30
    )


def current_version(vault: Vault, path: str = API) -> int:
    metadata = vault.admin.secrets.kv.v2.read_secret_metadata(path=path, mount_point=KV_MOUNT)
    return int(metadata["data"]["current_version"])


def test_rotation_replaces_the_key_keeps_the_others_and_serves_the_new_version(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    private_vault.write(API, value="v" * 32, other="o" * 16, undeclared="kept in vault")
    broker = start_broker(private_vault, secrets_=ROTATING)
    stub = broker.stub(pki.catalog, pki.ca)
    before = get(stub, API)

    rotated = rotate(broker, pki)

    assert rotated.version == before.version + 1 == current_version(private_vault)
    after = get(stub, API)
    assert after.version == rotated.version
    assert after.data["value"] != before.data["value"]
    assert len(after.data["value"]) == 32  # 24 random bytes, URL-safe base64
    assert after.data["other"] == before.data["other"]
    assert after.created_at.ToSeconds() == rotated.created_at.ToSeconds()
    previous = get(stub, API, version=before.version)
    assert dict(previous.data) == dict(before.data)
    assert set(after.data) == {"value", "other"}  # served: the declared keys only
    stored = private_vault.admin.secrets.kv.v2.read_secret_version(
        path=API, mount_point="secret", raise_on_deleted_version=True
    )["data"]["data"]
    assert stored["undeclared"] == "kept in vault"  # written back: every key


def test_three_replicas_rotating_the_same_version_write_exactly_one(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    brokers = [start_broker(private_vault, secrets_=ROTATING) for _ in range(3)]
    version = current_version(private_vault)
    # Hold the writes until every broker has read the same version: a real race, forced.
    both_read = threading.Barrier(3, timeout=20)

    def after_both_read(write: Callable[..., SecretValue]) -> Callable[..., SecretValue]:
        def write_after_both_read(
            spec: SecretSpec, data: Mapping[str, str], expected_version: int
        ) -> SecretValue:
            both_read.wait()
            return write(spec, data, expected_version=expected_version)

        return write_after_both_read

    for broker in brokers:
        vault_source = broker.broker.vault
        monkeypatch.setattr(
            vault_source, "write_version", after_both_read(vault_source.write_version)
        )

    outcomes: list[Any] = []

    def attempt(broker: RunningBroker) -> None:
        try:
            outcomes.append(rotate(broker, pki).version)
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    threads = [threading.Thread(target=attempt, args=(b,)) for b in brokers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(outcomes, key=str) == sorted(
        [version + 1, grpc.StatusCode.ABORTED, grpc.StatusCode.ABORTED], key=str
    )
    assert current_version(private_vault) == version + 1


def test_a_rotation_vault_wrote_but_whose_answer_was_lost_succeeds_with_one_version(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """As when the raft leader dies between committing a write and answering it: the broker
    sends the write again, gets a check-and-set conflict, finds its own value in the next
    version, and answers with it; nothing is written twice."""
    caplog.set_level(logging.INFO, logger="broker.sources.vault")
    broker = start_broker(private_vault, secrets_=ROTATING)
    stub = broker.stub(pki.catalog, pki.ca)
    before = current_version(private_vault)
    lost: list[str] = []

    def lose_the_first_write_answer(response: requests.Response, *_: Any, **__: Any) -> None:
        request = response.request
        if request.method in ("POST", "PUT") and "/data/" in str(request.url) and not lost:
            lost.append(str(request.url))
            raise requests.ConnectionError("connection reset after the write")

    for node in broker.broker.vault.session.nodes.nodes:
        node.client.adapter.session.hooks["response"].append(lose_the_first_write_answer)

    rotated = rotate(broker, pki)

    assert lost, "the write's answer was lost"
    assert rotated.version == before + 1 == current_version(private_vault)
    stored = private_vault.admin.secrets.kv.v2.read_secret_version(
        path=API, mount_point=KV_MOUNT, raise_on_deleted_version=True
    )["data"]["data"]
    assert get(stub, API).data["value"] == stored["value"]
    assert "although its answer was lost" in caplog.text


def hang_vault_after_the_rotation_reads(
    vault: Vault, broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, back_after: float | None
) -> None:
    """Pause Vault right after the next rotation has read the current version, so that its
    check-and-set write meets a hung Vault; resume it ``back_after`` seconds later."""
    source = broker.broker.vault
    read_all = source.read_all

    def read_then_hang(spec: SecretSpec, version: int | None = None) -> SecretValue:
        value = read_all(spec, version)
        monkeypatch.setattr(source, "read_all", read_all)  # once
        vault.server.pause()
        if back_after is not None:
            threading.Timer(back_after, vault.server.resume).start()
        return value

    monkeypatch.setattr(source, "read_all", read_then_hang)


def test_a_rotation_write_that_meets_a_hung_vault_is_sent_again_and_lands_once(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write times out (Vault may still apply it when it wakes); sent again with the same
    check-and-set, it ends in exactly one new version, answered as the rotation's."""
    broker = start_broker(private_vault, secrets_=ROTATING, timeout="1s")
    wait_until(  # the schedule's first check at start-up is done: only ours touches Vault now
        lambda: metric(broker, "secretbroker_rotation_timestamp_seconds", secret=API) > 0,
        ignoring=(AssertionError,),
    )
    before = get(broker.stub(pki.catalog, pki.ca), API).version
    hang_vault_after_the_rotation_reads(private_vault, broker, monkeypatch, back_after=2.5)

    rotated = rotate(broker, pki)

    assert rotated.version == before + 1 == current_version(private_vault)
    assert get(broker.stub(pki.catalog, pki.ca), API).version == rotated.version


def test_a_rotation_write_vault_never_answers_within_the_settle_time_is_unavailable(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNAVAILABLE, the cached value still served; however many times the write was sent, at
    most one version lands when Vault wakes (check-and-set on the version read)."""
    monkeypatch.setattr(vault_module, "WRITE_SETTLE", 3.0)
    broker = start_broker(private_vault, secrets_=ROTATING, timeout="1s")
    wait_until(  # the schedule's first check at start-up is done: only ours touches Vault now
        lambda: metric(broker, "secretbroker_rotation_timestamp_seconds", secret=API) > 0,
        ignoring=(AssertionError,),
    )
    stub = broker.stub(pki.catalog, pki.ca)
    before = get(stub, API)
    offset = private_vault.audit_offset()
    hang_vault_after_the_rotation_reads(private_vault, broker, monkeypatch, back_after=None)
    try:
        assert status_of(lambda: rotate(broker, pki)) == grpc.StatusCode.UNAVAILABLE
        assert get(stub, API).version == before.version, "the cached value is still served"
    finally:
        private_vault.server.resume()
    sent = sum(
        value
        for (name, labels), value in samples(broker).items()
        if name == "secretbroker_vault_requests_total" and ("operation", "write") in labels
    )
    assert sent >= 1, "the rotation sent its write"

    def answered() -> float:
        return private_vault.writes_since(offset, API, answered=True) + private_vault.writes_since(
            offset, API, answered=False
        )

    # Every write the broker sent while Vault hung is taken in and answered once Vault wakes:
    wait_until(lambda: answered() >= sent, what="OpenBao's answers to the writes it held")
    assert private_vault.writes_since(offset, API) == sent
    applied = private_vault.writes_since(offset, API, answered=True)
    assert applied <= 1, "check-and-set: one version at most, however often it was sent"
    assert current_version(private_vault) == before.version + applied


def test_scheduled_rotation_fires_once_across_two_replicas(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    version = private_vault.write(API, value="initial", other="kept")
    schedule = {DATABASE: {}, API: {"rotation": {"key": "value", "period": "3s"}}}
    rollout = {"rotation_check_interval": "100ms"}
    replicas = [start_broker(private_vault, secrets_=schedule, rollout=rollout) for _ in range(2)]

    wait_until(
        lambda: current_version(private_vault) > version, what="the due rotation", timeout=20
    )
    assert current_version(private_vault) == version + 1
    # Both replicas have checked since, and found the new version not due: no second write.
    created = private_vault.admin.secrets.kv.v2.read_secret_metadata(
        path=API, mount_point=KV_MOUNT
    )["data"]["versions"][str(version + 1)]["created_time"]
    whole, _, fraction = created.rstrip("Z").partition(".")
    written_at = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC).timestamp()
    written_at += float(f"0.{fraction or 0}")

    def has_checked_the_new_version(replica: RunningBroker) -> bool:
        seen = metric(replica, "secretbroker_rotation_timestamp_seconds", secret=API)
        return abs(seen - written_at) < 0.001

    for replica in replicas:
        wait_until(
            functools.partial(has_checked_the_new_version, replica),
            what="each replica's check of the new version",
        )
    assert current_version(private_vault) == version + 1
    rotated = private_vault.admin.secrets.kv.v2.read_secret_version(
        path=API, mount_point=KV_MOUNT, raise_on_deleted_version=True
    )["data"]["data"]
    assert rotated["other"] == "kept"
    assert rotated["value"] != "initial"


def test_rotation_refusals(private_vault: Vault, pki: Pki, start_broker: BrokerFactory) -> None:
    broker = start_broker(
        private_vault,
        secrets_=ROTATING,
        environ={"VAULT_ENABLED_SECRETS": '["database"]'},
    )
    version = current_version(private_vault)

    def code_and_details(name: str, client: Any = pki.ops) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as caught:
            broker.admin(client, pki.ca).RotateSecret(
                broker_pb2.RotateSecretRequest(name=name), timeout=10
            )
        return caught.value.code(), caught.value.details() or ""

    code, details = code_and_details(API)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "environment variables" in details
    code, details = code_and_details(DATABASE)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not declared rotating" in details
    assert code_and_details("media-catalog/nope")[0] == grpc.StatusCode.NOT_FOUND
    assert code_and_details("../x")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_and_details(API, pki.catalog)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert current_version(private_vault) == version


def test_version_window(private_vault: Vault, pki: Pki, start_broker: BrokerFactory) -> None:
    broker = start_broker(private_vault, secrets_=ROTATING, rollout={"previous_versions": 1})
    stub = broker.stub(pki.catalog, pki.ca)
    first = get(stub, API).version
    rotate(broker, pki)
    newest = rotate(broker, pki).version

    assert get(stub, API, version=newest - 1).version == newest - 1
    assert get(stub, API, version=newest).version == newest
    for version, code in (
        (first, grpc.StatusCode.OUT_OF_RANGE),
        (newest + 1, grpc.StatusCode.OUT_OF_RANGE),
        (0, grpc.StatusCode.INVALID_ARGUMENT),
        (-3, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        assert status_of(functools.partial(get, stub, API, version=version)) == code


def test_no_version_of_an_env_sourced_secret(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    environ = {"VAULT_ENABLED_SECRETS": "[]", "MEDIA_CATALOG_API_VALUE": "v"}
    environ["MEDIA_CATALOG_API_OTHER"] = "o"
    stub = start_broker(vault, environ=environ).stub(pki.catalog, pki.ca)
    assert status_of(functools.partial(get, stub, API, version=1)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


def test_the_schedule_leaves_a_rolled_back_secret_alone(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """Both secrets are due; the schedule tries the one served from Vault (its attempt shows in
    the metrics: the broker's Vault policy refuses the write) and never the rolled-back one."""
    version = private_vault.write(API, value="initial", other="kept")
    due = {"rotation": {"key": "value", "period": "1s"}}
    broker = start_broker(
        private_vault,
        secrets_={DATABASE: due, API: due},
        rollout={"rotation_check_interval": "100ms"},
        environ={
            "VAULT_ENABLED_SECRETS": '["database"]',
            "MEDIA_CATALOG_API_VALUE": "env-value",
            "MEDIA_CATALOG_API_OTHER": "env-other",
        },
    )
    rotations = "secretbroker_rotations_total"
    wait_until(lambda: metric(broker, rotations, secret=DATABASE, result="failed") >= 3)

    assert current_version(private_vault) == version
    assert all(
        metric(broker, rotations, secret=API, result=result) == 0
        for result in ("rotated", "conflict", "failed")
    )
