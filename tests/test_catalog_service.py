"""The reference catalog service through the whole chain (OpenBao -> broker -> catalog over
mTLS -> HTTP): start, rotate, flip to env and back, without restarting the catalog."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.sources.env import variable_name
from devstack.harness import free_port_pair, wait_until
from devstack.stack import client_env
from secretbroker.v1 import broker_pb2
from tests.support import API, DATABASE, EXTERNAL, BrokerFactory, Pki, RunningBroker, Vault

CATALOG_SECRETS = {
    DATABASE: {"keys": ["url"]},
    API: {"keys": ["jwt_secret"], "rotation": {"key": "jwt_secret"}},
    EXTERNAL: {"keys": ["tmdb_api_key"]},
}


def http(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - a loopback http URL built by the test
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Catalog:
    def __init__(self, process: subprocess.Popen[str], url: str, environ: dict[str, str]) -> None:
        self.process = process
        self.url = url
        self.environ = environ

    def health(self) -> dict[str, Any]:
        status, document = http("GET", f"{self.url}/healthz")
        assert status == 200, document
        secrets_: dict[str, Any] = document["secrets"]
        return secrets_

    def wait_for(self, name: str, **expected: Any) -> None:
        def reported() -> bool:
            report = self.health()[name]
            return all(report[k] == v for k, v in expected.items())

        wait_until(reported, 20, f"{name} to become {expected}", interval=0.1)

    def token(self, subject: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "catalog", "token", "--sub", subject],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=self.environ,
        )
        return result.stdout.strip()

    def add(self, token: str, title: str) -> int:
        status, _ = http("POST", f"{self.url}/media", token, {"title": title, "year": 1999})
        return status


@pytest.fixture
def catalog_chain(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> Iterator[tuple[Catalog, RunningBroker, dict[str, str]]]:
    database = f"sqlite:///{tmp_path / 'catalog.db'}"
    vault_values = {
        DATABASE: {"url": database},
        API: {"jwt_secret": secrets.token_urlsafe(32)},
        EXTERNAL: {"tmdb_api_key": secrets.token_urlsafe(16)},
    }
    for path, data in vault_values.items():
        private_vault.write(path, **data)
    env_values = {
        variable_name(DATABASE, "url"): database,  # rollback keeps the same database
        variable_name(API, "jwt_secret"): secrets.token_urlsafe(32),
        variable_name(EXTERNAL, "tmdb_api_key"): secrets.token_urlsafe(16),
    }
    broker = start_broker(private_vault, secrets_=CATALOG_SECRETS, environ=env_values)
    port = free_port_pair()
    environ = {**os.environ, **client_env(f"127.0.0.1:{broker.port}", pki.ca, pki.catalog)}
    process = subprocess.Popen(
        [sys.executable, "-m", "catalog", "serve", "--listen", f"127.0.0.1:{port}"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    catalog = Catalog(process, f"http://127.0.0.1:{port}", environ)

    def up() -> bool:
        assert process.poll() is None, "the catalog service exited"
        try:
            catalog.health()
        except (OSError, AssertionError):
            return False
        return True

    wait_until(up, 30, "the catalog service", interval=0.1)
    values = {k: v for data in vault_values.values() for k, v in data.items()} | env_values
    yield catalog, broker, values
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    for value in values.values():
        if not value.startswith("sqlite:"):
            assert value not in output, "a secret value reached the catalog's output"


def test_catalog_service_follows_rotation_and_rollback_without_restart(
    catalog_chain: tuple[Catalog, RunningBroker, dict[str, str]], pki: Pki
) -> None:
    catalog, broker, _ = catalog_chain
    admin = broker.admin(pki.ops, pki.ca)
    assert http("GET", f"{catalog.url}/media") == (200, {"items": []})
    first = catalog.token("alice")
    assert catalog.add(first, "Heat") == 201
    assert http("POST", f"{catalog.url}/media", None, {"title": "No token"})[0] == 401

    rotated = admin.RotateSecret(broker_pb2.RotateSecretRequest(name=API), timeout=30).version
    catalog.wait_for(API, version=rotated, source="vault")
    assert catalog.add(first, "Ronin") == 201, "a token from before the rotation, within grace"
    second = catalog.token("bob")
    assert catalog.add(second, "Thief") == 201

    admin.SetRollbackOverride(
        broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=["database", "external"]),
        timeout=10,
    )
    catalog.wait_for(API, source="env")
    assert catalog.add(second, "Collateral") == 401, "the env key differs from Vault's"
    from_env = catalog.token("carol")
    assert catalog.add(from_env, "Collateral") == 201

    admin.ClearRollbackOverride(broker_pb2.ClearRollbackOverrideRequest(), timeout=10)
    catalog.wait_for(API, source="vault", version=rotated)
    assert catalog.add(second, "Manhunter") == 201

    status, listing = http("GET", f"{catalog.url}/media")
    assert status == 200
    assert [(i["title"], i["created_by"]) for i in listing["items"]] == [
        ("Heat", "alice"),
        ("Ronin", "alice"),
        ("Thief", "bob"),
        ("Collateral", "carol"),
        ("Manhunter", "bob"),
    ]
    assert catalog.process.poll() is None, "the catalog was never restarted"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "body must be a JSON object"),
        ({"title": ""}, "title: must be a string"),
        ({"title": "X", "kind": "opera"}, "kind: must be one of"),
        ({"title": "X", "year": "1999"}, "year: must be a whole number"),
        ({"title": "X", "rating": 5}, "unknown field: 'rating'"),
    ],
)
def test_bad_input_gets_a_clear_400_and_stores_nothing(
    catalog_chain: tuple[Catalog, RunningBroker, dict[str, str]], body: Any, message: str
) -> None:
    catalog, _, _ = catalog_chain
    token = catalog.token("alice")
    request = urllib.request.Request(  # noqa: S310
        f"{catalog.url}/media",
        method="POST",
        data=body.encode() if isinstance(body, str) else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310
    assert caught.value.code == 400
    assert message in json.loads(caught.value.read())["error"]
    assert http("GET", f"{catalog.url}/media") == (200, {"items": []})
