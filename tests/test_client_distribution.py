"""The SDK installs alone: a fresh virtual environment gets ``sdk/`` (secretbroker-client) with
grpcio and protobuf only, and reads a secret from a real broker over mutual TLS, sync and
asyncio, with none of the server's dependencies present."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import client_env
from tests.support import API, BrokerFactory, Pki, Vault

ROOT = Path(__file__).parents[1]
SERVER_ONLY = {"hvac", "cryptography", "prometheus-client", "pyjwt", "secretbroker", "requests"}

READ = """
import asyncio, os
from secretbroker.client import AsyncSecretsClient, BrokerClientConfig, SecretsClient

config = BrokerClientConfig.from_env(os.environ)
with SecretsClient(config) as client:
    secret = client.get_secret({name!r})
    print("sync", secret.name, secret.version, secret.source.value, sorted(secret.data))

async def main() -> None:
    async with AsyncSecretsClient(config) as client:
        secret = await client.get_secret({name!r})
        print("async", secret.name, secret.version, secret.source.value, sorted(secret.data))

asyncio.run(main())
"""

pytestmark = pytest.mark.slow


def test_a_fresh_virtualenv_with_just_the_sdk_reads_a_secret_over_mtls(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    broker = start_broker(vault, secrets_={API: {}})
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    source = tmp_path / "sdk"  # a copy: pip builds in the source tree, which stays clean
    shutil.copytree(ROOT / "sdk", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([*pip, "install", str(source)], check=True, capture_output=True)
    listed = subprocess.run(
        [*pip, "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"secretbroker-client", "grpcio", "protobuf"} <= installed
    assert not installed & SERVER_ONLY, f"server dependencies: {sorted(installed & SERVER_ONLY)}"

    environ = {
        key: value for key, value in os.environ.items() if not key.startswith("PYTHON")
    } | client_env(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)
    result = subprocess.run(
        [python, "-I", "-c", READ.format(name=API)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environ,
    )
    assert result.returncode == 0, result.stderr
    sync, asynchronous = result.stdout.splitlines()
    assert sync.split(maxsplit=2) == ["sync", API, asynchronous.split(maxsplit=2)[2]]
    assert sync.endswith(" vault ['other', 'value']"), "version, source and keys (never values)"
