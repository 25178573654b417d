"""Keeps the cyclic garbage collector's full collections short while thousands of watch
streams are open.

Each open WatchSecrets stream holds about 70 objects that CPython's cyclic collector tracks
(gRPC's call state, the handler's task, its generators): 700,000 at 10,000 streams. A full
collection scans every one of them and stops the event loop for 0.4-0.55 s there
(measured), and the objects a rotation's fan-out leaves behind are what trigger one. That
pause was the tail of the fan-out, and it stalls every call in flight alike.

So once a second ``freeze_survivors`` collects the young generations and freezes what
survived them (``gc.freeze``): the collector never scans a frozen object again, and a full
collection scans only what was promoted since the last freeze. Freezing keeps nothing
alive: a frozen object is still freed by reference counting when its last reference goes,
and a stream's objects form no reference cycles (tests/test_watch.py shows the frozen
count back down once the streams close). The young collection just before each freeze
finds the cycles made since the last one, so short-lived garbage is not frozen with them.
"""

from __future__ import annotations

import asyncio
import gc

FREEZE_INTERVAL = 1.0
"""Seconds between freezes: how long a new stream's objects are scanned before they are not."""


async def freeze_survivors(interval: float = FREEZE_INTERVAL) -> None:
    """Until cancelled; then every frozen object is handed back to the collector, so an
    in-process broker leaves the process's collector as it found it."""
    try:
        while True:
            await asyncio.sleep(interval)
            gc.collect(1)
            gc.freeze()
    finally:
        gc.unfreeze()
