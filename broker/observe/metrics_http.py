"""The broker's HTTP listener for Prometheus and probes, on its own port and thread:

/metrics   the broker's registry, Prometheus text format
/healthz   200 while the process is alive: its event loop turns and no background task
           died; else 503 and why (a liveness probe restarts it)
/readyz    200 when ready to serve (broker/observe/health.py), else 503; the reason as text
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from broker.names import quoted
from broker.observe.health import ReadinessReport

log = logging.getLogger(__name__)


class MetricsServer:
    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        readiness: Callable[[], ReadinessReport],
        liveness: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
    ) -> None:
        host, _, port = listen.rpartition(":")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    alive, reason = liveness()
                    status = HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE
                    self._send(status, f"{reason}\n".encode())
                elif self.path == "/readyz":
                    report = readiness()
                    status = HTTPStatus.OK if report.ready else HTTPStatus.SERVICE_UNAVAILABLE
                    self._send(status, f"{report.reason}\n".encode())
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n")

            def _send(
                self, status: HTTPStatus, body: bytes, content_type: str = "text/plain"
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), quoted(format % args, 200))

        self._server = ThreadingHTTPServer((host, int(port)), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http"
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve_forever that never ran
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
