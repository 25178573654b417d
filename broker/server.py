"""Assembles the broker from its config and runs it: gRPC over mutual TLS on asyncio.

One event loop serves every RPC; blocking Vault calls run in a small thread pool,
so thousands of idle streams cost no threads. A background task (sources/token_keeper.py)
keeps the Vault token fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from secretbroker.v1 import broker_pb2_grpc

from broker.cache import SecretCache
from broker.config import BrokerConfig, ServerConfig
from broker.grpc_service import SecretBrokerService
from broker.identity import IdentityResolver
from broker.policy import AccessPolicy
from broker.reader import SecretReader
from broker.sources.token_keeper import keep_token_fresh
from broker.sources.vault import VaultSource

log = logging.getLogger(__name__)

VAULT_IO_THREADS = 8


class Broker:
    """A running broker. ``await start()``, then ``await stop()``."""

    def __init__(self, config: BrokerConfig, vault: VaultSource | None = None) -> None:
        self.config = config
        self.vault = vault or VaultSource(config.vault)
        self._executor = ThreadPoolExecutor(VAULT_IO_THREADS, thread_name_prefix="vault-io")
        self.cache = SecretCache(self.vault, config.cache, self._executor)
        reader = SecretReader(config.secrets, AccessPolicy(config.access), self.cache)
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        broker_pb2_grpc.add_SecretBrokerServicer_to_server(
            SecretBrokerService(reader, IdentityResolver()), self._server
        )
        self._keeper: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        self.port = self._server.add_secure_port(
            self.config.server.listen, server_credentials(self.config.server)
        )
        await self._server.start()
        self._keeper = asyncio.create_task(
            keep_token_fresh(self.vault.session, self._run_vault_io), name="vault-token-keeper"
        )
        host = self.config.server.listen.rpartition(":")[0]
        log.info("broker listening on %s:%d (mutual TLS)", host, self.port)
        return self.port

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 2.0) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        await self._server.stop(grace)
        # Let a Vault call in flight finish (bounded by vault.timeout) so none outlives the broker.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        log.info("broker stopped")

    async def _run_vault_io(self, call: Callable[[], None]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, call)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(config.key_file.read_bytes(), config.cert_file.read_bytes())],
        root_certificates=config.client_ca_file.read_bytes(),
        require_client_auth=True,
    )
