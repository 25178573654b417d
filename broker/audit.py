"""The audit trail: one JSON Lines record per access decision and per admin action.

Never a value. Each record carries ``prev``, the SHA-256 of the previous record's
line, so an edited, inserted or deleted record breaks the chain where it happened
(``python -m broker audit verify FILE``). Every record is flushed as it is
written: a crash loses at most the record in flight. Appending to an existing
file continues its chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAX_FIELD_CHARS = 300
"""Longer strings (only a caller's invalid input can be) are cut, so no record can bloat."""


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditTrail:
    """Appends hash-chained records to ``path``, or to standard output when it is None."""

    def __init__(self, path: Path | None, *, fail_closed: bool = False) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self.failures = 0
        self._lock = threading.Lock()
        self._prev = _last_hash(path) if path is not None else GENESIS
        self._file: IO[bytes] = path.open("ab") if path is not None else sys.stdout.buffer

    def record(self, event: str, **fields: Any) -> None:
        """Append one record. Raises only when audit is fail-closed."""
        with self._lock:
            clipped = {
                key: value[:MAX_FIELD_CHARS] if isinstance(value, str) else value
                for key, value in fields.items()
            }
            document = {"time": time.time(), "event": event, **clipped, "prev": self._prev}
            line = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
            try:
                self._file.write(line + b"\n")
                self._file.flush()
            except (OSError, ValueError):
                self.failures += 1
                log.error("cannot write the audit trail (%d failures so far)", self.failures)
                if self.fail_closed:
                    raise
                return
            self._prev = line_hash(line)

    def close(self) -> None:
        if self.path is not None:
            self._file.close()


def _last_hash(path: Path) -> str:
    if not path.exists() or path.stat().st_size == 0:
        return GENESIS
    with path.open("rb") as file:
        last = b""
        for line in file:
            if line.strip():
                last = line
    return line_hash(last)
