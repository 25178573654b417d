"""WatchSecrets against a real broker and OpenBao: current values first, then every change
(rotation, a version written straight into Vault), GetSecret's access rules, and 1,000
concurrent streams on one broker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from devstack.harness import client_config, wait_until
from secretbroker.client import BrokerClientConfig, channel_credentials, secure_aio_channel
from secretbroker.v1 import broker_pb2, broker_pb2_grpc
from tests.support import (
    API,
    DATABASE,
    BrokerFactory,
    Measure,
    Pki,
    Vault,
    Watch,
    get,
    until,
)

ROTATING = {DATABASE: {}, API: {"rotation": {"key": "value"}}}


def test_first_the_current_values_then_a_rotation(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(private_vault, secrets_=ROTATING)
    watch = Watch(broker.stub(pki.catalog, pki.ca), [DATABASE, API, API])

    first = {secret.name: secret for secret in (watch.next(), watch.next())}
    assert set(first) == {DATABASE, API}, "one first message per distinct name"
    assert dict(first[API].data) == private_vault.written[API]

    rotated = broker.admin(pki.ops, pki.ca).RotateSecret(
        broker_pb2.RotateSecretRequest(name=API), timeout=30
    )
    pushed = watch.next()
    assert (pushed.name, pushed.version) == (API, rotated.version)
    assert pushed.data["value"] != first[API].data["value"]
    assert pushed.data["other"] == first[API].data["other"]
    watch.cancel()


def test_a_version_written_straight_into_vault_reaches_watchers(
    private_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    measure: Measure,
) -> None:
    broker = start_broker(private_vault, rollout={"watch_poll_interval": "300ms"})
    watch = Watch(broker.stub(pki.catalog, pki.ca), [API])
    assert watch.next().version == 1

    written_at = time.monotonic()
    version = private_vault.write(API, value="written-by-ops", other="o")
    pushed = watch.next()
    measure("ops write to watcher, poll every 300 ms (ms)", (time.monotonic() - written_at) * 1000)

    assert (pushed.version, pushed.data["value"]) == (version, "written-by-ops")
    assert get(broker.stub(pki.catalog, pki.ca), API).version == version, "the cache moved on too"
    watch.cancel()


@pytest.mark.parametrize(
    ("client", "names", "code"),
    [
        ("catalog", [], grpc.StatusCode.INVALID_ARGUMENT),
        ("catalog", [DATABASE, "../etc"], grpc.StatusCode.INVALID_ARGUMENT),
        ("catalog", [DATABASE, "media-catalog/undeclared"], grpc.StatusCode.NOT_FOUND),
        ("intruder", [DATABASE], grpc.StatusCode.PERMISSION_DENIED),
        ("catalog", [DATABASE, "billing/keys"], grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_every_name_is_checked_before_anything_is_sent(
    vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    client: str,
    names: list[str],
    code: grpc.StatusCode,
) -> None:
    broker = start_broker(vault)
    watch = Watch(broker.stub(getattr(pki, client), pki.ca), names, timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        watch.next()
    assert caught.value.code() == code


STREAMS = 1000
CHANNELS = 4


if TYPE_CHECKING:  # the async stub exists in the type stubs only
    Stub = broker_pb2_grpc.SecretBrokerAsyncStub
    WatchCall = grpc.aio.UnaryStreamCall[
        broker_pb2.WatchSecretsRequest, broker_pb2.WatchSecretsResponse
    ]


@contextlib.asynccontextmanager
async def watches(
    config: BrokerClientConfig, count: int
) -> AsyncIterator[tuple[list[Stub], list[WatchCall]]]:
    """``count`` WatchSecrets streams of API opened at once over CHANNELS connections; on exit
    every stream is cancelled and every connection closed."""
    channels = [secure_aio_channel(config) for _ in range(CHANNELS)]
    stubs = [broker_pb2_grpc.SecretBrokerStub(channel) for channel in channels]
    request = broker_pb2.WatchSecretsRequest(names=[API])
    calls = [stubs[i % CHANNELS].WatchSecrets(request, timeout=120) for i in range(count)]
    try:
        yield stubs, calls
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close(None)


def test_one_broker_holds_1000_streams_all_get_a_rotation_and_getsecret_keeps_answering(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, measure: Measure
) -> None:
    broker = start_broker(private_vault, secrets_=ROTATING, log_level="INFO")
    config = client_config(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)
    admin = broker.admin(pki.ops, pki.ca)

    async def scenario() -> tuple[set[int], int]:
        async with watches(config, STREAMS) as (stubs, calls):
            return await follow(stubs, calls)

    async def follow(stubs: list[Stub], calls: list[WatchCall]) -> tuple[set[int], int]:
        firsts = await asyncio.gather(*(call.read() for call in calls))
        assert all(isinstance(m, broker_pb2.WatchSecretsResponse) for m in firsts)
        before = {
            m.secret.version for m in firsts if isinstance(m, broker_pb2.WatchSecretsResponse)
        }
        assert len(before) == 1

        started = time.monotonic()
        rotation = asyncio.get_running_loop().run_in_executor(
            None, lambda: admin.RotateSecret(broker_pb2.RotateSecretRequest(name=API), timeout=30)
        )
        pushed = asyncio.gather(*(call.read() for call in calls))
        answered = 0
        while not pushed.done():  # GetSecret keeps answering while 1,000 streams are served
            response = await stubs[0].GetSecret(
                broker_pb2.GetSecretRequest(name=DATABASE), timeout=30
            )
            answered += response.secret.name == DATABASE
            await asyncio.sleep(0.01)
        await rotation
        measure(
            "rotation RPC until all 1,000 streams have it (ms)", (time.monotonic() - started) * 1000
        )
        versions = {
            m.secret.version
            for m in pushed.result()
            if isinstance(m, broker_pb2.WatchSecretsResponse)
        }
        return versions - before, answered

    new_versions, answered = asyncio.run(scenario())

    assert len(new_versions) == 1, "all 1,000 streams got the same, new version"
    assert answered >= 1
    watch_records = [
        record
        for record in map(json.loads, broker.audit_lines())
        if record.get("rpc") == "WatchSecrets" and record["secret"] == API
    ]
    opened = [r for r in watch_records if "streams" not in r]
    pushed = [r for r in watch_records if "streams" in r]
    assert len(opened) == STREAMS, "each stream's first value is a record of its own"
    assert [(r["version"], r["streams"]) for r in pushed] == [(*new_versions, STREAMS)], (
        "the rotation's fan-out is one record naming the streams it reached"
    )
    wait_until(lambda: len(broker.broker.feed) == 0, 30, "cancelled streams unsubscribed")


def test_open_streams_are_frozen_out_of_full_collections_and_leave_no_frozen_garbage(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """A full collection scans every unfrozen tracked object (gc.get_objects()); with 10,000
    streams open it stopped the event loop for half a second. The broker freezes what
    survives a second (broker/heap.py): open streams add almost nothing to what a collection
    scans, and closed streams leave no garbage among the frozen objects (a reference cycle
    there would never be collected)."""
    streams = 500
    gc.collect()  # earlier tests' garbage, before this broker freezes it with the rest
    broker = start_broker(private_vault, secrets_=ROTATING)
    config = client_config(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)
    wait_until(lambda: gc.get_freeze_count() > 0, 10, "the broker's first freeze")

    async def scenario() -> tuple[int, int]:
        started = gc.get_freeze_count()
        await until(lambda: gc.get_freeze_count() > started, "this loop's start-up frozen")
        scanned, frozen = len(gc.get_objects()), gc.get_freeze_count()
        async with watches(config, streams) as (_, calls):
            await asyncio.gather(*(call.read() for call in calls))
            await until(lambda: gc.get_freeze_count() > frozen + streams * 20, "a freeze")
            return scanned, len(gc.get_objects())

    scanned_before, scanned_open = asyncio.run(scenario())
    assert scanned_open - scanned_before < streams * 5, "open streams stay in what gc scans"
    wait_until(lambda: len(broker.broker.feed) == 0, 30, "the closed streams unsubscribed")
    frozen = gc.get_freeze_count()
    wait_until(lambda: gc.get_freeze_count() != frozen, 10, "a freeze after they closed")
    gc.unfreeze()  # what was frozen, back to the collector: any unreachable part is garbage
    assert gc.collect() < streams, "the closed streams left reference cycles behind"


def test_one_identity_is_capped_in_streams_and_names_per_watch(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Past a cap: RESOURCE_EXHAUSTED naming it, counted, logged once per identity per interval;
    a stream closed frees its place."""
    broker = start_broker(vault, limits={"max_watch_streams_per_identity": 2, "max_watch_names": 2})
    stub = broker.stub(pki.catalog, pki.ca)
    watches = [Watch(stub, [DATABASE]) for _ in range(2)]
    for watch in watches:
        watch.next()

    refusals = []
    for names in ([DATABASE], [DATABASE], [DATABASE, API, "media-catalog/x"]):
        with pytest.raises(grpc.RpcError) as caught:
            Watch(stub, names).next()
        refusals.append((caught.value.code(), caught.value.details() or ""))

    assert [code for code, _ in refusals] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert "limits.max_watch_streams_per_identity is 2" in refusals[0][1]
    assert "the request lists 3 names; limits.max_watch_names is 2" in refusals[2][1]
    _, metrics = broker.scrape()
    assert 'secretbroker_limit_refusals_total{limit="watch_streams_per_identity"} 2.0' in metrics
    assert 'secretbroker_limit_refusals_total{limit="watch_names"} 1.0' in metrics
    assert caplog.text.count("limits.max_watch_streams_per_identity") == 1
    assert get(stub, API).name == API, "GetSecret is not capped"

    watches[0].cancel()

    def a_new_stream_opens() -> bool:  # the broker notices the cancel on its next turn
        return Watch(stub, [DATABASE]).next().name == DATABASE

    wait_until(a_new_stream_opens, 10, "a closed stream to free its place", (grpc.RpcError,))


