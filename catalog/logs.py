"""Logging for the catalog service. Records are written by a thread of their own, so no log call
on the event loop (uvicorn's access log included) waits on stderr: a pipe nobody reads, or a
stalled log collector, must not stop requests. When the writer falls LOG_QUEUE_SIZE records
behind, new records are dropped and counted instead."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

LOG_QUEUE_SIZE = 10_000
WRITE_OUT_SECONDS = 5.0
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _DroppingQueueHandler.dropped += 1


@contextmanager
def background_logging(level: int = logging.INFO) -> Iterator[None]:
    """Route every record through the writer thread while the block runs. On leaving it, the
    records queued so far are written, for at most WRITE_OUT_SECONDS: a stderr nobody reads
    must not hold the process at exit either."""
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(logging.Formatter(FORMAT))
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(LOG_QUEUE_SIZE)
    thread = threading.Thread(target=_write, args=(records, writer), name="log-writer", daemon=True)
    thread.start()
    root = logging.getLogger()
    root.handlers[:] = [_DroppingQueueHandler(records)]
    root.setLevel(level)
    try:
        yield
    finally:
        if _DroppingQueueHandler.dropped:
            logging.getLogger(__name__).warning(
                "%d log records were dropped: stderr was not read fast enough",
                _DroppingQueueHandler.dropped,
            )
        with contextlib.suppress(queue.Full):
            records.put(None, timeout=WRITE_OUT_SECONDS)
        thread.join(timeout=WRITE_OUT_SECONDS)


def _write(records: queue.Queue[logging.LogRecord | None], writer: logging.Handler) -> None:
    while (record := records.get()) is not None:
        writer.handle(record)
