"""Scale: WatchSecrets streams opened on one broker in one burst (new connections, many streams
on each), what they cost in memory, and how long a rotation takes to reach every one of them.
One entry per stream count under ``scale`` in results.json, each with ``refused`` (must be 0)
and ``fanout_ms`` (from the rotation's answer until the last stream has the new version; its
median is ``fanout_p50_ms``). Each count is rotated ``SCALE_ROTATIONS`` times: the same work
takes from 0.5 to 0.9 CPU-seconds on this shared machine from one minute to the next, so the
entry gives the median rotation and, in ``rotations``, every one (``fanout_worst_ms``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.rig import ROTATING, Rig
from devstack.harness import stop_process, wait_until
from secretbroker.v1 import broker_pb2

FULL_SCALE = (1000, 5000, 10_000)
QUICK_SCALE = (200,)
SCALE_ROTATIONS = 3
ROTATION_PAUSE = 2.0
"""Seconds before each rotation: the broker ends the sends of the last one and freezes what
survived it (broker/heap.py), as between two rotations in production (days apart)."""
STREAMS_PER_CONNECTION = 50
"""Many streams share each connection, as pods with several watchers do; the connections are
new, so the burst also carries their TLS handshakes."""


@dataclass
class HeldStreams:
    """Streams a worker process opened at once, and holds until the next message on each."""

    opened: int
    refused: dict[str, int]
    open_seconds: float
    process: subprocess.Popen[str]

    def received(self) -> list[float]:
        """When each held stream received its next message (CLOCK_MONOTONIC); the holder gives
        up waiting for the last ones after its own timeout."""
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            raise RuntimeError(f"the stream holder exited ({self.process.wait()}) mid-rotation")
        received: list[float] = json.loads(line)["received"]
        return received


@contextlib.contextmanager
def held_streams(rig: Rig, count: int, channels: int, rotations: int = 1) -> Iterator[HeldStreams]:
    """``rotations``: how many rotations the streams are followed through."""
    args = {
        **rig.client_args(rig.broker_addr),
        "streams": count,
        "channels": channels,
        "name": ROTATING,
        "rotations": rotations,
    }
    holder = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "bench.workers", "streams", json.dumps(args)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = holder.stdout.readline() if holder.stdout else ""
        if not line:
            raise RuntimeError(f"the stream holder exited ({holder.wait()}) before its streams")
        ready = json.loads(line)
        yield HeldStreams(ready["opened"], ready["refused"], ready["open_seconds"], holder)
    finally:
        stop_process(holder, timeout=15)


def rotate_and_follow(rig: Rig, held: HeldStreams) -> dict[str, Any]:
    """Rotate the secret the streams watch; when did its new version reach each of them."""
    started = time.monotonic()
    rotated = rig.admin().RotateSecret(broker_pb2.RotateSecretRequest(name=ROTATING), timeout=30)
    answered = time.monotonic()
    received = sorted(held.received())
    after = [(moment - answered) * 1000 for moment in received] or [float("nan")]
    return {
        "received": len(received),
        "rotate_rpc_ms": (answered - started) * 1000,
        "rotated_version": rotated.version,
        "fanout_ms": after[-1],
        "fanout_p50_ms": after[len(after) // 2],
    }


def measure_scale(rig: Rig, counts: tuple[int, ...], idle: int) -> dict[str, Any]:
    """For each count, ascending: one burst of opens, RSS while they are open, one rotation.
    ``idle``: the broker's RSS before it held any stream (memory a burst took is not given back
    to the system, so the RSS before each burst would undercount the next one)."""
    results: dict[str, Any] = {}
    # one entry per count: {"1000": {"refused": 0, "fanout_ms": ..., ...}, ...}
    for count in counts:
        channels = max(1, count // STREAMS_PER_CONNECTION)
        with held_streams(rig, count, channels, SCALE_ROTATIONS) as held:
            rss = rig.broker_rss_bytes()
            rotations = []
            for _ in range(SCALE_ROTATIONS):
                time.sleep(ROTATION_PAUSE)
                rotations.append(rotate_and_follow(rig, held))
            median = sorted(rotations, key=lambda r: r["fanout_ms"])[len(rotations) // 2]
            entry = {
                "streams": count,
                "connections": channels,
                "opened": held.opened,
                "refused": sum(held.refused.values()),
                "refused_by_code": held.refused,
                "open_seconds": held.open_seconds,
                "rss_before_bytes": idle,
                "rss_bytes": rss,
                "rss_per_stream_bytes": (rss - idle) / max(1, held.opened),
                **median,
                "received": min(r["received"] for r in rotations),
                "fanout_worst_ms": max(r["fanout_ms"] for r in rotations),
                "rotations": rotations,
            }
        results[str(count)] = entry
        wait_until(
            lambda: rig.broker.metric("secretbroker_watch_streams") == 0,
            60,
            "the broker to close the streams",
        )
    return results