@pytest.mark.parametrize(("accepted", "stays_open"), [("500ms", True), ("2s", False)])
def test_an_idle_watch_outlives_client_keepalive_pings_at_the_accepted_interval(
    private_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    accepted: str,
    stays_open: bool,
) -> None:
    """Clients ping connections whose streams are idle (the SDK every 60 s). gRPC's server
    default (5 minutes between pings) answers that with GOAWAY too_many_pings, which broke
    every idle watch after its third ping. The broker accepts pings
    server.min_client_ping_interval apart (10 s by default; scaled down here against a client
    that pings every 0.6 s), and cuts off a client that pings more often."""
    broker = start_broker(
        private_vault, secrets_=ROTATING, server={"min_client_ping_interval": accepted}
    )
    options = [("grpc.keepalive_time_ms", 600), ("grpc.http2.max_pings_without_data", 0)]
    credentials = channel_credentials(pki.ca, pki.catalog.cert, pki.catalog.key)
    with grpc.secure_channel(f"127.0.0.1:{broker.port}", credentials, options) as channel:
        watch = Watch(broker_pb2_grpc.SecretBrokerStub(channel), [API])
        assert watch.next().version == 1
        time.sleep(6 * 0.6)  # idle: the stream's only traffic is six pings

        rotated = broker.admin(pki.ops, pki.ca).RotateSecret(
            broker_pb2.RotateSecretRequest(name=API), timeout=30
        )
        if stays_open:
            assert watch.next().version == rotated.version
        else:
            with pytest.raises(grpc.RpcError) as broken:
                watch.next()
            assert broken.value.code() == grpc.StatusCode.UNAVAILABLE


