"""The asyncio SDK against real brokers and a real OpenBao: AsyncSecretsClient and
AsyncLiveSecrets give the sync SDK's guarantees (never back a version, resume on another
replica, follow rotated client certificates, changes as they happen) on one task per live
view and no thread of their own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from devstack.harness import client_config, free_port_pair
from secretbroker.client import (
    AsyncLiveSecrets,
    AsyncSecretsClient,
    Backoff,
    NotWatched,
    RetryPolicy,
    SecretBrokerError,
    SecretChange,
    SecretUnavailable,
)
from secretbroker.v1 import broker_pb2
from tests.support import (
    API,
    DATABASE,
    BrokerFactory,
    Pki,
    RenewedClientFiles,
    Vault,
    get,
    metric,
    until,
)

FAST_RESUME = Backoff(initial=0.05, maximum=0.5)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_live_view_serves_from_memory_and_yields_each_rotation_as_a_change(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, secrets_={API: {"rotation": {"key": "value"}}, DATABASE: {}})
    config = client_config(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)
    admin = broker.admin(pki.ops, pki.ca)

    async def scenario() -> None:
        async with (
            AsyncSecretsClient(config) as client,
            AsyncLiveSecrets(client, [API, DATABASE]) as live,
        ):
            await live.wait_ready(timeout=20)
            first = live.get_secret(API)
            assert (await client.get_secret(API)).version == first.version
            seen: list[SecretChange] = []
            live.on_change(seen.append)
            changes = live.changes()
            following = asyncio.ensure_future(anext(changes))
            await asyncio.sleep(0)
            rotated = await asyncio.to_thread(
                admin.RotateSecret, broker_pb2.RotateSecretRequest(name=API), timeout=30
            )
            change = await asyncio.wait_for(following, 20)
            assert (change.name, change.previous.version) == (API, first.version)
            assert change.current.version == rotated.version == live.get_secret(API).version
            assert change.current.data != first.data
            assert seen == [change], "the callback saw the same one change"
            assert first.data["value"] not in repr(change), "a change never prints its values"
            await changes.aclose()

            with pytest.raises(NotWatched) as unwatched:
                live.get_secret("media-catalog/external")
            assert isinstance(unwatched.value, KeyError)
            assert isinstance(unwatched.value, SecretBrokerError)

    run(scenario)


def test_changes_end_when_the_live_view_closes(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, secrets_={API: {}})
    config = client_config(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)

    async def scenario() -> None:
        async with AsyncSecretsClient(config) as client:
            live = AsyncLiveSecrets(client, [API])
            live.start()
            await live.wait_ready(timeout=20)
            collected = asyncio.ensure_future(_collect(live))
            await asyncio.sleep(0.05)
            await live.aclose()
            assert await asyncio.wait_for(collected, 5) == []

    run(scenario)


async def _collect(live: AsyncLiveSecrets) -> list[SecretChange]:
    return [change async for change in live.changes()]


def test_point_reads_never_go_back_a_version_across_replicas_whose_caches_disagree(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    replicas = [start_broker(vault, secrets_={API: {"ttl": "1h"}}) for _ in range(2)]
    old = get(replicas[1].stub(pki.catalog, pki.ca), API).version
    new = vault.write(API, value="newer", other="o")
    replicas[0].forget(API)
    config = client_config([f"127.0.0.1:{r.port}" for r in replicas], pki.ca, pki.catalog)

    async def scenario() -> None:
        async with AsyncSecretsClient(config) as client:
            versions = [(await client.get_secret(API)).version for _ in range(20)]
        assert versions == sorted(versions), f"a point read went back: {versions}"
        assert versions[-1] == new > old

    run(scenario)


def test_a_watch_resumes_on_another_replica_when_its_own_stops(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    rotating = {API: {"rotation": {"key": "value"}}}
    replicas = [start_broker(vault, secrets_=rotating) for _ in range(2)]
    config = client_config([f"127.0.0.1:{r.port}" for r in replicas], pki.ca, pki.catalog)

    def holder() -> int | None:
        held = [i for i, r in enumerate(replicas) if metric(r, "secretbroker_watch_streams") == 1]
        return held[0] if held else None

    async def scenario() -> None:
        async with (
            AsyncSecretsClient(config) as client,
            AsyncLiveSecrets(client, [API], FAST_RESUME) as live,
        ):
            await live.wait_ready(timeout=20)
            await until(lambda: holder() is not None, "one replica holds the watch")
            lost = holder()
            assert lost is not None
            await asyncio.to_thread(replicas[lost].stop)
            survivor = replicas[1 - lost]
            await until(
                lambda: metric(survivor, "secretbroker_watch_streams") == 1,
                "the watch resumed on the other replica",
            )
            rotated = await asyncio.to_thread(
                survivor.admin(pki.ops, pki.ca).RotateSecret,
                broker_pb2.RotateSecretRequest(name=API),
                timeout=30,
            )
            await until(
                lambda: live.get_secret(API).version == rotated.version, "the rotated version"
            )

    run(scenario)


def test_rotated_client_certificates_move_the_channel_and_the_watch(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    """As the sync SDK's test: after the files change, a broker that trusts only the new CA
    serves both the point reads and the watch."""
    files = RenewedClientFiles(pki, tmp_path)
    port = free_port_pair()
    first = start_broker(vault, listen=f"127.0.0.1:{port}")
    config = files.config(port)

    async def scenario() -> None:
        async with (
            AsyncSecretsClient(config) as client,
            AsyncLiveSecrets(client, [API], FAST_RESUME) as live,
        ):
            await live.wait_ready(timeout=20)
            new_ca_file = await asyncio.to_thread(files.renew)
            await until(lambda: client.reconnects == 1, "the channel rebuilt")

            await asyncio.to_thread(first.stop)
            await asyncio.to_thread(
                start_broker, vault, listen=f"127.0.0.1:{port}", client_ca=new_ca_file
            )
            assert (await client.get_secret(API)).name == API
            await until(lambda: live.connected, "the watch resumed on the new broker")

    run(scenario)


def test_many_live_views_start_no_thread_and_a_refusal_is_the_reason(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, secrets_={API: {}})
    config = client_config(f"127.0.0.1:{broker.port}", pki.ca, pki.intruder)

    async def scenario() -> None:
        async with AsyncSecretsClient(config) as client:
            first = AsyncLiveSecrets(client, [API], FAST_RESUME)
            first.start()
            await asyncio.sleep(0.2)
            threads = threading.active_count()
            views = [AsyncLiveSecrets(client, [API], FAST_RESUME) for _ in range(20)]
            for view in views:
                view.start()
            with pytest.raises(SecretUnavailable) as refused:
                await first.wait_ready(timeout=0.5)
            assert threading.active_count() == threads, "a live view started a thread"
            for view in [first, *views]:
                await view.aclose()
        assert refused.value.code.name == "PERMISSION_DENIED"

    run(scenario)


def test_retries_wait_for_a_late_broker_and_give_up_at_the_overall_deadline(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """The sync client's retry policy, on asyncio.sleep: one broker comes up a second late and
    is read; with nothing listening, the call ends with the last status after its deadline."""
    port, nobody = free_port_pair(), free_port_pair()
    patient = RetryPolicy(max_attempts=50, overall_deadline=30)
    late = client_config(f"127.0.0.1:{port}", pki.ca, pki.catalog, retry=patient)
    brief = RetryPolicy(max_attempts=100, backoff=Backoff(initial=0.05), overall_deadline=1.0)
    absent = client_config(f"127.0.0.1:{nobody}", pki.ca, pki.catalog, retry=brief)

    async def scenario() -> None:
        async with AsyncSecretsClient(late) as client:
            reading = asyncio.ensure_future(client.get_secret(API))
            await asyncio.sleep(1)
            assert not reading.done()
            await asyncio.to_thread(start_broker, vault, listen=f"127.0.0.1:{port}")
            assert (await reading).name == API
        async with AsyncSecretsClient(absent) as client:
            with pytest.raises(SecretUnavailable) as caught:
                await client.get_secret(API)
            assert caught.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")

    run(scenario)
