"""The reference catalog service through the whole stack: OpenBao, the broker, the async SDK's
live view, FastAPI on uvicorn and its SQLite database, called over HTTP by an httpx client in
its own process. Each request reads its secrets from memory (Config: database_url on every
database request, the JWT key on every POST); the ``catalog`` section of results.json gives
p50 and p99 per request kind, and what share of a request those reads are."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from bench.rig import Rig
from devstack.harness import die_with_parent, free_port_pair, stop_process, wait_until
from devstack.stack import client_env

REQUESTS: dict[str, tuple[str, str, Any]] = {
    "GET /healthz": ("GET", "/healthz", None),
    "GET /media": ("GET", "/media", None),
    "POST /media": ("POST", "/media", {"title": "Heat", "year": 1995}),
}
"""Health reads the three secrets and no database; the listing reads database_url and the
database; an addition verifies a JWT with the served key, then writes."""
CONFIG_READS = {"GET /healthz": 3, "GET /media": 1, "POST /media": 2}
"""In-memory secret reads per request of each kind."""


@dataclass(frozen=True)
class CatalogService:
    url: str
    token: str

    def worker_args(self, name: str, count: int) -> dict[str, Any]:
        method, path, body = REQUESTS[name]
        return {
            "url": self.url,
            "method": method,
            "path": path,
            "json": body,
            "token": self.token,
            "count": count,
        }


@contextlib.contextmanager
def running_catalog(rig: Rig, broker_addr: str | None = None) -> Iterator[CatalogService]:
    """``python -m catalog serve`` reading through the rig's broker (or the one at
    ``broker_addr``) as the catalog identity."""
    broker = broker_addr or rig.broker_addr
    environ = {**os.environ, **client_env(broker, rig.certs.ca, rig.certs.catalog)}
    url = f"http://127.0.0.1:{free_port_pair()}"
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        die_with_parent([sys.executable, "-m", "catalog", "serve", "--listen", url[7:]]),
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the catalog service exited with code {process.returncode}")
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200

        wait_until(up, 60, "the catalog service", (httpx.HTTPError,), 0.1)
        token = subprocess.run(
            [sys.executable, "-m", "catalog", "token", "--sub", "bench"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        yield CatalogService(url, token)
    finally:
        stop_process(process, timeout=30)