BURST = 3000


@pytest.mark.parametrize(("max_pending_calls", "refused"), [(None, False), (100, True)])
def test_a_burst_of_stream_opens_is_taken_up_not_shed_below_max_pending_calls(
    private_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    max_pending_calls: int | None,
    refused: bool,
) -> None:
    """A fleet's watchers reconnect at once. The aio server takes arrived calls up one per
    event-loop turn, and gRPC core sheds the ones waiting past its own limits (at random past
    1,000, all past 3,000): 3,000 opens at once here had about 720 CANCELLED before. The broker
    sets core's limit to limits.max_pending_calls (20,000 by default), so all are served; a
    limit set low sheds again, which shows it is this limit at work."""
    limits = {"max_watch_streams_per_identity": BURST}
    if max_pending_calls is not None:
        limits["max_pending_calls"] = max_pending_calls
    broker = start_broker(private_vault, limits=limits)
    config = client_config(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)

    async def burst() -> Counter[str]:
        async with watches(config, BURST) as (_, calls):
            firsts = await asyncio.gather(*(call.read() for call in calls), return_exceptions=True)
        return Counter(outcome(first) for first in firsts)

    codes = asyncio.run(burst())

    if refused:  # core's refusal reaches the client as CANCELLED, not RESOURCE_EXHAUSTED
        assert set(codes) == {"OK", "CANCELLED"}, codes
    else:
        assert codes == {"OK": BURST}


def outcome(first: object) -> str:
    """A stream's first read: "OK" for a message, else the status code's name."""
    if isinstance(first, broker_pb2.WatchSecretsResponse):
        return "OK"
    return first.code().name if isinstance(first, grpc.aio.AioRpcError) else repr(first)
