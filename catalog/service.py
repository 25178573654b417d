"""The reference Media Catalog service: FastAPI on uvicorn. Its database URL, JWT key and TMDB
key all come from the broker through an AsyncLiveSecrets, kept current by a WatchSecrets
stream: no restart on rotation or rollback, and no request waits for the broker.

    GET  /healthz        200 when every secret has a value (the process is alive and configured)
    GET  /media          the catalog
    POST /media          add an item; needs "Authorization: Bearer <JWT>" (python -m catalog token)
    GET  /openapi.json   the API, described (and /docs)

The wiring is the recipe to copy: ``lifespan`` opens the broker client, the live view and the
database (a pool that follows ``database_url``) and closes them; ``Depends`` gives each request
its Config, its token check and a database connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catalog.auth import DEFAULT_GRACE, InvalidToken, TokenAuthority, WeakSigningKey
from catalog.config import (
    CONFIG_PROPERTIES,
    CONFIG_SECRETS,
    DATABASE_URL,
    Config,
    MissingSecretKey,
)
from catalog.database import Connection, DatabaseUnavailable, DatabaseUrlError
from catalog.followed_database import FollowedDatabase
from catalog.models import Health, Media, MediaIn, MediaList, Problem, SecretStatus
from secretbroker.client import (
    AsyncLiveSecrets,
    AsyncSecretsClient,
    BrokerClientConfig,
    SecretBrokerError,
    SecretChange,
    SecretLookup,
)

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
READY_TIMEOUT = 30.0
"""Seconds the service waits at start for every secret (then it does not start)."""
_BEARER = 'Bearer realm="media-catalog"'


@dataclass(frozen=True)
class Catalog:
    """What requests use, opened by the lifespan."""

    secrets: SecretLookup
    config: Config
    auth: TokenAuthority
    database: FollowedDatabase


Resources = Callable[[], AbstractAsyncContextManager[Catalog]]


def from_broker(client_config: BrokerClientConfig, grace: float = DEFAULT_GRACE) -> Resources:
    """The catalog's resources, read through the broker (what ``python -m catalog serve`` runs)."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[Catalog]:
        async with (
            AsyncSecretsClient(client_config) as client,
            AsyncLiveSecrets(client, CONFIG_SECRETS) as live,
        ):
            await live.wait_ready(READY_TIMEOUT)
            config = Config(live)
            async with following_database(config, live) as database:
                yield Catalog(
                    live, config, TokenAuthority(live.get_secret, client, grace), database
                )

    return opened


class ChangeSource(Protocol):
    """What tells of changed secrets: an AsyncLiveSecrets."""

    def on_change(self, listener: Callable[[SecretChange], None]) -> Callable[[], None]: ...


@asynccontextmanager
async def following_database(config: Config, live: ChangeSource) -> AsyncIterator[FollowedDatabase]:
    """The database at ``config.database_url``, switched over whenever that secret changes."""
    database = FollowedDatabase(lambda: config.database_url)

    def changed(change: SecretChange) -> None:
        if change.name == DATABASE_URL.name:
            database.url_changed()

    stop = live.on_change(changed)
    await database.start()
    try:
        yield database
    finally:
        stop()
        await database.aclose()


def create_app(resources: Resources) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with resources() as catalog:
            app.state.catalog = catalog
            yield

    app = FastAPI(
        title="Media Catalog",
        version="0.1.0",
        lifespan=lifespan,
        responses={
            503: {"model": Problem, "description": "a secret or the database is unavailable"}
        },
    )
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    app.exception_handler(HTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_invalid)
    for unavailable in UNAVAILABLE:
        app.exception_handler(unavailable)(_unavailable)
    app.include_router(router)
    return app


# Dependencies: async, so they run on the event loop (a plain def would go to a thread pool).


