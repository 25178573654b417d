"""Client processes of the harness, so no client shares a GIL with a server. Each takes one JSON
argument and prints one JSON result line.

    python -m bench.workers latency '{"target": ..., "method": ..., "request": hex, ...}'
    python -m bench.workers throughput '{...,"seconds": 3}'
    python -m bench.workers vault '{"address": ..., "path": ..., "approle": [role_id_file, ...]}'
    python -m bench.workers config '{"target": ..., "calls": N}'
    python -m bench.workers streams '{"target": ..., "streams": 1000, "rotations": 3, ...}'
    python -m bench.workers http '{"url": ..., "method": "GET", "path": "/media", "count": N}'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import hvac

from devstack.harness import client_config
from devstack.pki import CertFiles
from secretbroker.client import (
    BrokerClientConfig,
    LiveSecrets,
    SecretsClient,
    secure_aio_channel,
    secure_channel,
)

Args = dict[str, Any]


def _config(args: Args) -> BrokerClientConfig:
    """The SDK's client settings, from what the rig passes to a worker process."""
    client = CertFiles(Path(args["cert"]), Path(args["key"]))
    return client_config(args["target"], Path(args["ca"]), client)


def _raw_call(args: Args) -> Callable[[], bytes]:
    """One unary call with raw bytes each way: the client's cost is the same for every server."""
    channel = secure_channel(_config(args))
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_unary(args["method"], None, None)  # raw bytes both ways
    request = bytes.fromhex(args["request"])
    return lambda: call(request, timeout=30)


