"""A keyed audit trail: records chained with an HMAC under a key read from a 0600 file, so
nobody without the key can recompute the chain; across key rotations and rotated files; old
unkeyed trails still verify. Trail files are created 0600."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from broker.audit.chain import KeyFileError, line_hash, load_key
from broker.audit.trail import AuditTrail
from broker.config_loader import parse_config
from broker.errors import ConfigError
from devstack.harness import BrokerProcess, broker_command, wait_until
from devstack.pki import write_private
from secretbroker.v1 import broker_pb2_grpc
from tests.support import API, Pki, Vault, broker_settings, get, secure_channel


def key_file(path: Path) -> Path:
    write_private(path, secrets.token_hex(32).encode())
    return path


def verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return broker_command("audit", "verify", *map(str, args), timeout=60)


def write(trail: AuditTrail, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        trail.record("access", rpc="GetSecret", identity="spiffe://x", secret=f"s/{n}")


def test_a_keyed_trail_verifies_only_with_its_key_and_resists_a_recomputed_chain(
    tmp_path: Path,
) -> None:
    key, other = key_file(tmp_path / "audit.key"), key_file(tmp_path / "other.key")
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, key=load_key(key))
    write(trail, 5)
    trail.close()
    lines = path.read_bytes().splitlines(keepends=True)

    assert all(json.loads(line)["prev"].startswith("hmac:") for line in lines)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert verify(path, "--key-file", key).stdout.strip() == "ok: 5 records, the chain is intact"
    assert "give that key" in verify(path).stdout
    assert "give that key" in verify(path, "--key-file", other).stdout
    # Someone without the key edits record 3 and recomputes every link after it: as plain
    # hashes, or as keyed-looking links they cannot compute.
    kid = load_key(key).kid
    for relink, line_number, problem in (
        (line_hash, 4, "has an unkeyed link after keyed ones"),
        (lambda line: f"hmac:{kid}:{line_hash(line)}", 4, "was edited"),
    ):
        forged = [*lines[:2], lines[2].replace(b"s/2", b"s/X")]
        for line in lines[3:]:
            record = json.loads(line)
            record["prev"] = relink(forged[-1])
            forged.append(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        path.write_bytes(b"".join(forged))
        result = verify(path, "--key-file", key)
        assert result.returncode == 1
        assert f"{path}:{line_number}: {problem}" in result.stdout


def test_a_trail_goes_on_across_a_key_rotation_and_an_unkeyed_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old, new = key_file(tmp_path / "old.key"), key_file(tmp_path / "new.key")
    for key in (None, old, new):  # three restarts: unkeyed, then keyed, then the key rotated
        trail = AuditTrail(path, key=load_key(key) if key else None)
        write(trail, 3)
        trail.close()

    assert verify(path, "--key-file", old, "--key-file", new).returncode == 0
    missing_old = verify(path, "--key-file", new)
    assert missing_old.returncode == 1
    assert f"{path}:4: is chained with audit key {load_key(old).kid}" in missing_old.stdout


def test_rotated_files_chain_on_and_verify_in_seq_order_or_as_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "trail"
    folder.mkdir()
    key = key_file(tmp_path / "audit.key")
    path = folder / "audit.jsonl"
    trail = AuditTrail(path, key=load_key(key))
    for number in (2, 1):  # logrotate's numbering: the higher, the older
        write(trail, 3)
        assert trail.flush()
        path.rename(folder / f"audit.jsonl.{number}")
        trail.reopen()
    write(trail, 2)
    trail.close()

    ordered = [folder / "audit.jsonl.2", folder / "audit.jsonl.1", path]
    assert verify(*ordered, "--key-file", key).stdout.startswith("ok: 8 records")
    assert verify(folder, "--key-file", key).stdout.startswith("ok: 8 records")
    (folder / "audit.jsonl.1").unlink()  # a rotated file lost: the gap is named
    gap = verify(folder, "--key-file", key)
    assert gap.returncode == 1
    assert "follows a gap: record 4-6 was deleted" in gap.stdout


def test_a_key_file_others_can_read_or_too_short_stops_start_up(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    loose = tmp_path / "loose.key"
    loose.write_text(secrets.token_hex(32))
    loose.chmod(0o644)
    short = tmp_path / "short.key"
    write_private(short, b"too short")
    for path, problem in ((loose, "readable by its owner only"), (short, "fewer than 32 bytes")):
        document = broker_settings(vault, pki, audit={"file": "audit.jsonl", "key_file": str(path)})
        with pytest.raises(ConfigError) as caught:
            parse_config(document, tmp_path, environ={})
        assert caught.value.key == "audit.key_file"
        assert problem in caught.value.problem
        assert loose.read_text() not in str(caught.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file root owns or not")
def test_a_key_file_its_group_may_read_is_taken_only_when_root_owns_it(tmp_path: Path) -> None:
    """How Kubernetes mounts a Secret for a non-root pod: root-owned, group fsGroup, 0440."""
    key = key_file(tmp_path / "audit.key")
    key.chmod(0o440)
    load_key(key)  # root-owned, group-readable: taken

    os.chown(key, 65534, -1)  # owned by nobody: its group could read it behind the owner's back
    with pytest.raises(KeyFileError, match="readable by its owner only"):
        load_key(key)
    os.chown(key, 0, -1)
    key.chmod(0o460)  # the group may write it
    with pytest.raises(KeyFileError, match="not 0460"):
        load_key(key)


def test_a_real_broker_writes_a_keyed_trail_and_reopens_it_on_sighup(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:

    key = key_file(tmp_path / "audit.key")
    trail = tmp_path / "audit" / "trail.jsonl"
    document = broker_settings(vault, pki, audit={"file": str(trail), "key_file": str(key)})
    broker = BrokerProcess(tmp_path / "broker", document, environ={"VAULT_ADDR": vault.address})
    broker.start()
    try:
        stub = broker_pb2_grpc.SecretBrokerStub(secure_channel(broker.port, pki.ca, pki.catalog))
        wait_until(lambda: get(stub, API, timeout=2).name == API, ignoring=(Exception,))
        get(stub, API)
        trail.rename(trail.with_name("trail.jsonl.1"))
        broker.send(signal.SIGHUP)
        wait_until(lambda: trail.exists(), what="the reopened trail")
        get(stub, API)
    finally:
        assert broker.terminate() == 0

    assert (trail.stat().st_mode & 0o777) == 0o600
    assert (trail.parent.stat().st_mode & 0o777) == 0o700
    result = verify(trail.parent, "--key-file", key)
    assert result.returncode == 0, result.stdout
    assert (
        key.read_text().strip()
        not in trail.read_text() + trail.with_name("trail.jsonl.1").read_text()
    )
