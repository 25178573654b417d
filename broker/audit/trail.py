"""The audit trail: one JSON Lines record per access decision and per admin action. A new value
pushed to many watch streams of one identity in one event-loop turn (a rotation's fan-out) is
one record naming how many (``record_pushed``).

Never a value. Records are numbered (``seq``) and each carries ``prev``, the link to
the previous record's line (broker/audit/chain.py): its HMAC under the audit key when
one is configured, so nobody without the key can recompute the chain, else its SHA-256.
``python -m broker audit verify`` finds the first edited, inserted or deleted record.
Appending to an existing file continues its chain; ``reopen`` (on SIGHUP, after a log
rotator moved the file away) continues it in a new file. Files are created 0600.

Records are written by one writer thread, never on the event loop: a sink that stalls (a
stdout pipe nobody reads, a hung disk) cannot stop serving. Requests put their record in
a bounded queue (``audit.queue_size``); the thread writes what is queued in one write(2)
and links the chain as it writes, so the chain has no gap whatever is dropped.

- Fail-open (the default): a request never waits for its record. A record that finds the
  queue full is dropped and counted (``secretbroker_audit_dropped_total``). A crash loses
  the records still queued; a stall loses the records past the queue.
- Fail-closed: a request's answer waits until its record is written (record before
  answer), at most ``audit.write_timeout``; past it, or when the write fails, the request
  is refused UNAVAILABLE. Once a write has hung longer than that (or the last one failed),
  requests are refused at once, readiness names the stalled trail and the broker leaves
  the load balancing. A crash loses no record of an answered request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from broker.audit.chain import ChainKey, genesis, link
from broker.errors import AuditUnavailable
from broker.lru import BoundedLru

log = logging.getLogger(__name__)

FILE_MODE = 0o600
QUEUE_SIZE = 10_000
WRITE_TIMEOUT = 0.5
CLOSE_TIMEOUT = 5.0
"""Seconds ``close`` waits for the queued records to be written."""
_BATCH = 1000
MAX_FIELD_CHARS = 300
"""Longer strings (only a caller's invalid input can be) are cut, so no record can bloat."""


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


PendingWrite = concurrent.futures.Future[None]
"""Resolved by the writer thread once the record is written (fail-closed only)."""


class AuditTrail:
    """Appends hash-chained records to ``path``, or to standard output when it is None."""

    def __init__(
        self,
        path: Path | None,
        *,
        fail_closed: bool = False,
        on_failure: Callable[[], None] = lambda: None,
        on_drop: Callable[[], None] = lambda: None,
        on_refuse: Callable[[], None] = lambda: None,
        key: ChainKey | None = None,
        mode: int = FILE_MODE,
        queue_size: int = QUEUE_SIZE,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self._on_failure = on_failure
        self._on_drop = on_drop
        self._on_refuse = on_refuse
        """Told when fail-closed refuses a request (a stalled or failing sink), at once."""
        self._key = key
        self._mode = mode
        self._write_timeout = write_timeout
        self._allowed_names: BoundedLru[tuple[str, str | None, str], str] = BoundedLru(10_000)
        self._pushes: dict[tuple[str, str | None, str, int, str, bool], _Pushes] = {}
        """The pushes of this event-loop turn, one record each (``record_pushed``)."""
        self._seq, self.head = _tail(path, key) if path is not None else (0, genesis(key))
        self._file: IO[bytes] = self._open(path) if path is not None else sys.stdout.buffer
        self._queue: queue.Queue[tuple[str | None, PendingWrite | None] | None] = queue.Queue(
            queue_size
        )
        """Records (body, confirmation); a None body is a barrier (``flush``); None wakes."""
        self._reopen = threading.Event()
        self._stopping = threading.Event()
        self._busy_since: float | None = None
        """When the write in progress started (time.monotonic()); None between writes."""
        self._failing = False
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    def _open(self, path: Path) -> IO[bytes]:
        """Append, unbuffered (each batch is one write(2), so nothing waits in a buffer to be
        lost), creating the file with the trail's mode."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self._mode)
        return os.fdopen(fd, "ab", buffering=0)

    def reopen(self) -> None:
        """Open the path anew (a rotator moved the old file away): the chain goes on in the
        new file, from the record after the last one written. Done by the writer thread."""
        if self.path is None:
            return
        self._reopen.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes the writer; a full queue wakes it anyway

    def record(self, event: str, **fields: Any) -> PendingWrite | None:
        """Queue one record. Returns what ``confirm`` waits on when fail-closed; raises
        AuditUnavailable only when fail-closed and the queue is full."""
        for key, value in fields.items():
            if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
                fields[key] = value[:MAX_FIELD_CHARS]
        # Insertion order is the key order: fixed by the callers, so lines are reproducible.
        return self._append(_encode({"time": time.time(), "event": event, **fields})[1:-1])

    def record_allowed(
        self, rpc: str, identity: str | None, secret: str, version: int, source: str, stale: bool
    ) -> PendingWrite | None:
        """The record of an allowed read, the one written on every cached answer: the same
        JSON as ``record("access", ...)``, with its escaped names encoded once per
        (rpc, identity, secret), which only ever holds granted, declared pairs."""
        return self._append(
            self._allowed_body(rpc, identity, secret, version, source, stale, time.time())
        )

    def record_pushed(
        self, rpc: str, identity: str | None, secret: str, version: int, source: str, stale: bool
    ) -> PendingWrite | None:
        """A new value sent on one of ``identity``'s open watch streams. The pushes of one value
        to one identity in one turn of the event loop (a rotation's fan-out: every stream wakes
        in the same turn) are one record: ``record_allowed``'s, with ``"streams": N``, timed at
        the first push and queued at the next turn. Event loop only."""
        key = (rpc, identity, secret, version, source, stale)
        pushes = self._pushes.get(key)
        if pushes is None:
            if self.fail_closed:
                self._refuse_if_unwritable()
            if not self._pushes:
                asyncio.get_running_loop().call_soon(self._queue_pushes)
            pushes = self._pushes[key] = _Pushes(time.time(), self._confirmation())
        pushes.streams += 1
        return pushes.written

    def _queue_pushes(self) -> None:
        pending, self._pushes = self._pushes, {}
        for (rpc, identity, secret, version, source, stale), pushes in pending.items():
            body = self._allowed_body(rpc, identity, secret, version, source, stale, pushes.time)
            try:
                self._enqueue(f'{body},"streams":{pushes.streams}', pushes.written)
            except AuditUnavailable as exc:  # fail-closed: every stream waiting on it is refused
                if pushes.written is not None:
                    pushes.written.set_exception(exc)

    def _allowed_body(
        self,
        rpc: str,
        identity: str | None,
        secret: str,
        version: int,
        source: str,
        stale: bool,
        at: float,
    ) -> str:
        key = (rpc, identity, secret)
        names = self._allowed_names.get(key)
        if names is None:
            names = self._allowed_names.put(
                key,
                _encode({"rpc": rpc, "identity": identity, "secret": secret, "decision": "allow"})[
                    1:-1
                ],
            )
        return (
            f'"time":{at!r},"event":"access",{names},"version":{int(version)},'
            f'"source":{_encode(source)},"stale":{"true" if stale else "false"}'
        )

    async def confirm(self, written: PendingWrite | None) -> None:
        """Fail-closed: wait until the record is written, at most ``audit.write_timeout``;
        raises AuditUnavailable otherwise. Fail-open (None): returns at once."""
        if written is None:
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(written), self._write_timeout)
        except TimeoutError:
            raise self._refusal(
                f"the audit trail cannot be written (no write within {self._write_timeout:g}s)"
            ) from None

    def problem(self) -> str | None:
        """Why records cannot be written now (a stalled or failing sink), or None."""
        busy_since = self._busy_since
        busy = 0.0 if busy_since is None else time.monotonic() - busy_since
        if busy > self._write_timeout:
            return f"the audit trail is stalled: a write has taken {busy:.0f}s"
        if self._failing:
            return "the audit trail cannot be written (the last write failed)"
        return None

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Block until every record queued before it is written (for callers without an event
        loop: the migration commands, tests); False if that took longer than ``timeout``."""
        barrier: PendingWrite = concurrent.futures.Future()
        try:
            self._queue.put((None, barrier), timeout=timeout)
            barrier.result(timeout)
        except (queue.Full, concurrent.futures.TimeoutError):
            return False
        return True

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def _append(self, body: str) -> PendingWrite | None:
        if self.fail_closed:
            self._refuse_if_unwritable()  # refused at once: the caller's retry goes elsewhere
        written = self._confirmation()
        self._enqueue(body, written)
        return written

    def _confirmation(self) -> PendingWrite | None:
        return concurrent.futures.Future() if self.fail_closed else None

    def _refuse_if_unwritable(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise self._refusal(problem)

    def _enqueue(self, body: str, written: PendingWrite | None) -> None:
        try:
            self._queue.put_nowait((body, written))
        except queue.Full:
            if self.fail_closed:  # refused, not lost: the request gets no answer
                raise self._refusal("the audit trail cannot be written (queue full)") from None
            self._on_drop()

    def _refusal(self, problem: str) -> AuditUnavailable:
        self._on_refuse()
        return AuditUnavailable(problem)

    # the writer thread ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._reopen.is_set():
                self._reopen.clear()
                self._reopen_now()
            records = [entry for entry in batch if entry is not None and entry[0] is not None]
            if records:
                self._write(records)
            for entry in batch:
                if entry is not None and entry[0] is None and entry[1] is not None:
                    entry[1].set_result(None)  # a barrier: what came before it is written
            if self._stopping.is_set() and self._queue.empty():
                if self.path is not None:  # here, not in close(): a stalled write ends later
                    with contextlib.suppress(OSError):
                        self._file.close()
                return

    def _write(self, records: list[tuple[str | None, PendingWrite | None]]) -> None:
        seq, head, lines = self._seq, self.head, []
        for body, _ in records:
            seq += 1
            line = f'{{{body},"seq":{seq},"prev":"{head}"}}\n'.encode()
            head = link(line, self._key)
            lines.append(line)
        data = b"".join(lines)
        self._busy_since = time.monotonic()
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) or 0 :]
        except (OSError, ValueError) as exc:
            self._busy_since = None
            self._failing = True
            for _ in lines:
                self._on_failure()
            log.error("cannot write the audit trail: %s", type(exc).__name__)
            error = AuditUnavailable("the audit trail cannot be written")
            for _, written in records:
                if written is not None and not written.done():
                    written.set_exception(error)
            return
        self._busy_since = None
        self._failing = False
        self._seq, self.head = seq, head
        for _, written in records:
            if written is not None and not written.done():
                written.set_result(None)

    def _reopen_now(self) -> None:
        if self.path is None:
            return
        try:
            replacement = self._open(self.path)
        except OSError as exc:
            log.error("cannot reopen the audit trail: %s", exc.strerror)
            return
        with contextlib.suppress(OSError):
            self._file.close()
        self._file = replacement
        log.info("audit trail reopened at record %d", self._seq + 1)

    def close(self, within: float = CLOSE_TIMEOUT) -> None:
        """Write what is queued (for at most ``within`` seconds), then close the file."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=within)
        self._writer.join(within)
        if self._writer.is_alive():
            log.error("the audit trail is stalled: %d queued records were not written", self.queued)
            return
        log.info("audit trail head: record %d, sha256 %s", self._seq, self.head)


@dataclass
class _Pushes:
    time: float
    written: PendingWrite | None
    streams: int = 0


def _tail(path: Path, key: ChainKey | None) -> tuple[int, str]:
    """Sequence number and link of the last record, so appending continues the chain."""
    last = _last_line(path)
    if not last:
        return 0, genesis(key)
    try:
        seq = int(json.loads(last)["seq"])
    except (ValueError, KeyError, TypeError):
        log.error("the audit trail's last line is not a record; continuing its chain after it")
        seq = 0
    return seq, link(last, key)


def _last_line(path: Path) -> bytes:
    """The last non-empty line, read backwards from the end: start-up does not read the whole
    trail. Not a regular file (a pipe, a device): nothing to continue."""
    if not path.is_file():
        return b""
    with path.open("rb") as file:
        position = file.seek(0, 2)
        tail = b""
        while position > 0:
            step = min(1 << 16, position)
            position -= step
            file.seek(position)
            tail = file.read(step) + tail
            body = tail.rstrip(b"\n")
            if b"\n" in body:
                return body.rsplit(b"\n", 1)[1]
        return tail.rstrip(b"\n")
