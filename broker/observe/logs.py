"""Logging set-up for the broker's processes. Log calls never carry secret values or tokens.

``text``: one human-readable line per record. ``json``: one JSON object per line (time, level,
logger, message, and the traceback when there is one), for log pipelines.

gRPC's C core writes its own lines straight to file descriptor 2 (absl logging), for example
one per failed client handshake. ``route_native_stderr`` puts a pipe there: a thread reads
each line and logs it through Python's logging (logger ``grpc.core``), so every line on
stderr has the configured format; failed handshakes, which any client can cause at will,
become at most one record per HANDSHAKE_LOG_INTERVAL, with a count.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

QUIET_LIBRARIES = ("urllib3", "hvac", "grpc")
HANDSHAKE_LOG_INTERVAL = 60.0
"""Seconds between two log records about failed client handshakes."""
NATIVE_LOGGER = "grpc.core"
# absl's prefix: severity, date and time, thread id, file:line, then "] " and the message.
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]*)\] ?(.*)$")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


LOG_QUEUE_SIZE = 10_000
"""Records waiting for the log writer thread; past it, records are dropped and counted."""


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never blocks, and drops (counting) when the queue is
    full: a stderr pipe nobody reads must not stop the event loop that logs."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _DroppingQueueHandler.dropped += 1


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log records are written by a thread of their own (a QueueListener): no log call waits
    on the stream, however slow or stuck it is."""
    global _listener
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    if _listener is not None:
        _listener.stop()
    else:
        atexit.register(flush_logs)
    records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_SIZE)
    _listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_DroppingQueueHandler(records)]
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.getLogger(NATIVE_LOGGER).setLevel(root.level)


def flush_logs(within: float = 5.0) -> None:
    """Wait until the records logged so far are written (at most ``within`` seconds): before a
    process's last words, so they come last."""
    if _listener is None:
        return
    pending = _listener.queue
    deadline = time.monotonic() + within
    while getattr(pending, "unfinished_tasks", 0) and time.monotonic() < deadline:
        time.sleep(0.01)


def dropped_log_records() -> int:
    return _DroppingQueueHandler.dropped


class NativeStderr:
    """Lines native code writes to fd 2, turned into log records (see the module docstring)."""

    def __init__(self, read_fd: int, real_stderr: TextIO) -> None:
        self._real_stderr = real_stderr
        self._lines = os.fdopen(read_fd, "rb")
        self._log = logging.getLogger(NATIVE_LOGGER)
        self._handshakes = Throttle(HANDSHAKE_LOG_INTERVAL)
        self.on_handshake_failure: Callable[[], None] = lambda: None
        """Called for every failed handshake, throttled or not (the broker counts them)."""
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Put the real stderr back on fd 2 and log what is left in the pipe: called before
        the process's last words, so they come after every line native code wrote."""
        os.dup2(self._real_stderr.fileno(), 2)  # closes the pipe's only write end: EOF
        self._thread.join(timeout=5)
        flush_logs()

    def _pump(self) -> None:
        for raw in self._lines:
            self.line(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def line(self, text: str) -> None:
        if not text.strip():
            return
        match = _ABSL_LINE.match(text)
        level, where, message = (
            (_ABSL_LEVELS[match.group(1)], match.group(2), match.group(3))
            if match
            else (logging.WARNING, "", text)
        )
        if "Handshake failed" in message:
            self.on_handshake_failure()
            held_back = self._handshakes.allow("handshake")
            if held_back is None:
                return
            self._log.warning(
                "a client's TLS handshake failed (%d more since the last such line): %s",
                held_back,
                message[:300],
            )
            return
        self._log.log(level, "%s%s", f"{where}: " if where else "", message[:2000])


def route_native_stderr(level: str, fmt: str) -> NativeStderr:
    """Configure logging to a copy of stderr, and put a pipe on fd 2 whose lines are logged.
    Python's own ``sys.stderr`` moves to the copy too: only native code writes to the pipe."""
    sys.stderr.flush()
    real_stderr = os.fdopen(os.dup(2), "w", buffering=1)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = real_stderr
    configure_logging(level, fmt, real_stderr)
    return NativeStderr(read_fd, real_stderr)


class Throttle:
    """At most one log record per key per ``interval``: for events a caller can repeat at will
    (refused handshakes, limits hit), so no caller can flood the log."""

    def __init__(
        self,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None while ``key`` is throttled; else how many of its events were held back since
        the last one allowed."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if len(self._last) >= self._max_keys:
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        return self._suppressed.pop(key, 0)
