"""The audit trail: one JSON Lines record per access decision and per admin action.

Never a value. Records are numbered (``seq``) and each carries ``prev``, the link to
the previous record's line (broker/audit_chain.py): its HMAC under the audit key when
one is configured, so nobody without the key can recompute the chain, else its SHA-256.
``python -m broker audit verify`` finds the first edited, inserted or deleted record.
Every record is flushed as it is written: a crash loses at most the record in flight.
Appending to an existing file continues its chain; ``reopen`` (on SIGHUP, after a log
rotator moved the file away) continues it in a new file. Files are created 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from broker.audit_chain import ChainKey, genesis, link
from broker.errors import AuditUnavailable
from broker.lru import BoundedLru

log = logging.getLogger(__name__)

FILE_MODE = 0o600
MAX_FIELD_CHARS = 300
"""Longer strings (only a caller's invalid input can be) are cut, so no record can bloat."""


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class AuditTrail:
    """Appends hash-chained records to ``path``, or to standard output when it is None."""

    def __init__(
        self,
        path: Path | None,
        *,
        fail_closed: bool = False,
        on_failure: Callable[[], None] = lambda: None,
        key: ChainKey | None = None,
        mode: int = FILE_MODE,
    ) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self._on_failure = on_failure
        self._key = key
        self._mode = mode
        self._lock = threading.Lock()
        self._allowed_names: BoundedLru[tuple[str, str | None, str], str] = BoundedLru(10_000)
        self._seq, self.head = _tail(path, key) if path is not None else (0, genesis(key))
        self._file: IO[bytes] = self._open(path) if path is not None else sys.stdout.buffer

    def _open(self, path: Path) -> IO[bytes]:
        """Append, unbuffered (each record is one write(2), so nothing waits in a buffer to be
        lost), creating the file with the trail's mode."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self._mode)
        return os.fdopen(fd, "ab", buffering=0)

    def reopen(self) -> None:
        """Open the path anew (a rotator moved the old file away): the chain goes on in the
        new file, from the record after the last one written."""
        if self.path is None:
            return
        with self._lock:
            try:
                replacement = self._open(self.path)
            except OSError as exc:
                log.error("cannot reopen the audit trail: %s", exc.strerror)
                return
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = replacement
        log.info("audit trail reopened at record %d", self._seq + 1)

    def record(self, event: str, **fields: Any) -> None:
        """Append one record. Raises AuditUnavailable only when audit is fail-closed."""
        for key, value in fields.items():
            if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
                fields[key] = value[:MAX_FIELD_CHARS]
        # Insertion order is the key order: fixed by the callers, so lines are reproducible.
        body = _encode({"time": time.time(), "event": event, **fields})[1:-1]
        self._append(body)

    def allowed(
        self, rpc: str, identity: str | None, secret: str, version: int, source: str, stale: bool
    ) -> None:
        """The record of an allowed read, the one written on every cached answer: the same
        JSON as ``record("access", ...)``, with its escaped names encoded once per
        (rpc, identity, secret), which only ever holds granted, declared pairs."""
        key = (rpc, identity, secret)
        names = self._allowed_names.get(key)
        if names is None:
            names = self._allowed_names.put(
                key,
                _encode({"rpc": rpc, "identity": identity, "secret": secret, "decision": "allow"})[
                    1:-1
                ],
            )
        self._append(
            f'"time":{time.time()!r},"event":"access",{names},"version":{int(version)},'
            f'"source":{_encode(source)},"stale":{"true" if stale else "false"}'
        )

    def _append(self, body: str) -> None:
        with self._lock:
            line = f'{{{body},"seq":{self._seq + 1},"prev":"{self.head}"}}'.encode()
            try:
                self._file.write(line + b"\n")
                self._file.flush()
            except (OSError, ValueError) as exc:
                self._on_failure()
                log.error("cannot write the audit trail: %s", type(exc).__name__)
                if self.fail_closed:
                    raise AuditUnavailable("the audit trail cannot be written") from None
                return
            self._seq += 1
            self.head = link(line, self._key)

    def close(self) -> None:
        log.info("audit trail head: record %d, sha256 %s", self._seq, self.head)
        if self.path is not None:
            with contextlib.suppress(OSError):
                self._file.close()


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
