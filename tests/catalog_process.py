"""The reference catalog service as its own process (``python -m catalog serve``) for tests,
and a small HTTP client for it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

from catalog.auth import TokenAuthority
from devstack.harness import free_port_pair, wait_until
from devstack.stack import client_env
from secretbroker.client import BrokerClientConfig, SecretsClient
from tests.support import API, DATABASE, EXTERNAL, Pki

WORKERS = 16
"""More than the pool's POOL_MAX_SIZE connections: requests wait in the pool's queue, also when
the switch comes."""

CATALOG_SECRETS: dict[str, dict[str, Any]] = {
    DATABASE: {"keys": ["url"]},
    API: {"keys": ["jwt_secret"], "rotation": {"key": "jwt_secret"}},
    EXTERNAL: {"keys": ["tmdb_api_key"]},
}


def http(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.request(method, url, json=body, headers=headers, timeout=10)
    return response.status_code, response.json()


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
        """A token signed with the key the broker serves now, as ``python -m catalog token``
        mints it (in this process: the dev stack's test runs the command itself)."""
        with SecretsClient(BrokerClientConfig.from_env(self.environ)) as client:
            return TokenAuthority(client.get_secret).mint(subject)

    def add(self, token: str, title: str) -> int:
        status, _ = http("POST", f"{self.url}/media", token, {"title": title, "year": 1999})
        return status


@contextlib.contextmanager
def catalog_service(
    broker_port: int, pki: Pki, values: Iterable[str], *, read_output: bool = True
) -> Iterator[Catalog]:
    """The service reading through the broker at ``broker_port``; after it stopped, none of
    ``values`` (but SQLite paths) may be in its output. Without ``read_output``, nobody reads
    its output until it stopped: a stalled log sink."""
    port = free_port_pair()
    environ = {**os.environ, **client_env(f"127.0.0.1:{broker_port}", pki.ca, pki.catalog)}
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
        except (httpx.HTTPError, AssertionError):
            return False
        return True

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    if read_output:
        reader.start()
    try:
        wait_until(up, 30, "the catalog service", interval=0.1)
        yield catalog
    finally:
        process.send_signal(signal.SIGTERM)
        if read_output:
            process.wait(timeout=20)
            reader.join(timeout=20)
            if process.stdout is not None:
                process.stdout.close()
        else:  # it stops while nobody reads: its logs must not hold it
            process.wait(timeout=20)
            lines.append(process.communicate(timeout=20)[0])
    output = "".join(lines)
    for value in values:
        if not value.startswith("sqlite:"):
            assert value not in output, "a secret value reached the catalog's output"


async def load(
    catalog: Catalog, tokens: list[str], stop: asyncio.Event
) -> collections.Counter[str]:
    """WORKERS clients adding and listing, each POST with the newest and the oldest token in
    turn, until ``stop``; the outcomes counted ("ok", or what failed)."""
    outcomes: collections.Counter[str] = collections.Counter()

    async def worker(number: int, client: httpx.AsyncClient) -> None:
        turn = 0
        while not stop.is_set():
            turn += 1
            token = tokens[-1] if turn % 2 else tokens[0]
            try:
                added = await client.post(
                    "/media",
                    json={"title": f"worker {number} turn {turn}"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                listed = await client.get("/media")
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                continue
            for response, expected in ((added, 201), (listed, 200)):
                ok = response.status_code == expected
                outcomes["ok" if ok else f"{response.status_code}: {response.text[:80]}"] += 1

    async with httpx.AsyncClient(base_url=catalog.url, timeout=10) as client:
        await asyncio.gather(*(worker(number, client) for number in range(WORKERS)))
    return outcomes


def under_load(catalog: Catalog, tokens: list[str], steps: Callable[[], None]) -> None:
    """Run ``steps`` (blocking, in a thread) while WORKERS clients load the catalog, from half a
    second before until half a second after; every request of the load must succeed."""

    async def scenario() -> collections.Counter[str]:
        stop = asyncio.Event()
        running = asyncio.ensure_future(load(catalog, tokens, stop))
        try:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(steps)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
        return await running

    outcomes = asyncio.run(scenario())
    assert set(outcomes) == {"ok"}, f"failed requests: {outcomes}"
    assert outcomes["ok"] > 100
