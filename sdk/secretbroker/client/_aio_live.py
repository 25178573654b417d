"""AsyncLiveSecrets: LiveSecrets for asyncio. One task per object, no thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from types import TracebackType

import grpc

from secretbroker.client._aio_client import AsyncSecretsClient
from secretbroker.client._backoff import Backoff
from secretbroker.client._errors import NotReady
from secretbroker.client._held import HeldSecrets, LiveView, SecretChange
from secretbroker.client._live import RESUME_BACKOFF
from secretbroker.v1 import broker_pb2

log = logging.getLogger(__name__)

_Call = grpc.aio.UnaryStreamCall[broker_pb2.WatchSecretsRequest, broker_pb2.WatchSecretsResponse]


class AsyncLiveSecrets(LiveView):
    """The current values of ``names``, kept up to date by a WatchSecrets stream on a task.

    ``get_secret`` is a dictionary lookup (no await). When the stream breaks, the last good
    values keep being served while the task resumes it with backoff (``asyncio.sleep``);
    resuming re-sends the current values. Rotated client certificates move the stream to the
    client's new channel at once. ``async for change in live.changes()`` follows changes.

        async with AsyncSecretsClient(config) as client, AsyncLiveSecrets(client, names) as live:
            await live.wait_ready()
            key = live.get_secret("media-catalog/api").data["jwt_secret"]
    """

    def __init__(
        self, client: AsyncSecretsClient, names: Sequence[str], backoff: Backoff = RESUME_BACKOFF
    ) -> None:
        self._client = client
        self._held = HeldSecrets(names)
        self._backoff = backoff
        self._complete: asyncio.Event = asyncio.Event()
        self._wake = asyncio.Event()
        """Ends a backoff wait early: on close, and when the client has a new channel."""
        self._call: _Call | None = None
        self._closed = False
        self._subscribers: set[asyncio.Queue[SecretChange | None]] = set()
        self._held.on_change(self._publish)
        self._stop_listening: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def start(self) -> None:
        """Open the stream (``async with`` does it)."""
        if self._task is None:
            self._stop_listening = self._client.on_reconnect(self._move)
            self._task = asyncio.create_task(self._follow(), name="secrets-watch")

    async def changes(self) -> AsyncGenerator[SecretChange, None]:
        """Every change from now on, in order, until the live view closes."""
        queue: asyncio.Queue[SecretChange | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while not self._closed:
                change = await queue.get()
                if change is None:
                    return
                yield change
        finally:
            self._subscribers.discard(queue)

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - see below
        """Wait until every name has a value; raise the last error, or NotReady. The timeout
        is a parameter, not the caller's asyncio.timeout, so that running out of it raises
        the reason (e.g. PERMISSION_DENIED) rather than a bare TimeoutError."""
        try:
            await asyncio.wait_for(self._complete.wait(), timeout)
        except TimeoutError:
            if self._held.last_error is not None:
                raise self._held.last_error from None
            raise NotReady("no values from the broker yet") from None

    async def aclose(self) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
        self._closed = True
        self._wake.set()
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def __aenter__(self) -> AsyncLiveSecrets:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _publish(self, change: SecretChange) -> None:
        for queue in self._subscribers:
            queue.put_nowait(change)

    def _move(self) -> None:
        """The client has a new channel (rotated certificates): reopen the stream on it now.
        An open call is cancelled (the watch loop tells its own cancellation from a failure);
        a backoff wait just ends early."""
        if self._call is not None and not self._call.done():
            self._call.cancel()
        else:
            self._wake.set()

    async def _follow(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                self._call = self._client.watch(self._held.names, self._held.versions())
                async for response in self._call:
                    self._store(response)
                    attempt = 0
            except asyncio.CancelledError:
                if self._closed:
                    return
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                continue  # this view cancelled the call to move it to a new channel: at once
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self._held.broke(code, exc.details() or "")
                log.warning("secrets watch broke (%s); resuming with backoff", code.name)
            except Exception:  # supervised: a surprise is logged and the watch resumes
                log.exception("secrets watch failed; resuming with backoff")
            else:
                log.warning("secrets watch ended by the broker; resuming")
            finally:
                self._call = None
            self.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._backoff.delay(attempt))
            self._wake.clear()
            attempt += 1
