"""The reference catalog service through the whole chain (OpenBao -> broker -> catalog over
mTLS -> FastAPI on uvicorn -> httpx): start, rotate, flip to env and back, without restarting
the catalog; bad input and malformed requests get a clear answer."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.sources.env import variable_name
from secretbroker.v1 import broker_pb2
from tests.catalog_process import CATALOG_SECRETS, Catalog, catalog_service, http
from tests.support import API, DATABASE, EXTERNAL, BrokerFactory, Pki, RunningBroker, Vault


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
    values = {k: v for data in vault_values.values() for k, v in data.items()} | env_values
    with catalog_service(broker.port, pki, values.values()) as catalog:
        yield catalog, broker, values


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


BAD_BODIES: list[tuple[Any, str]] = [
    ("not json", "body must be a JSON object"),
    ([1, 2], "body must be a JSON object"),
    ({"title": ""}, "title: String should have at least 1 character"),
    ({"title": "X", "kind": "opera"}, "kind: Input should be 'movie'"),
    ({"title": "X", "year": "1999"}, "year: Input should be a valid integer"),
    ({"title": "X", "year": 1500}, "year: Input should be greater than or equal to 1870"),
    ({"title": "X", "rating": 5}, "rating: Extra inputs are not permitted"),
]


def test_bad_input_gets_a_clear_400_and_stores_nothing(
    catalog_chain: tuple[Catalog, RunningBroker, dict[str, str]],
) -> None:
    """Each case in one service (starting one per case cost seconds each)."""
    catalog, _, _ = catalog_chain
    token = catalog.token("alice")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for body, message in BAD_BODIES:
        response = httpx.post(
            f"{catalog.url}/media",
            content=body if isinstance(body, str) else None,
            json=None if isinstance(body, str) else body,
            headers=headers,
            timeout=10,
        )
        assert response.status_code == 400, body
        assert response.json()["error"].startswith(message)
        for value in ("1999", "opera"):
            assert value not in response.text, "an error never echoes a value"
    assert http("GET", f"{catalog.url}/media") == (200, {"items": []})


def raw_request(url: str, head: str, body: bytes = b"") -> str:
    """Send ``head`` (request line and headers) as it is, and return the status line."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = connection.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0]


def test_a_bad_content_length_or_an_oversized_body_is_answered_at_once(
    catalog_chain: tuple[Catalog, RunningBroker, dict[str, str]],
) -> None:
    """The stdlib service read to the end of the stream for -1 (unbounded memory, a thread
    held) and gave no answer at all for a non-number. A chunked body is counted as it comes."""
    catalog, _, _ = catalog_chain
    for length, expected in (("-1", "400"), ("12abc", "400"), (str(70 * 1024), "413")):
        head = f"POST /media HTTP/1.1\nHost: catalog\nContent-Length: {length}\n"
        assert raw_request(catalog.url, head, b'{"title": "X"}').split()[1] == expected, length

    def chunks() -> Iterator[bytes]:
        yield b'{"title": "'
        for _ in range(100):
            yield b"x" * 1024

    response = httpx.post(
        f"{catalog.url}/media",
        content=chunks(),
        headers={
            "Authorization": f"Bearer {catalog.token('alice')}",
            "Content-Type": "application/json",
        },
        timeout=10,
    )
    assert response.status_code == 413
    assert http("GET", f"{catalog.url}/media") == (200, {"items": []})


def test_query_parameters_do_not_change_the_route_and_the_api_is_described(
    catalog_chain: tuple[Catalog, RunningBroker, dict[str, str]],
) -> None:
    catalog, _, _ = catalog_chain
    assert http("GET", f"{catalog.url}/media?x=1") == (200, {"items": []})
    status, document = http("GET", f"{catalog.url}/openapi.json")
    assert status == 200
    assert {"/healthz", "/media"} <= set(document["paths"])
    assert "MediaIn" in document["components"]["schemas"]


def test_a_log_sink_nobody_reads_does_not_stall_requests(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    """Every request logs an access line; with stderr a pipe nobody reads, the pipe fills after
    a few hundred. Log records are written by a thread of their own (and dropped when it falls
    too far behind), so the event loop never waits on the pipe."""
    private_vault.write(DATABASE, url=f"sqlite:///{tmp_path / 'catalog.db'}")
    private_vault.write(API, jwt_secret=secrets.token_urlsafe(32))
    private_vault.write(EXTERNAL, tmdb_api_key=secrets.token_urlsafe(16))
    broker = start_broker(private_vault, secrets_=CATALOG_SECRETS)
    with (
        catalog_service(broker.port, pki, [], read_output=False) as catalog,
        httpx.Client(base_url=catalog.url, timeout=10) as client,
    ):
        answered = [client.get(f"/healthz?padding={'x' * 200}").status_code for _ in range(1500)]
    assert answered == [200] * 1500
