"""Scale: WatchSecrets streams opened on one broker in one burst (new connections, many streams
on each), what they cost in memory, and how long a rotation takes to reach every one of them.
One entry per stream count under ``scale`` in results.json, each with ``refused`` (must be 0)
and ``fanout_ms`` (from the rotation's answer until the last stream has the new version; its
median is ``fanout_p50_ms``).

Each count is rotated ``SCALE_ROTATIONS`` times: the same work takes from 0.5 to 0.9
CPU-seconds on this shared machine from one minute to the next, so the entry gives the
median rotation and, in ``rotations``, every one (``fanout_worst_ms``). The same streams are
then opened on the floor (bench/floor.py: a bare grpc.aio server over the same mutual TLS)
and sent the same number of messages: ``floor`` is what gRPC alone costs on this machine in
the same run, and ``fanout_vs_floor`` and ``rss_vs_floor`` are the broker's share."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.floor import WATCH as FLOOR_WATCH
from bench.rig import ROTATING, WATCH_SECRETS, Rig
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


@dataclass(frozen=True)
class Watched:
    """A server the held streams watch, and how the harness sends them their next message."""

    target: str
    method: str
    request: bytes
    routed: bool
    """Through the SDK's health-checked channel (brokers), or a plain one (the floor)."""
    change: Callable[[], int]
    """Sends every stream its next message; returns the new version (0 on the floor)."""
    open_streams: Callable[[], float | None]
    rss_bytes: Callable[[], int]


def broker_watched(rig: Rig) -> Watched:
    """The rotating secret's WatchSecrets streams, sent a message by its rotation."""

    def rotate() -> int:
        request = broker_pb2.RotateSecretRequest(name=ROTATING)
        return int(rig.admin().RotateSecret(request, timeout=30).version)

    return Watched(
        rig.broker_addr,
        WATCH_SECRETS,
        broker_pb2.WatchSecretsRequest(names=[ROTATING]).SerializeToString(),
        True,
        rotate,
        lambda: rig.broker.metric("secretbroker_watch_streams"),
        rig.broker_rss_bytes,
    )


def floor_watched(rig: Rig) -> Watched:
    def publish() -> int:
        rig.publish_on_floor()
        return 0

    return Watched(
        rig.floor_addr, FLOOR_WATCH, b"", False, publish, rig.floor_watches, rig.floor_rss_bytes
    )


@contextlib.contextmanager
def held_streams(
    rig: Rig, count: int, channels: int, rotations: int = 1, watched: Watched | None = None
) -> Iterator[HeldStreams]:
    """``rotations``: how many messages after the first the streams are followed through;
    ``watched``: the broker's WatchSecrets unless given."""
    watched = watched or broker_watched(rig)
    args = {
        **rig.client_args(watched.target),
        "streams": count,
        "channels": channels,
        "method": watched.method,
        "request": watched.request.hex(),
        "routed": watched.routed,
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


def change_and_follow(watched: Watched, held: HeldStreams) -> dict[str, Any]:
    """Send the streams their next message (a rotation, on the broker); when did it reach each
    of them, from the change's answer."""
    started = time.monotonic()
    version = watched.change()
    answered = time.monotonic()
    received = sorted(held.received())
    after = [(moment - answered) * 1000 for moment in received] or [float("nan")]
    return {
        "received": len(received),
        "rotate_rpc_ms": (answered - started) * 1000,
        "rotated_version": version,
        "fanout_ms": after[-1],
        "fanout_p50_ms": after[len(after) // 2],
    }


def measure_scale(rig: Rig, counts: tuple[int, ...], idle: int) -> dict[str, Any]:
    """For each count, ascending: one burst of opens on the broker, RSS while they are open,
    ``SCALE_ROTATIONS`` rotations; then the same on the floor. ``idle``: the broker's RSS before
    it held any stream (memory a burst took is not given back to the system, so the RSS before
    each burst would undercount the next one)."""
    results: dict[str, Any] = {}
    floor_idle = rig.floor_rss_bytes()
    # one entry per count: {"1000": {"refused": 0, "fanout_ms": ..., ...}, ...}
    for count in counts:
        entry = _burst(rig, broker_watched(rig), count, idle)
        floor = _burst(rig, floor_watched(rig), count, floor_idle)
        entry["floor"] = {key: floor[key] for key in _FLOOR_KEYS}
        entry["fanout_vs_floor"] = entry["fanout_ms"] / floor["fanout_ms"]
        entry["rss_vs_floor"] = entry["rss_per_stream_bytes"] / floor["rss_per_stream_bytes"]
        results[str(count)] = entry
    return results


_FLOOR_KEYS = ("refused", "received", "rss_per_stream_bytes", "fanout_ms", "fanout_p50_ms")


def _burst(rig: Rig, watched: Watched, count: int, idle: int) -> dict[str, Any]:
    channels = max(1, count // STREAMS_PER_CONNECTION)
    with held_streams(rig, count, channels, SCALE_ROTATIONS, watched) as held:
        rss = watched.rss_bytes()
        rotations = []
        for _ in range(SCALE_ROTATIONS):
            time.sleep(ROTATION_PAUSE)
            rotations.append(change_and_follow(watched, held))
    wait_until(lambda: watched.open_streams() == 0, 60, "the streams to close")
    median = sorted(rotations, key=lambda r: r["fanout_ms"])[len(rotations) // 2]
    return {
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
