"""Start-up refuses what it cannot serve with, naming the key, in one line and exit code 2: wrong
TLS files, an address in use, folders it cannot make. Folders it can make, it makes (0700)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from secretbroker.v1 import broker_pb2
from tests.support import OPS_ID, BrokerFactory, Pki, Vault, broker_settings, serve, write_config


def server_files(pki: Pki, cert: Path, key: Path) -> dict[str, str]:
    return {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(pki.ca)}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ("cert-as-key", "config error: server.key_file: holds a certificate, not a private key"),
        ("other-key", "config error: server.key_file: does not match the certificate"),
        ("key-as-cert", "config error: server.cert_file: holds no PEM certificate"),
        ("key-as-ca", "config error: server.client_ca_file: holds no PEM certificate"),
    ],
)
def test_wrong_tls_files_stop_start_up_naming_the_key(
    vault: Vault, pki: Pki, tmp_path: Path, files: str, expected: str
) -> None:
    server = {
        "cert-as-key": server_files(pki, pki.server.cert, pki.server.cert),
        "other-key": server_files(pki, pki.server.cert, pki.catalog.key),
        "key-as-cert": server_files(pki, pki.server.key, pki.server.key),
        "key-as-ca": {
            **server_files(pki, pki.server.cert, pki.server.key),
            "client_ca_file": str(pki.server.key),
        },
    }[files]
    document = broker_settings(vault, pki)
    document["server"].update(server)
    line = serve_refusal(write_config(tmp_path / "broker.toml", document))

    assert line.startswith(expected)
    assert "PRIVATE KEY" not in line


def serve_refusal(config: Path) -> str:
    result = serve(config)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("key", ["server.listen", "metrics.listen"])
def test_an_address_in_use_stops_start_up_naming_the_key(
    vault: Vault, pki: Pki, tmp_path: Path, key: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        document = broker_settings(vault, pki)
        table, _, name = key.partition(".")
        document[table][name] = address
        line = serve_refusal(write_config(tmp_path / "broker.toml", document))

    assert line.startswith(f"config error: {key}: cannot listen on {address}")


@pytest.mark.parametrize("key", ["audit.file", "admin.state_file"])
def test_a_folder_that_cannot_be_made_stops_start_up_naming_the_key(
    vault: Vault, pki: Pki, tmp_path: Path, key: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    document = broker_settings(vault, pki)
    table, _, name = key.partition(".")
    document[table][name] = str(tmp_path / "a-file" / "below" / "x.json")
    line = serve_refusal(write_config(tmp_path / "broker.toml", document))

    assert line.startswith(f"config error: {key}: cannot create the folder")


def test_missing_folders_are_made_0700_and_a_flip_is_saved_and_audited_there(
    vault: Vault, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    state = tmp_path / "state" / "deeper" / "override.json"
    trail = tmp_path / "audit" / "trail.jsonl"
    broker = start_broker(
        vault,
        admin={"identities": [OPS_ID], "state_file": str(state)},
        audit={"file": str(trail)},
    )
    admin = broker.admin(pki.ops, pki.ca)

    admin.SetRollbackOverride(
        broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=["api"]), timeout=10
    )

    assert state.is_file()
    assert (state.parent.stat().st_mode & 0o777) == 0o700
    assert (trail.parent.stat().st_mode & 0o777) == 0o700
    assert '"rpc":"SetRollbackOverride"' in trail.read_text()