def _timed(call: Callable[[], object], warmup: int, count: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        started = clock()
        call()
        samples.append((clock() - started) / 1000)
    return samples  # microseconds


def latency(args: Args) -> Args:
    return {"us": _timed(_raw_call(args), args.get("warmup", 200), args["count"])}


def alternating(args: Args) -> Args:
    """Two requests to one server, call for call, for ``seconds``: the same conditions for both,
    e.g. a secret whose TTL keeps expiring against one that is always a hit."""
    first = _raw_call(args)
    second = _raw_call({**args, "request": args["other_request"]})
    for _ in range(args.get("warmup", 200)):
        first()
        second()
    samples: tuple[list[float], list[float]] = ([], [])
    clock = time.perf_counter_ns
    deadline = time.monotonic() + args["seconds"]
    while time.monotonic() < deadline:
        for call, into in ((first, samples[0]), (second, samples[1])):
            started = clock()
            call()
            into.append((clock() - started) / 1000)
    return {"us": samples[0], "other_us": samples[1]}


def throughput(args: Args) -> Args:
    call = _raw_call(args)
    for _ in range(100):
        call()
    calls, deadline = 0, time.monotonic() + args["seconds"]
    while time.monotonic() < deadline:
        call()
        calls += 1
    return {"calls": calls, "seconds": args["seconds"]}


def vault(args: Args) -> Args:
    """A direct KV v2 read with hvac, as the ADR's VaultClient does on every uncached call."""
    client = hvac.Client(url=args["address"], token="", timeout=30)  # no ambient token
    if args.get("approle"):
        role_id, secret_id = (Path(p).read_text().strip() for p in args["approle"])
        client.auth.approle.login(role_id=role_id, secret_id=secret_id)

    def read() -> object:
        return client.secrets.kv.v2.read_secret_version(
            path=args["path"], mount_point="secret", raise_on_deleted_version=True
        )

    return {"us": _timed(read, args.get("warmup", 50), args["count"])}


def config(args: Args) -> Args:
    """``Config.jwt_secret_key`` on a catalog whose values LiveSecrets keeps current."""
    from catalog.config import CONFIG_SECRETS, Config

    client = SecretsClient(_config(args))
    live = LiveSecrets(client, CONFIG_SECRETS)
    live.wait_ready(timeout=30)
    settings = Config(live)
    samples = _timed(lambda: settings.jwt_secret_key, 1000, args["count"])
    live.close()
    client.close()
    return {"us": samples}


def http(args: Args) -> Args:
    """``count`` requests of one kind to the catalog service over one keep-alive connection,
    timed one by one; any answer but a success fails the worker."""
    import httpx

    headers = {"Authorization": f"Bearer {args['token']}"} if args.get("token") else {}
    with httpx.Client(base_url=args["url"], timeout=30) as client:

        def call() -> object:
            response = client.request(
                args["method"], args["path"], json=args.get("json"), headers=headers
            )
            return response.raise_for_status()

        return {"us": _timed(call, 50, args["count"])}


def catalog_load(args: Args) -> Args:
    """``clients`` clients adding and listing media on the catalog service until a line (or
    the end) on standard input; the outcomes counted: "ok", or the status or error."""
    import httpx

    outcomes: dict[str, int] = {}

    async def client_loop(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {args['token']}"}
        turn = 0
        while not stop.is_set():
            turn += 1
            try:
                added = await client.post("/media", json={"title": f"t{turn}"}, headers=headers)
                listed = await client.get("/media")
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                continue
            for response, expected in ((added, 201), (listed, 200)):
                outcome = "ok" if response.status_code == expected else str(response.status_code)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        waiting = loop.run_in_executor(None, sys.stdin.readline)
        waiting.add_done_callback(lambda _: stop.set())
        async with httpx.AsyncClient(base_url=args["url"], timeout=30) as client:
            await asyncio.gather(*(client_loop(client, stop) for _ in range(args["clients"])))

    asyncio.run(run())
    return {"outcomes": outcomes}


def streams(args: Args) -> Args:
    """Open ``streams`` server-streaming calls of ``method`` (``request``: its hex bytes) at
    once, spread over ``channels`` new connections. Print one JSON line once each stream has
    its first message or has failed (opened, refused by status code, seconds); then, for each
    of ``rotations`` messages, one line once every open stream has received it (or ``timeout``
    passed): when each did (CLOCK_MONOTONIC, shared by all processes). Messages are taken as
    bytes, unparsed, from the broker and the floor alike; ``routed``: the SDK's channel to
    brokers (health-checked), else a plain one (the floor has no health service)."""

    async def run() -> Args:
        config = _config(args)
        routed = args.get("routed", True)
        channels = [secure_aio_channel(config, routed=routed) for _ in range(args["channels"])]
        watches = [c.unary_stream(args["method"], None, None) for c in channels]
        request = bytes.fromhex(args["request"])
        started = time.monotonic()
        calls = [watches[i % len(watches)](request) for i in range(args["streams"])]
        first = await asyncio.gather(*(c.read() for c in calls), return_exceptions=True)
        open_seconds = time.monotonic() - started
        refused: dict[str, int] = {}
        held = []
        for call, message in zip(calls, first, strict=True):
            if isinstance(message, bytes):
                held.append(call)
                continue
            code = message.code().name if isinstance(message, grpc.aio.AioRpcError) else "EOF"
            refused[code] = refused.get(code, 0) + 1
        rotations = args.get("rotations", 1)
        received: list[list[float]] = [[] for _ in range(rotations)]
        everyone = [asyncio.Event() for _ in range(rotations)]

        async def follow(call: Any) -> None:
            for moments, all_received in zip(received, everyone, strict=True):
                if not isinstance(await call.read(), bytes):
                    return
                moments.append(time.monotonic())
                if len(moments) == len(held):
                    all_received.set()

        # Every stream is already waiting for its next message when the harness is told it
        # may rotate: the fan-out it measures is not this process starting 10,000 readers.
        readers = [asyncio.ensure_future(follow(c)) for c in held]
        await asyncio.sleep(0)
        ready = {"opened": len(held), "refused": refused, "open_seconds": open_seconds}
        print(json.dumps(ready), flush=True)  # noqa: T201 - the harness waits for this line
        for moments, all_received in zip(received, everyone, strict=True):
            if held:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_received.wait(), args.get("timeout", 60))
            print(json.dumps({"received": moments}), flush=True)  # noqa: T201 - one per rotation
        for reader in readers:
            reader.cancel()
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close(None)
        return {"rotations": rotations}

    return asyncio.run(run())


WORKERS: dict[str, Callable[[Args], Args]] = {
    "latency": latency,
    "alternating": alternating,
    "throughput": throughput,
    "vault": vault,
    "config": config,
    "streams": streams,
    "http": http,
    "catalog_load": catalog_load,
}

if __name__ == "__main__":
    result = WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result), flush=True)  # noqa: T201 - the harness reads this line
