"""The floor: a bare grpc.aio unary server over the same mutual TLS as the broker, returning a
fixed payload of the same size as the broker's answer, with no logic at all.

    python -m bench.floor PORT CERT KEY CLIENT_CA PAYLOAD_BYTES
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc

METHOD = "/bench.Floor/Get"


async def serve(port: int, cert: bytes, key: bytes, client_ca: bytes, size: int) -> None:
    payload = b"x" * size

    async def get(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return payload

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Floor", {"Get": grpc.unary_unary_rpc_method_handler(get)}
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)  # noqa: T201 - the harness waits for this line
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    port, cert, key, ca, size = sys.argv[1:6]
    files = (Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes())
    asyncio.run(serve(int(port), *files, int(size)))
