"""The benchmark harness works: ``python -m bench --quick`` starts its whole rig, measures every
path and writes its table, JSON and chart. A smoke test: it checks the harness, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import SCALE_ROTATIONS

pytestmark = pytest.mark.slow


def test_quick_bench_run_measures_every_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())

    assert set(results["latency_us"]) == {
        "floor",
        "broker cached",
        "hvac direct",
        "bao proxy",
        "broker cold",
        "catalog Config read",
        "broker, TTL expiring",
    }
    assert all(p["n"] > 0 and p["p50"] > 0 for p in results["latency_us"].values())
    assert results["watch_received"] == results["watch_streams"], "every stream got the rotation"
    assert results["rss_streams_bytes"] > 0
    assert results["rollback_flip_ms"] > 0
    catalog = results["catalog"]  # through the whole stack, each kind answered with success
    assert set(catalog["requests_us"]) == {"GET /healthz", "GET /media", "POST /media"}
    assert all(p["n"] == 50 and p["p99"] >= p["p50"] > 0 for p in catalog["requests_us"].values())
    assert 0 < catalog["config_share_max"] < 1
    assert "secret reads' share of a median catalog request" in result.stdout
    for count, entry in results["scale"].items():  # streams opened in one burst
        assert (entry["refused"], entry["received"]) == (0, int(count)), entry
        assert entry["fanout_ms"] >= entry["fanout_p50_ms"]
        # every rotation reached every stream, and the entry is the median one
        fanouts = sorted(r["fanout_ms"] for r in entry["rotations"])
        assert [r["received"] for r in entry["rotations"]] == [int(count)] * SCALE_ROTATIONS
        assert (entry["fanout_ms"], entry["fanout_worst_ms"]) == (
            fanouts[len(fanouts) // 2],
            fanouts[-1],
        )
        assert len({r["rotated_version"] for r in entry["rotations"]}) == SCALE_ROTATIONS
        floor = entry["floor"]  # the same streams on a bare gRPC server, as the broker's floor
        assert (floor["refused"], floor["received"]) == (0, int(count)), floor
        assert entry["fanout_vs_floor"] == entry["fanout_ms"] / floor["fanout_ms"]
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    assert "cached p50 / floor p50" in result.stdout
    rounds = results["rounds"]
    assert rounds["count"] == len(rounds["per_round"]) >= 2, "floor and broker alternate in rounds"
    for ratio in rounds["ratios"].values():
        low, high = ratio["iqr"]
        assert low <= ratio["median"] <= high
    assert results["ttl_expiries"]["expiries"] >= 5
    assert results["ttl_expiries"]["p999_hits_us"] > 0
    failover = results["failover"]
    assert failover["failed_reads"] == 0, "a read failed during the leader kill"
    assert failover["reads"] > 0
    assert failover["election"]["n"] > 0
    assert failover["rotation_works_again_after_s"] > 0
    assert [row["clients"] for row in failover["vault_load"]["rows"]] == [1, 10]
    hung = failover["all_nodes_hung"]
    for kind in ("sdk", "plain"):
        assert hung[kind]["failed_reads"] == 0, f"{kind}: a read failed while Vault hung"
        assert hung[kind]["hung"]["n"] > 0
    assert "failed catalog reads during the leader kill" in result.stdout
    database = results["database"]  # users from the engine, rotated under catalog load
    assert database["rotations"] == 3
    assert database["failed_queries"] == 0, database["failures_by_kind"]
    assert database["users_left"] == 0
    assert database["requests"] > 0
    assert database["issue_ms"]["p50"] > 0
    assert database["hvac_issue_ms"]["p50"] > 0
    assert database["switch_ms"]["max"] >= database["switch_ms"]["p50"] > 0
    assert "issued users left after the handovers" in result.stdout
