"""The floor: a bare grpc.aio server over the same mutual TLS as the broker, answering a fixed
payload of the same size as the broker's answer, with no logic at all: ``Get`` once, ``Watch``
now and again after every ``Publish`` (a watch stream with nothing behind it, the floor of
the broker's fan-out); ``Watches`` answers how many are open.

    python -m bench.floor PORT CERT KEY CLIENT_CA PAYLOAD_BYTES
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from broker.config import LimitsConfig
from broker.heap import freeze_survivors

METHOD = "/bench.Floor/Get"
WATCH = "/bench.Floor/Watch"
PUBLISH = "/bench.Floor/Publish"
WATCHES = "/bench.Floor/Watches"
MAX_PENDING_CALLS = LimitsConfig().max_pending_calls
"""The broker's default: a burst of 10,000 opens is taken up, not shed (broker/server.py)."""


async def serve(port: int, cert: bytes, key: bytes, client_ca: bytes, size: int) -> None:
    payload = b"x" * size
    published = [asyncio.Event()]
    """Set, and replaced, by each Publish: a waiter of its own per stream, as in the broker."""
    watching = [0]

    async def get(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return payload

    async def watch(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        watching[0] += 1
        try:
            while True:
                yield payload
                await published[0].wait()
        finally:
            watching[0] -= 1

    async def publish(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        done, published[0] = published[0], asyncio.Event()
        done.set()
        return b""

    async def watches(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return str(watching[0]).encode()

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Floor",
                {
                    "Get": grpc.unary_unary_rpc_method_handler(get),
                    "Watch": grpc.unary_stream_rpc_method_handler(watch),
                    "Publish": grpc.unary_unary_rpc_method_handler(publish),
                    "Watches": grpc.unary_unary_rpc_method_handler(watches),
                },
            )
        ]
    )
    credentials = grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    # As the broker does (broker/heap.py): 10,000 streams' objects out of every full collection.
    freezer = asyncio.create_task(freeze_survivors())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)  # noqa: T201 - the harness waits for this line
    await stop.wait()
    freezer.cancel()
    await server.stop(0)


if __name__ == "__main__":
    port, cert, key, ca, size = sys.argv[1:6]
    files = (Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes())
    asyncio.run(serve(int(port), *files, int(size)))
