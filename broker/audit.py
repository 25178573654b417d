"""The audit trail: one JSON Lines record per access decision and per admin action.

Never a value. Records are numbered (``seq``) and each carries ``prev``, the SHA-256
of the previous record's line, so ``python -m broker audit verify FILE`` finds the
first edited, inserted or deleted record. Every record is flushed as it is
written: a crash loses at most the record in flight. Appending to an existing file
continues its chain. The chain proves the file was not edited in place; anchoring
its head elsewhere (``head``, logged at shutdown) also catches a rewritten tail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from broker.errors import AuditUnavailable
from broker.lru import BoundedLru

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAX_FIELD_CHARS = 300
"""Longer strings (only a caller's invalid input can be) are cut, so no record can bloat."""


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditTrail:
    """Appends hash-chained records to ``path``, or to standard output when it is None."""

    def __init__(
        self,
        path: Path | None,
        *,
        fail_closed: bool = False,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._allowed_names: BoundedLru[tuple[str, str | None, str], str] = BoundedLru(10_000)
        self._seq, self.head = _tail(path) if path is not None else (0, GENESIS)
        # Unbuffered: each record is one write(2), so nothing waits in a buffer to be lost.
        self._file: IO[bytes] = (
            path.open("ab", buffering=0) if path is not None else sys.stdout.buffer
        )

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
            self.head = line_hash(line)

    def close(self) -> None:
        log.info("audit trail head: record %d, sha256 %s", self._seq, self.head)
        if self.path is not None:
            with contextlib.suppress(OSError):
                self._file.close()


def _tail(path: Path) -> tuple[int, str]:
    """Sequence number and hash of the last record, so appending continues the chain."""
    last = _last_line(path)
    if not last:
        return 0, GENESIS
    try:
        seq = int(json.loads(last)["seq"])
    except (ValueError, KeyError, TypeError):
        log.error("the audit trail's last line is not a record; continuing its chain after it")
        seq = 0
    return seq, line_hash(last)


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


@dataclass(frozen=True)
class ChainBreak:
    line: int
    problem: str


def _fields(line: bytes) -> tuple[int, str] | None:
    try:
        record = json.loads(line)
        return int(record["seq"]), str(record["prev"])
    except (ValueError, KeyError, TypeError):
        return None


def verify(lines: list[bytes]) -> tuple[int, ChainBreak | None]:
    """Walk the chain; return how many records check out and the first break, if any.
    Line numbers count non-empty lines from 1."""
    prev, expected_seq = GENESIS, 1
    for index, line in enumerate(lines):
        number = index + 1
        fields = _fields(line)
        if fields is None:
            return index, ChainBreak(number, "is not an audit record (edited, or cut by a crash)")
        seq, recorded_prev = fields
        if seq > expected_seq:
            missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
            return index, ChainBreak(number, f"follows a gap: record {missing} was deleted")
        if seq < expected_seq:
            return index, ChainBreak(number, f"repeats record number {seq}: it was inserted")
        if recorded_prev != prev and index == 0:
            return 0, ChainBreak(number, "does not start a chain: the file's start was cut")
        if recorded_prev != prev:
            # Either the record before was edited (its hash changed), or this one was (its
            # prev changed): the next record's prev tells which, as it holds this one's hash.
            following = _fields(lines[index + 1]) if index + 1 < len(lines) else None
            if following == (seq, prev):  # the next line is the real record this one displaced
                return index, ChainBreak(
                    number, "was inserted: the next record follows its predecessor"
                )
            if following is None:
                return index - 1, ChainBreak(
                    number - 1,
                    "was edited, or the last record after it was: nothing follows to tell which",
                )
            if following[1] == line_hash(line):
                return index - 1, ChainBreak(
                    number - 1, "was edited: its hash is not the one the next record holds"
                )
            return index, ChainBreak(
                number, "was edited: its prev is not the previous record's hash"
            )
        prev, expected_seq = line_hash(line), seq + 1
    return len(lines), None


def verify_file(path: Path) -> tuple[int, ChainBreak | None]:
    with path.open("rb") as file:
        return verify([line for line in file if line.strip()])