async def catalog_of(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


CatalogDep = Annotated[Catalog, Depends(catalog_of)]


async def config_of(catalog: CatalogDep) -> Config:
    return catalog.config


ConfigDep = Annotated[Config, Depends(config_of)]


async def token_claims(
    catalog: CatalogDep, authorization: Annotated[str | None, Header()] = None
) -> Mapping[str, Any]:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": _BEARER})
    try:
        return await catalog.auth.verify(token.strip())
    except InvalidToken as exc:
        raise HTTPException(
            401, str(exc), {"WWW-Authenticate": f'{_BEARER}, error="invalid_token"'}
        ) from None


async def connection(catalog: CatalogDep) -> AsyncIterator[Connection]:
    """One unit of work on the database in use now, committed before the answer is sent."""
    async with catalog.database.connection() as opened:
        yield opened


ConnectionDep = Annotated[Connection, Depends(connection, scope="function")]
ClaimsDep = Annotated[Mapping[str, Any], Depends(token_claims)]
_COLUMNS = ("id", "title", "kind", "year", "created_by")


router = APIRouter()


@router.get("/healthz", response_model=Health)
async def health(catalog: CatalogDep, config: ConfigDep) -> Health | JSONResponse:
    """200 when every Config property has a value (each secret holds its key), with each
    secret's version, source and staleness; 503 naming what is missing otherwise."""
    report = {}
    try:
        for prop in CONFIG_PROPERTIES:
            getattr(config, prop)
        for name in CONFIG_SECRETS:
            secret = catalog.secrets.get_secret(name)
            report[name] = SecretStatus(
                version=secret.version, source=secret.source.value, stale=secret.stale
            )
    except SecretBrokerError:
        return _problem(503, "waiting for secrets")
    except MissingSecretKey as exc:
        return _problem(503, str(exc))
    return Health(status="ok", secrets=report)


@router.get("/media", response_model=MediaList)
async def list_media(database: ConnectionDep) -> MediaList:
    rows = await database.fetch("SELECT id, title, kind, year, created_by FROM media ORDER BY id")
    return MediaList(items=[Media(**dict(zip(_COLUMNS, row, strict=True))) for row in rows])


@router.post("/media", response_model=Media, status_code=201)
async def add_media(item: MediaIn, claims: ClaimsDep, database: ConnectionDep) -> Media:
    mark = database.mark
    ((new_id,),) = await database.fetch(
        f"INSERT INTO media (title, kind, year, created_by) VALUES ({mark}, {mark}, {mark},"  # noqa: S608 - placeholders only
        f" {mark}) RETURNING id",
        (item.title, item.kind, item.year, claims["sub"]),
    )
    return Media(id=new_id, created_by=claims["sub"], **item.model_dump())


def _problem(code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(Problem(error=message).model_dump(), code, dict(headers or {}))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _problem(exc.status_code, str(exc.detail), exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the first field that is wrong, never its value (pydantic's ``input``)."""
    first = exc.errors()[0]
    where = ".".join(str(part)[:40] for part in first["loc"] if part != "body")  # caller's keys
    if first["type"] == "json_invalid" or not where:
        return _problem(400, "body must be a JSON object")
    return _problem(400, f"{where}: {first['msg']}")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A secret or the database cannot be used now: 503, naming what (never a value)."""
    what = "database" if isinstance(exc, DatabaseUnavailable | DatabaseUrlError) else "secret"
    return _problem(503, f"{what}: {exc}")


UNAVAILABLE = (
    DatabaseUnavailable,
    DatabaseUrlError,
    SecretBrokerError,
    MissingSecretKey,
    WeakSigningKey,
)


class BodyLimit:
    """Refuses bodies over ``limit`` bytes with 413: by their Content-Length at once, and by
    counting what arrives when it is absent (chunked). uvicorn refuses a malformed or negative
    Content-Length with 400 before the app is called."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self._limit:
            await _problem(413, "body too large")(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self._limit:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "body too large")
            return message

        await self._app(scope, counted, send)
