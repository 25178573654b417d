"""Logging for the catalog service. Records are written by a thread of their own, so no log call
on the event loop (uvicorn's access log included) waits on stderr: a pipe nobody reads, or a
stalled log collector, must not stop requests. When the writer falls LOG_QUEUE_SIZE records
behind, new records are dropped and counted instead."""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOG_QUEUE_SIZE = 10_000
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
    """Route every record through the writer thread while the block runs; on leaving it, the
    records queued so far are written."""
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(logging.Formatter(FORMAT))
    records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_SIZE)
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_DroppingQueueHandler(records)]
    root.setLevel(level)
    try:
        yield
    finally:
        listener.stop()
        if _DroppingQueueHandler.dropped:
            writer.handle(
                logging.makeLogRecord(
                    {
                        "name": __name__,
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": f"{_DroppingQueueHandler.dropped} log records were dropped: "
                        "stderr was not read fast enough",
                    }
                )
            )
