"""The audit trail: exactly one record per decision, never a value, a hash chain that
``python -m broker audit verify`` checks and that pinpoints edits, deletions and insertions,
and a fail-closed mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.audit.trail import AuditTrail, PendingWrite
from broker.errors import AuditUnavailable
from devstack.harness import broker_command, wait_until
from secretbroker.v1 import broker_pb2
from tests.support import API, DATABASE, BrokerFactory, Pki, RunningBroker, Vault, get, status_of


def records(broker: RunningBroker) -> list[dict[str, Any]]:
    return [json.loads(line) for line in broker.audit_lines()]


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return broker_command("audit", "verify", str(path), timeout=60)


def test_every_allowed_and_denied_request_leaves_exactly_one_record(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault)
    broker.forget(DATABASE)  # the first read below is Vault's, the second the cache's
    stub = broker.stub(pki.catalog, pki.ca)
    get(stub, DATABASE)
    get(stub, DATABASE)
    for call in (
        lambda: get(broker.stub(pki.intruder, pki.ca), API),
        lambda: get(stub, "media-catalog/undeclared"),
        lambda: get(stub, "../x"),
    ):
        status_of(call)

    access = [r for r in records(broker) if r["event"] == "access"]
    assert [(r["identity"], r["secret"], r["decision"], r.get("source")) for r in access] == [
        ("spiffe://media.local/catalog", DATABASE, "allow", "vault"),
        ("spiffe://media.local/catalog", DATABASE, "allow", "cache"),
        ("spiffe://media.local/intruder", API, "deny", None),
        ("spiffe://media.local/catalog", "media-catalog/undeclared", "deny", None),
        ("spiffe://media.local/catalog", "../x", "deny", None),
    ]
    assert access[2]["reason"].startswith("PERMISSION_DENIED")
    assert access[0]["rpc"] == "GetSecret"
    assert access[0]["stale"] is False
    assert access[0]["version"] >= 1
    text = json.dumps(access)
    for value in vault.written[DATABASE].values():
        assert value not in text


def _trail(tmp_path: Path, count: int = 6) -> tuple[Path, list[bytes]]:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    for n in range(count):
        trail.record("access", rpc="GetSecret", identity="spiffe://x", secret=f"s/{n}")
    trail.close()
    return path, path.read_bytes().splitlines(keepends=True)


def test_verify_passes_an_intact_trail_and_one_continued_after_a_restart(tmp_path: Path) -> None:
    path, _ = _trail(tmp_path, 3)
    trail = AuditTrail(path)  # a restart appends and continues the chain
    trail.record("admin", rpc="RotateSecret", identity="spiffe://ops")
    trail.close()

    result = verify(path)

    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "ok: 4 records, the chain is intact"


@pytest.mark.parametrize(
    ("tamper", "line", "problem"),
    [
        (
            lambda lines: lines.__setitem__(2, lines[2].replace(b"s/2", b"s/X")),
            3,
            "was edited",
        ),
        (lambda lines: lines.pop(2), 3, "follows a gap: record 3 was deleted"),
        (lambda lines: lines.insert(2, lines[1]), 3, "repeats record number 2: it was inserted"),
        (
            lambda lines: lines.insert(
                2, lines[2].replace(b'"s/2"', b'"forged"').replace(b'"prev":"', b'"prev":"0')
            ),
            3,
            "was inserted",
        ),
        (lambda lines: lines.__setitem__(4, b'{"cut by a cra\n'), 5, "is not an audit record"),
        (
            lambda lines: lines.__setitem__(2, lines[2].replace(b'"prev":"', b'"prev":"f')),
            3,
            "was edited: its prev is not",
        ),
        (
            lambda lines: lines.__setitem__(5, lines[5].replace(b'"prev":"', b'"prev":"f')),
            5,
            "was edited, or the last record after it was",
        ),
    ],
    ids=[
        "edited",
        "deleted",
        "inserted copy",
        "inserted forgery",
        "torn line",
        "edited prev",
        "edited prev of the last",
    ],
)
def test_verify_pinpoints_the_first_tampered_record(
    tmp_path: Path, tamper: Any, line: int, problem: str
) -> None:
    path, lines = _trail(tmp_path)
    tamper(lines)
    path.write_bytes(b"".join(lines))

    result = verify(path)

    assert result.returncode == 1
    assert f"{path}:{line}: {problem}" in result.stdout


def test_fail_closed_audit_refuses_to_serve_unrecorded_reads(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """/dev/full accepts the open and fails every write: an audit disk that filled up."""
    closed = start_broker(vault, audit={"file": "/dev/full", "fail_closed": True})
    with pytest.raises(grpc.RpcError) as caught:
        get(closed.stub(pki.catalog, pki.ca), DATABASE)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "audit trail cannot be written" in (caught.value.details() or "")

    open_ = start_broker(vault, audit={"file": "/dev/full"})
    assert get(open_.stub(pki.catalog, pki.ca), DATABASE).name == DATABASE
    wait_until(  # written by the trail's own thread, after the answer
        lambda: "secretbroker_audit_failures_total 1.0" in open_.scrape()[1],
        what="the failed write counted",
    )


def test_admin_actions_name_who_did_what(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault)
    broker.admin(pki.ops, pki.ca).SetRollbackOverride(
        broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=["database", "api"]),
        timeout=10,
    )
    admin = [r for r in records(broker) if r["event"] == "admin"]
    assert admin == [
        {
            **admin[0],
            "rpc": "SetRollbackOverride",
            "identity": "spiffe://media.local/ops",
            "decision": "allow",
            "vault_enabled_categories": ["api", "database"],
        }
    ]
    assert verify(broker.config.audit.file or Path()).returncode == 0


def test_the_fast_allow_record_is_the_same_record_as_the_general_one(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl")
    fields = {
        "rpc": "GetSecret",
        "identity": 'spiffe://x/"quoted"\\',
        "secret": "bench/s0000",
        "decision": "allow",
        "version": 3,
        "source": "cache",
        "stale": True,
    }
    trail.record("access", **fields)
    trail.record_allowed("GetSecret", 'spiffe://x/"quoted"\\', "bench/s0000", 3, "cache", True)
    trail.close()
    general, fast = (
        json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()
    )

    assert {k: v for k, v in fast.items() if k not in ("time", "seq", "prev")} == {
        k: v for k, v in general.items() if k not in ("time", "seq", "prev")
    }
    assert (general["seq"], fast["seq"]) == (1, 2)
    assert verify(tmp_path / "audit.jsonl").returncode == 0


def test_a_value_pushed_to_many_streams_in_one_loop_turn_is_one_record_naming_their_count(
    tmp_path: Path,
) -> None:
    """A rotation's fan-out wakes every watch stream in one turn of the event loop: 10,000
    streams of one workload would be 10,000 records that differ only in their time."""
    trail = AuditTrail(tmp_path / "audit.jsonl")

    def push(identity: str, version: int) -> object:
        return trail.record_pushed("WatchSecrets", identity, "s/1", version, "cache", False)

    async def two_turns() -> None:
        confirmations = {push("spiffe://x/a", 2) for _ in range(500)}
        push("spiffe://x/b", 2)  # another workload's streams
        push("spiffe://x/a", 3)  # another value
        assert confirmations == {None}, "fail-open: no stream waits for the record"
        await asyncio.sleep(0)  # the next turn queues them
        for _ in range(3):  # a later turn: a record of its own
            push("spiffe://x/a", 3)
        await asyncio.sleep(0)

    asyncio.run(two_turns())
    trail.record_allowed("WatchSecrets", "spiffe://x/a", "s/1", 3, "cache", False)
    trail.close()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    *pushed, allowed = (json.loads(line) for line in lines)

    assert [(r["identity"], r["version"], r["streams"]) for r in pushed] == [
        ("spiffe://x/a", 2, 500),
        ("spiffe://x/b", 2, 1),
        ("spiffe://x/a", 3, 1),
        ("spiffe://x/a", 3, 3),
    ]
    same = {"time", "seq", "prev", "streams"}  # otherwise record_allowed's record
    assert {k: v for k, v in pushed[-1].items() if k not in same} == {
        k: v for k, v in allowed.items() if k not in same
    }
    assert verify(tmp_path / "audit.jsonl").returncode == 0


def test_fail_closed_pushes_wait_for_their_one_record_together(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl", fail_closed=True)

    async def fan_out() -> None:
        pending = [
            trail.record_pushed("WatchSecrets", "spiffe://x/a", "s/1", 2, "cache", False)
            for _ in range(100)
        ]
        assert len({id(written) for written in pending}) == 1, "one record, one confirmation"
        await asyncio.gather(*(trail.confirm(written) for written in pending))

    asyncio.run(fan_out())
    trail.close()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["streams"] for line in lines] == [100], "written before answered"


@pytest.fixture
def stalled_sink(tmp_path: Path) -> Iterator[Path]:
    """A named pipe whose reader never reads: a log pipeline that stopped. Closing the reader at
    the end breaks the pipe, which ends the blocked write."""
    fifo = tmp_path / "sink"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    yield fifo
    os.close(reader)


def fill(trail: AuditTrail, count: int) -> list[PendingWrite | None]:
    """``count`` records of about 100 bytes: 2,000 are past a pipe's 64 KiB."""
    return [
        trail.record("access", rpc="GetSecret", identity="spiffe://x", secret=f"s/{n}")
        for n in range(count)
    ]


