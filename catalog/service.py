"""The reference Media Catalog service: a small HTTP API whose database URL, JWT key and TMDB
key all come from the broker, kept current by a WatchSecrets stream (no restart on rotation or
rollback).

    GET  /healthz   200 when every secret has a value (the process is alive and configured)
    GET  /media     the catalog
    POST /media     add an item; needs "Authorization: Bearer <JWT>" (python -m catalog token)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from catalog.auth import InvalidToken, TokenAuthority, WeakSigningKey
from catalog.config import CONFIG_SECRETS, Config, MissingSecretKey
from catalog.database import Cursor, DatabaseUnavailable, DatabaseUrlError, transaction
from secretbroker.client import SecretLookup, SecretUnavailable

log = logging.getLogger(__name__)

KINDS = frozenset({"movie", "series", "episode", "documentary"})
MAX_BODY = 64 * 1024


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class CatalogApp:
    """Request handling, independent of the HTTP server."""

    def __init__(self, secrets: SecretLookup, auth: TokenAuthority) -> None:
        self._secrets = secrets
        self._config = Config(secrets)
        self._auth = auth

    def health(self) -> tuple[HTTPStatus, Any]:
        report = {}
        for name in CONFIG_SECRETS:
            try:
                secret = self._secrets.get_secret(name)
            except SecretUnavailable:
                return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "waiting for secrets"}
            report[name] = {
                "version": secret.version,
                "source": secret.source.value,
                "stale": secret.stale,
            }
        return HTTPStatus.OK, {"status": "ok", "secrets": report}

    def list_media(self) -> tuple[HTTPStatus, Any]:
        with self._database() as (cursor, _):
            cursor.execute("SELECT id, title, kind, year, created_by FROM media ORDER BY id")
            rows = cursor.fetchall()
        keys = ("id", "title", "kind", "year", "created_by")
        return HTTPStatus.OK, {"items": [dict(zip(keys, row, strict=True)) for row in rows]}

    def add_media(self, authorization: str | None, body: bytes) -> tuple[HTTPStatus, Any]:
        claims = self._authenticate(authorization)
        item = _media_item(body)
        with self._database() as (cursor, mark):
            cursor.execute(
                f"INSERT INTO media (title, kind, year, created_by) VALUES ({mark}, {mark}, {mark},"  # noqa: S608 - placeholders only
                f" {mark}) RETURNING id",
                (item["title"], item["kind"], item["year"], claims["sub"]),
            )
            (new_id,) = cursor.fetchone()
        return HTTPStatus.CREATED, {"id": new_id, **item, "created_by": claims["sub"]}

    def _authenticate(self, authorization: str | None) -> Mapping[str, Any]:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(
                HTTPStatus.UNAUTHORIZED,
                "a bearer token is required",
                {"WWW-Authenticate": 'Bearer realm="media-catalog"'},
            )
        try:
            return self._auth.verify(token.strip())
        except InvalidToken as exc:
            raise HttpError(
                HTTPStatus.UNAUTHORIZED,
                str(exc),
                {"WWW-Authenticate": 'Bearer realm="media-catalog", error="invalid_token"'},
            ) from None
        except (WeakSigningKey, SecretUnavailable) as exc:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, f"JWT key: {exc}") from None

    @contextmanager
    def _database(self) -> Iterator[tuple[Cursor, str]]:
        try:
            url = self._config.database_url
        except (SecretUnavailable, MissingSecretKey) as exc:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, f"database URL: {exc}") from None
        try:
            with transaction(url) as opened:
                yield opened
        except (DatabaseUrlError, DatabaseUnavailable) as exc:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None


def _media_item(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object") from None
    if not isinstance(document, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    title, kind, year = document.get("title"), document.get("kind", "movie"), document.get("year")
    if not isinstance(title, str) or not 0 < len(title.strip()) <= 300:
        raise HttpError(HTTPStatus.BAD_REQUEST, "title: must be a string of 1 to 300 characters")
    if kind not in KINDS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"kind: must be one of {', '.join(sorted(KINDS))}")
    if year is not None and (
        not isinstance(year, int) or isinstance(year, bool) or not 1870 <= year <= 2200
    ):
        raise HttpError(HTTPStatus.BAD_REQUEST, "year: must be a whole number from 1870 to 2200")
    unknown = sorted(set(document) - {"title", "kind", "year"})
    if unknown:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown field: {unknown[0][:40]!r}")
    return {"title": title.strip(), "kind": kind, "year": year}


def make_server(app: CatalogApp, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "media-catalog"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._answer(app.health)
            elif self.path == "/media":
                self._answer(app.list_media)
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": "no such path"})

        def do_POST(self) -> None:
            if self.path != "/media":
                self._send(HTTPStatus.NOT_FOUND, {"error": "no such path"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            body = self.rfile.read(length)
            self._answer(lambda: app.add_media(self.headers.get("Authorization"), body))

        def _answer(self, handler: Any) -> None:
            try:
                status, document = handler()
            except HttpError as exc:
                self._send(exc.status, {"error": str(exc)}, exc.headers)
            except Exception:
                log.exception("request %s %s failed", self.command, self.path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
            else:
                self._send(status, document)

        def _send(
            self, status: HTTPStatus, document: Any, headers: Mapping[str, str] | None = None
        ) -> None:
            payload = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)  # request line, never headers

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(app: CatalogApp, host: str, port: int, ready: threading.Event | None = None) -> None:
    server = make_server(app, host, port)
    log.info("media catalog listening on http://%s:%d", host, server.server_address[1])
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
