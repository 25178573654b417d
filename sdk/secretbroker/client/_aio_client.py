"""AsyncSecretsClient: SecretsClient for asyncio, on grpc.aio. No thread: retries sleep with
asyncio.sleep, file reads go to a worker thread, and certificate reloading is a task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from secretbroker.client._base import CredentialFiles, ReconnectListeners, Secret, VersionMemory
from secretbroker.client._channel import channel_args
from secretbroker.client._client import RETIRE_AFTER
from secretbroker.client._config import BrokerClientConfig
from secretbroker.client._errors import ClientConfigError, NotReady, SecretUnavailable
from secretbroker.client._retry import RetrySchedule
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

NOT_OPEN = "AsyncSecretsClient is not open: use `async with` or `await client.open()`"


class AsyncSecretsClient:
    """Calls to the broker over one mTLS grpc.aio channel, rebuilt when the certificate files
    change; the same guarantees as SecretsClient (retries under one overall deadline, point
    reads never go back a version, rotated certificates followed).

    ``async with AsyncSecretsClient(config) as client:`` opens the channel (the files are read
    in a worker thread) and starts the reload task; leaving the block closes both.
    """

    def __init__(self, config: BrokerClientConfig) -> None:
        self._config = config
        self._reconnected = ReconnectListeners()
        self._versions = VersionMemory()
        self._channel: grpc.aio.Channel | None = None
        self._stub: broker_pb2_grpc.SecretBrokerAsyncStub | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0
        """How often the channel was rebuilt for changed files."""

    async def open(self) -> None:
        files = await asyncio.to_thread(CredentialFiles, self._config)
        self._channel, self._stub = await self._connect()
        if self._config.reload_interval > 0:
            self._start(self._follow_files(files), "broker-credentials")

    async def _connect(self) -> tuple[grpc.aio.Channel, broker_pb2_grpc.SecretBrokerAsyncStub]:
        target, credentials, options = await asyncio.to_thread(channel_args, self._config, True)
        channel = grpc.aio.secure_channel(target, credentials, options)
        return channel, broker_pb2_grpc.SecretBrokerStub(channel)

    def _start(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s died", task.get_name(), exc_info=task.exception())

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` (on the loop) after each rebuild of the channel. Returns the
        function that unregisters it."""
        return self._reconnected.add(listener)

    async def _follow_files(self, files: CredentialFiles) -> None:
        while True:
            await asyncio.sleep(self._config.reload_interval)
            try:
                stamp = await asyncio.to_thread(files.read)
                if not files.settled_change(stamp):
                    continue
                channel, stub = await self._connect()
            except ClientConfigError as exc:
                log.warning("kept the broker channel; its new files cannot be read: %s", exc)
                continue
            except Exception:  # supervised: a surprise is logged, and the next check runs
                log.exception("checking the certificate files failed")
                continue
            old, self._channel, self._stub = self._channel, channel, stub
            files.in_use = stamp
            self.reconnects += 1
            if old is not None:
                self._start(_retire(old), "broker-channel-retire")
            log.info("the certificate files changed: new calls use a new channel")
            self._reconnected.notify()

    def _stub_now(self) -> broker_pb2_grpc.SecretBrokerAsyncStub:
        if self._stub is None:
            raise RuntimeError(NOT_OPEN)
        return self._stub

    async def wait_until_connected(self, timeout: float) -> None:  # noqa: ASYNC109 - see below
        """Wait until the channel is connected (handshake done); raise NotReady otherwise. The
        timeout is a parameter, not the caller's asyncio.timeout, so the error can name the
        broker."""
        if self._channel is None:
            raise RuntimeError(NOT_OPEN)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise NotReady(f"no connection to the broker at {self._config.target}") from None

    async def get_secret(self, name: str, version: int | None = None) -> Secret:
        request = self._versions.request(name, version)
        schedule = RetrySchedule(self._config.retry)
        while True:
            try:
                response = await self._stub_now().GetSecret(
                    request, timeout=schedule.attempt_timeout(self._config.deadline)
                )
            except grpc.aio.AioRpcError as exc:
                pause = schedule.pause_after(exc.code())
                if pause is None:
                    raise SecretUnavailable(name, exc.code(), exc.details() or "") from None
                await asyncio.sleep(pause)
                continue
            return self._versions.answer(request, response.secret)

    def watch(
        self, names: Sequence[str], min_versions: Mapping[str, int] | None = None
    ) -> grpc.aio.UnaryStreamCall[broker_pb2.WatchSecretsRequest, broker_pb2.WatchSecretsResponse]:
        """A WatchSecrets stream with no deadline; cancel it to end it. ``min_versions``: the
        versions already held, so a resumed watch never starts from an older one."""
        request = broker_pb2.WatchSecretsRequest(names=names, min_versions=min_versions)
        return self._stub_now().WatchSecrets(request)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(None)

    async def __aenter__(self) -> AsyncSecretsClient:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _retire(channel: grpc.aio.Channel) -> None:
    """Close an old channel once the calls in flight on it had time to finish (or at once, when
    the client closes first)."""
    try:
        await asyncio.sleep(RETIRE_AFTER)
    finally:
        await channel.close(None)