def test_a_stalled_sink_never_blocks_a_fail_open_trail_and_counts_what_it_drops(
    stalled_sink: Path,
) -> None:
    dropped: list[int] = []
    trail = AuditTrail(
        stalled_sink, queue_size=100, write_timeout=0.1, on_drop=lambda: dropped.append(1)
    )

    confirmations = fill(trail, 5000)  # returns: nothing in it waits for the sink

    assert confirmations == [None] * 5000, "fail-open: no request waits for its record"
    assert 0 < len(dropped) < 5000
    wait_until(lambda: (trail.problem() or "").startswith("the audit trail is stalled"))
    trail.close(within=0.2)  # bounded, though the sink never reads


def test_a_stalled_sink_refuses_fail_closed_requests_within_the_write_timeout_then_at_once(
    stalled_sink: Path,
) -> None:
    trail = AuditTrail(stalled_sink, fail_closed=True, queue_size=100_000, write_timeout=0.2)

    async def scenario() -> tuple[int, str]:
        pending = fill(trail, 2000)
        await asyncio.sleep(0.1)
        refused = 0
        for written in pending[-10:]:
            try:
                await trail.confirm(written)
            except AuditUnavailable:
                refused += 1
        return refused, str(await _refusal(trail))

    refused, message = asyncio.run(scenario())

    assert refused == 10, "record before answer: none of them could be written"
    assert message.startswith("the audit trail is stalled: a write has taken"), "at once"
    assert (trail.problem() or "").startswith("the audit trail is stalled")
    trail.close(within=0.2)


