"""``python -m bench``: the broker against the gRPC floor and against Vault itself, in one run.

Starts everything itself (bench/rig.py); clients run in separate processes (bench/workers.py).
Prints a table, writes ``bench/out/results.json`` and draws ``bench/out/latency.png``. Then the
failover section (bench/failover.py): a 3-node OpenBao raft cluster whose leader is killed under
catalog load, and the Vault load per number of catalog clients.
``--quick`` runs in seconds with small counts: a smoke test of the harness, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.catalog import CONFIG_READS, REQUESTS, running_catalog
from bench.database import measure_database
from bench.failover import FULL_FAILOVER, QUICK_FAILOVER, measure_failover
from bench.floor import METHOD as FLOOR_METHOD
from bench.report import draw_latency_chart, render_table
from bench.rig import COLD, EXPIRING, FLIP, HOT, Rig, running_rig
from bench.scale import (
    FULL_SCALE,
    QUICK_SCALE,
    broker_watched,
    change_and_follow,
    held_streams,
    measure_scale,
)
from bench.stats import percentiles
from secretbroker.client import GET_SECRET
from secretbroker.v1 import broker_pb2

OUT = Path(__file__).parent / "out"


@dataclass(frozen=True)
class Sizes:
    bulk_secrets: int
    calls: int
    """Calls per latency measurement (per round for the floor, the broker and hvac)."""
    config_calls: int
    throughput_seconds: float
    """Per round and server."""
    throughput_clients: int
    streams: int
    rounds: int
    """Alternating rounds of floor, broker (and hvac): ratios are medians over rounds."""
    expiring_ttl: float
    expiring_seconds: float
    """Reads of a secret of TTL ``expiring_ttl`` against pure hits, call for call."""
    scale: tuple[int, ...]
    """Stream counts of the scale section: each opened in one burst."""
    catalog_calls: int
    """Requests per kind to the catalog service."""
    database_rotations: int = 20
    """Database users issued in a row under catalog load."""
    database_issues: int = 30
    """Issues timed, through the broker and with hvac directly."""


FULL = Sizes(
    1000,
    1000,
    200_000,
    1.0,
    3,
    1000,
    rounds=10,
    expiring_ttl=0.5,
    expiring_seconds=10,
    scale=FULL_SCALE,
    catalog_calls=2000,
)
QUICK = Sizes(
    20,
    50,
    2000,
    0.2,
    2,
    50,
    rounds=2,
    expiring_ttl=0.1,
    expiring_seconds=0.5,
    scale=QUICK_SCALE,
    catalog_calls=50,
    database_rotations=3,
    database_issues=5,
)


def worker(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "bench.workers", kind, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the {kind} worker failed:\n{result.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def grpc_args(rig: Rig, target: str, method: str, name: str, count: int) -> dict[str, Any]:
    request = broker_pb2.GetSecretRequest(name=name).SerializeToString().hex()
    return {**rig.client_args(target), "method": method, "request": request, "count": count}


def throughput(rig: Rig, target: str, method: str, sizes: Sizes) -> float:
    args = {**grpc_args(rig, target, method, HOT, 0), "seconds": sizes.throughput_seconds}
    with ThreadPoolExecutor(sizes.throughput_clients) as pool:
        results = list(
            pool.map(lambda _: worker("throughput", args), range(sizes.throughput_clients))
        )
    return float(sum(r["calls"] for r in results)) / sizes.throughput_seconds


def measure(rig: Rig, sizes: Sizes) -> dict[str, Any]:
    results: dict[str, Any] = {"payload_bytes": rig.payload_bytes}
    stub = rig.stub()
    results["rss_idle_bytes"] = rig.broker_rss_bytes()
    for name in rig.bulk:
        stub.GetSecret(broker_pb2.GetSecretRequest(name=name), timeout=30)
    results["rss_cached_bytes"] = rig.broker_rss_bytes()
    results["cached_secrets"] = len(rig.bulk)

    samples: dict[str, list[float]] = {"floor": [], "broker cached": [], "hvac direct": []}
    results["rounds"] = ab_rounds(rig, sizes, samples)
    vault_args = {"path": HOT, "count": sizes.calls}
    samples["bao proxy"] = worker("vault", {**vault_args, "address": rig.proxy_addr})["us"]
    samples["broker cold"] = worker(
        "latency", grpc_args(rig, rig.broker_addr, GET_SECRET, COLD, max(100, sizes.calls // 3))
    )["us"]
    samples["catalog Config read"] = worker(
        "config", {**rig.client_args(rig.broker_addr), "count": sizes.config_calls}
    )["us"]
    results["catalog"] = catalog_requests(
        rig, sizes, percentiles(samples["catalog Config read"])["p50"]
    )
    results["ttl_expiries"] = ttl_expiries(rig, sizes, samples)
    results["latency_us"] = {name: percentiles(values) for name, values in samples.items()}
    results["throughput_clients"] = sizes.throughput_clients
    per_round = results["rounds"]["per_round"]
    results["throughput_rps"] = {
        name: statistics.median(r[f"{name} rps"] for r in per_round)
        for name in ("floor", "broker cached")
    }
    results.update(watch_fan_out(rig, sizes, samples))
    results["rollback_flip_ms"] = rollback_flip(rig)
    results["scale"] = measure_scale(rig, sizes.scale, idle=results["rss_cached_bytes"])
    results["database"] = measure_database(rig, sizes.database_rotations, sizes.database_issues)
    return {"results": results, "samples": samples}


RATIOS = {
    "cached p50 / floor p50": ("broker cached p50", "floor p50"),
    "cached throughput / floor": ("broker cached rps", "floor rps"),
    "hvac direct p50 / cached p50": ("hvac direct p50", "broker cached p50"),
}


def ab_rounds(rig: Rig, sizes: Sizes, samples: dict[str, list[float]]) -> dict[str, Any]:
    """Floor, broker and hvac in alternating rounds (ABAB...), so slow drift of a shared machine
    falls on all of them alike; each ratio is the median over rounds, with its IQR."""
    approle = [str(rig.approle.role_id_file), str(rig.approle.secret_id_file)]
    hvac_args = {"path": HOT, "count": sizes.calls, "address": rig.bao.address, "approle": approle}
    per_round = []
    for _ in range(sizes.rounds):
        measured: dict[str, float] = {}
        for name, kind, args in (
            ("floor", "latency", grpc_args(rig, rig.floor_addr, FLOOR_METHOD, HOT, sizes.calls)),
            (
                "broker cached",
                "latency",
                grpc_args(rig, rig.broker_addr, GET_SECRET, HOT, sizes.calls),
            ),
            ("hvac direct", "vault", hvac_args),
        ):
            values = worker(kind, args)["us"]
            samples[name] += values
            measured[f"{name} p50"] = percentiles(values)["p50"]
        measured["floor rps"] = throughput(rig, rig.floor_addr, FLOOR_METHOD, sizes)
        measured["broker cached rps"] = throughput(rig, rig.broker_addr, GET_SECRET, sizes)
        per_round.append(measured)
    ratios = {}
    for ratio, (numerator, denominator) in RATIOS.items():
        values = [r[numerator] / r[denominator] for r in per_round]
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        ratios[ratio] = {
            "median": statistics.median(values),
            "iqr": [quartiles[0], quartiles[2]],
            "per_round": values,
        }
    return {"count": sizes.rounds, "ratios": ratios, "per_round": per_round}


def catalog_requests(rig: Rig, sizes: Sizes, config_read_us: float) -> dict[str, Any]:
    """p50 and p99 per kind of catalog request through the whole stack, and the largest share
    the in-memory secret reads (Config) take of a median request."""
    with running_catalog(rig) as service:
        measured = {
            name: percentiles(worker("http", service.worker_args(name, sizes.catalog_calls))["us"])
            for name in REQUESTS
        }
    share = max(CONFIG_READS[name] * config_read_us / measured[name]["p50"] for name in REQUESTS)
    return {"requests_us": measured, "config_read_us": config_read_us, "config_share_max": share}


def ttl_expiries(rig: Rig, sizes: Sizes, samples: dict[str, list[float]]) -> dict[str, Any]:
    """p99.9 of reads of a secret whose TTL expires about 20 times in the window, against pure
    hits, call for call in one client: what refresh-ahead is for."""
    args = {
        **grpc_args(rig, rig.broker_addr, GET_SECRET, EXPIRING, 0),
        "other_request": broker_pb2.GetSecretRequest(name=HOT).SerializeToString().hex(),
        "seconds": sizes.expiring_seconds,
    }
    measured = worker("alternating", args)
    samples["broker, TTL expiring"] = measured["us"]
    expiring, hits = percentile(measured["us"], 0.999), percentile(measured["other_us"], 0.999)
    return {
        "ttl_seconds": sizes.expiring_ttl,
        "expiries": sizes.expiring_seconds / sizes.expiring_ttl,
        "p999_expiring_us": expiring,
        "p999_hits_us": hits,
        "ratio": expiring / hits,
        "calls": len(measured["us"]),
    }


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def watch_fan_out(rig: Rig, sizes: Sizes, samples: dict[str, list[float]]) -> dict[str, Any]:
    with held_streams(rig, sizes.streams, channels=4) as held:
        if held.refused:
            raise RuntimeError(f"the broker refused streams: {held.refused}")
        rss_streams = rig.broker_rss_bytes()
        samples["broker cached, streams open"] = worker(
            "latency", grpc_args(rig, rig.broker_addr, GET_SECRET, HOT, sizes.calls)
        )["us"]
        followed = change_and_follow(broker_watched(rig), held)
    return {
        "watch_streams": sizes.streams,
        "watch_received": followed["received"],
        # from the rotate call, not its answer: the figure the README has always given
        "watch_fan_out_ms": followed["rotate_rpc_ms"] + followed["fanout_ms"],
        "watch_rotate_rpc_ms": followed["rotate_rpc_ms"],
        "rotated_version": followed["rotated_version"],
        "rss_streams_bytes": rss_streams,
        "latency_with_streams_us": percentiles(samples["broker cached, streams open"]),
    }


def rollback_flip(rig: Rig) -> float:
    """Admin flip of the "flip" category to env, until a GetSecret answers from env."""
    admin, stub = rig.admin(), rig.stub()
    request = broker_pb2.GetSecretRequest(name=FLIP)
    if stub.GetSecret(request, timeout=30).secret.source != broker_pb2.SOURCE_VAULT:
        raise RuntimeError(f"{FLIP} should start served from Vault")
    categories = ["bulk", "api", "cold", "database", "jwt", "external"]
    started = time.perf_counter()
    admin.SetRollbackOverride(
        broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=categories), timeout=30
    )
    while stub.GetSecret(request, timeout=30).secret.source != broker_pb2.SOURCE_ENV:
        pass
    elapsed = (time.perf_counter() - started) * 1000
    admin.ClearRollbackOverride(broker_pb2.ClearRollbackOverrideRequest(), timeout=30)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts: checks the harness")
    parser.add_argument("--out", type=Path, default=OUT, help="where results go (bench/out)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="secretbroker-bench-") as workdir,
        running_rig(Path(workdir), sizes.bulk_secrets, sizes.expiring_ttl) as rig,
    ):
        measured = measure(rig, sizes)
    results = measured["results"]
    with tempfile.TemporaryDirectory(prefix="secretbroker-failover-") as workdir:
        failover_sizes = QUICK_FAILOVER if args.quick else FULL_FAILOVER
        results["failover"] = measure_failover(Path(workdir), failover_sizes)
    results["mode"] = "quick" if args.quick else "full"
    results["seconds"] = round(time.monotonic() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    draw_latency_chart(measured["samples"], args.out / "latency.png")
    print(render_table(results))  # noqa: T201 - the harness reports
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'latency.png'}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
