"""`python -m devstack` (`make dev`) as a new user runs it: up, readable through the broker,
Ctrl-C leaves nothing behind, and it runs again."""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx
import hvac
import pytest

from devstack.harness import wait_until
from devstack.openbao import OpenBaoDevServer
from devstack.pki import CertFiles
from devstack.stack import client_env

READY_LINE = "Press Ctrl-C to stop everything."


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def _run_until_ready(state_dir: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack", "--dir", str(state_dir), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output = []
    deadline = time.monotonic() + 90
    for line in process.stdout:
        output.append(line)
        if READY_LINE in line or time.monotonic() > deadline:
            break
    return process, "".join(output)


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    return rest


@pytest.mark.slow
def test_dev_stack_starts_serves_the_catalog_and_stops_cleanly_twice(tmp_path: Path) -> None:
    state_dir = tmp_path / "dev-stack"
    for _ in range(2):  # re-running works
        process, output = _run_until_ready(state_dir)
        try:
            assert READY_LINE in output, output
            for prop in ("database_url", "jwt_secret_key", "tmdb_api_key"):
                assert f"catalog read Config.{prop} through the broker" in output
            vault_addr = re.search(r"OpenBao \(Vault API\)\s+(\S+)", output)
            assert vault_addr is not None
            values = _read_as_broker(vault_addr.group(1), state_dir)
            assert len(values) == 5
            output += _catalog_config_command(output, state_dir)
            output += _catalog_service_and_ops(output, state_dir)
            assert _processes_mentioning(str(state_dir)), "the broker runs with its config there"
        finally:
            rest = _stop(process)
        assert process.returncode == 0, output + rest
        assert "dev stack stopped" in rest
        leaked = [v for v in values if v in output + rest]
        assert not leaked, "the dev stack printed a secret value"
        port = vault_addr.group(1).rsplit(":", 1)[1]
        assert not _processes_mentioning(str(state_dir))
        assert not _processes_mentioning(f"127.0.0.1:{port}"), "OpenBao was left running"


def _run_module(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` as a user would type it from the banner; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def _client_env(output: str, state_dir: Path, client: str) -> dict[str, str]:
    """The environment the banner tells ``client`` (catalog or ops) to export."""
    broker_addr = re.search(r"SECRETBROKER_ADDR=(\S+)", output)
    assert broker_addr is not None
    certs = state_dir / "certs"
    cert = CertFiles(certs / f"{client}.pem", certs / f"{client}-key.pem")
    return {**os.environ, **client_env(broker_addr.group(1), certs / "ca.pem", cert)}


def _catalog_config_command(output: str, state_dir: Path) -> str:
    """Run the `python -m catalog config` the dev stack suggests; it reads through the broker."""
    env = _client_env(output, state_dir, "catalog")
    result = _run_module(["catalog", "config"], env)
    assert (
        "jwt_secret_key: 43 characters from media-catalog/api (version 1, vault)" in result.stdout
    )
    return result.stdout + result.stderr


def _catalog_service_and_ops(output: str, state_dir: Path) -> str:
    """The catalog service the dev stack started answers; a token minted as the banner shows is
    accepted; the ops status command works with the dev ops certificate."""
    metrics = re.search(r"broker metrics\s+(http://\S+)/metrics", output)
    assert metrics is not None
    with urllib.request.urlopen(f"{metrics.group(1)}/metrics", timeout=10) as response:  # noqa: S310
        assert b"secretbroker_vault_up 1.0" in response.read()
    service = re.search(r"catalog service\s+(http://\S+)", output)
    assert service is not None
    with urllib.request.urlopen(f"{service.group(1)}/healthz", timeout=10) as response:  # noqa: S310
        health = json.loads(response.read())
    assert health["secrets"]["media-catalog/api"] == {
        "version": 1,
        "source": "vault",
        "stale": False,
    }
    printed = ""
    for client, args in (
        ("catalog", ["catalog", "token", "--sub", "me"]),
        ("ops", ["broker", "status"]),
    ):
        env = _client_env(output, state_dir, client)
        result = _run_module(args, env)
        printed += result.stdout + result.stderr
        if client == "catalog":
            added = httpx.post(  # as the banner's curl --json does
                f"{service.group(1)}/media",
                json={"title": "Heat", "year": 1995},
                headers={"Authorization": f"Bearer {result.stdout.strip()}"},
                timeout=10,
            )
            assert added.status_code == 201
            printed = printed.replace(result.stdout, "")  # a token is not a stored secret
        else:
            assert "rule in force: default" in result.stdout
            printed += _roll_api_back_and_forth(env, f"{service.group(1)}/healthz")
    return printed


def _equals(read: Callable[[], str], expected: str) -> bool:
    return read() == expected


def _roll_api_back_and_forth(ops_env: dict[str, str], healthz: str) -> str:
    """The dev broker has rollback variables: a flip moves the running catalog to them and back."""

    def api_source() -> str:
        with urllib.request.urlopen(healthz, timeout=10) as response:  # noqa: S310
            source: str = json.loads(response.read())["secrets"]["media-catalog/api"]["source"]
            return source

    printed = ""
    for args, expected in (
        (["rollback", "set", '["database", "external"]'], "env"),
        (["rollback", "clear"], "vault"),
    ):
        result = _run_module(["broker", *args], ops_env)
        printed += result.stdout + result.stderr
        wait_until(functools.partial(_equals, api_source, expected), what=f"api from {expected}")
    return printed


def _read_as_broker(address: str, state_dir: Path) -> list[str]:
    """The seeded values, read with the broker's own AppRole from the state folder."""
    client = hvac.Client(url=address, token="", timeout=5)
    client.auth.approle.login(
        role_id=(state_dir / "approle" / "role_id").read_text(),
        secret_id=(state_dir / "approle" / "secret_id").read_text(),
    )
    values = []
    for path in ("media-catalog/database", "media-catalog/api", "media-catalog/external"):
        data = client.secrets.kv.v2.read_secret_version(
            path=path, mount_point="secret", raise_on_deleted_version=True
        )["data"]["data"]
        values.extend(data.values())
    client.adapter.close()
    return values


@pytest.mark.ha
def test_the_ha_dev_stack_keeps_serving_when_the_node_its_banner_names_is_killed(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "dev-stack-ha"
    process, output = _run_until_ready(state_dir, "--ha")
    try:
        assert READY_LINE in output, output
        assert output.count("OpenBao node node") == 3
        kill = re.search(r"kill -9 (\d+)", output)
        assert kill is not None
        os.kill(int(kill.group(1)), signal.SIGKILL)
        output += _catalog_config_command(output, state_dir)
        status = _run_module(["broker", "status"], _client_env(output, state_dir, "ops"))
        assert "all 2 replicas agree" in status.stdout
    finally:
        rest = _stop(process)
    assert process.returncode == 0, output + rest
    assert not _processes_mentioning(str(state_dir)), "a node or a broker was left running"


@pytest.mark.slow
def test_the_postgres_dev_stack_gives_the_catalog_a_new_database_user_on_rotation(
    tmp_path: Path,
) -> None:
    """``make dev-postgres``: the catalog on PostgreSQL with a user from OpenBao's database
    engine; the banner's rotate command gives it a new one, which the stack logs, and the
    catalog keeps answering on it."""
    state_dir = tmp_path / "dev-stack-postgres"
    process, output = _run_until_ready(state_dir, "--postgres")
    try:
        assert READY_LINE in output, output
        assert "-m broker rotate media-catalog/database" in output
        catalog_url = re.search(r"catalog service\s+(http://\S+)", output)
        assert catalog_url is not None
        assert httpx.get(f"{catalog_url.group(1)}/media", timeout=10).status_code == 200
        _run_module(
            ["broker", "rotate", "media-catalog/database"], _client_env(output, state_dir, "ops")
        )
        assert process.stdout is not None
        for line in process.stdout:
            output += line
            if "the catalog's database user is now" in line:
                break
        assert httpx.get(f"{catalog_url.group(1)}/media", timeout=10).status_code == 200
    finally:
        rest = _stop(process)
    assert process.returncode == 0, output + rest
    assert "the catalog's database user is now v-" in output
    assert not _processes_mentioning(str(state_dir)), "a broker was left running"
    port = re.search(r"PostgreSQL on 127\.0\.0\.1:(\d+)", output)
    assert port is not None
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=5),
    ):
        pass  # PostgreSQL stopped with the stack


def test_an_openbao_dev_server_keeps_its_root_token_out_of_the_users_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dev server writes its root token to ~/.vault-token, where hvac and the bao CLI pick it
    up for any client without a token: it must land in the server's own work folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    server = OpenBaoDevServer(tmp_path / "openbao", root_token=secrets.token_hex(16))
    server.start()
    try:
        wait_until(lambda: (tmp_path / "openbao" / ".vault-token").exists())
    finally:
        server.stop()

    assert not (home / ".vault-token").exists()