def test_fail_closed_pushes_whose_record_finds_the_queue_full_are_all_refused(
    stalled_sink: Path,
) -> None:
    trail = AuditTrail(stalled_sink, fail_closed=True, queue_size=10, write_timeout=60)

    def stuck() -> bool:
        """The pipe's 64 KiB filled up, then the queue, which stays full."""
        for _ in range(200):
            with contextlib.suppress(AuditUnavailable):
                trail.record("access", rpc="GetSecret", identity="spiffe://x", secret="s/1")
        time.sleep(0.05)
        return trail.queued == 10

    wait_until(stuck, what="the writer stuck and the queue full")

    async def fan_out() -> list[BaseException | None]:
        pending = [
            trail.record_pushed("WatchSecrets", "spiffe://x/a", "s/1", 2, "cache", False)
            for _ in range(20)
        ]
        return await asyncio.gather(
            *(trail.confirm(written) for written in pending), return_exceptions=True
        )

    outcomes = asyncio.run(fan_out())

    assert {str(outcome) for outcome in outcomes} == {
        "the audit trail cannot be written (queue full)"
    }, "record before answer: no stream is sent the value"
    trail.close(within=0.2)


async def _refusal(trail: AuditTrail) -> AuditUnavailable:
    with pytest.raises(AuditUnavailable) as refused:
        trail.record("access", rpc="GetSecret")  # refused before it is queued
    return refused.value


def test_a_fail_closed_broker_leaves_while_its_sink_is_stalled_and_returns_after(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, stalled_sink: Path
) -> None:
    """Stalled: refused at once, not ready, and its gRPC server stops, so clients of every kind
    call other replicas. Once the sink reads again, it takes calls again, with no restart."""
    broker = start_broker(
        vault, audit={"file": str(stalled_sink), "fail_closed": True, "write_timeout": "200ms"}
    )
    stub = broker.stub(pki.catalog, pki.ca)
    for _ in range(5000):  # about 200 bytes of audit each: the pipe's 64 KiB fill up
        try:
            get(stub, DATABASE, timeout=5)
        except grpc.RpcError:
            break
    wait_until(lambda: "the audit trail is stalled" in broker.scrape("/readyz")[1])
    assert broker.scrape("/readyz")[0] == 503
    wait_until(
        lambda: status_of(lambda: get(stub, DATABASE, timeout=1)) == grpc.StatusCode.UNAVAILABLE
    )

    with open(stalled_sink, "rb") as sink:  # the log pipeline reads again
        os.set_blocking(sink.fileno(), False)
        wait_until(
            lambda: sink.read() is None and get(stub, DATABASE, timeout=1).name == DATABASE,
            ignoring=(grpc.RpcError,),
            what="calls answered again",
        )
        assert broker.scrape("/readyz")[0] == 200
