"""The Starlette application: lifespan, error handlers, the routes, the OpenAPI document and docs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import swagger_ui
from eventsourcing import persistence
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from api import openapi
from api.endpoints import Services
from api.errors import ApiError, domain_error_response, error_response
from api.limits import BodySizeLimit
from api.observability import RequestObserver
from api.querycache import KeptAnswers
from api.readyourwrites import PositionWatcher, SharedPosition
from api.routes import path_variants, starlette_routes
from infra.config import Settings
from infra.logs import configure_logging
from infra.postgres import build_ledger
from ledger.domain import DomainError
from ledger.ports import Clock
from projections.projector import events_table

log = logging.getLogger(__name__)

SWAGGER_STATIC = Path(swagger_ui.__file__).parent / "static"

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Credit approval ledger: API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def domain_error(request: Request, exc: Exception) -> Response:
    """A command the domain refused (unknown customer, closed loan, ...): see api.errors.DOMAIN_ERRORS."""
    assert isinstance(exc, DomainError)
    return domain_error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"No endpoint at {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        message.get(exc.status_code, str(exc.detail)),
        headers=dict(exc.headers or {}),
    )


async def database_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable: %s", exc)
    return error_response(
        503, "database_unavailable", "The database is unavailable; try again shortly", headers={"Retry-After": "1"}
    )


# What the access log and the metrics count for a request whose client left before its body
# arrived (nginx's number for it): nothing is answered, and nothing went wrong on this side.
CLIENT_GONE = 499


async def client_gone(request: Request, exc: Exception) -> Response:
    log.info("the client went away before its request's body arrived: %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_GONE)


async def unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "An unexpected error occurred")


async def openapi_json(request: Request) -> Response:
    return Response(openapi.encoded(), media_type="application/json")


async def docs(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE)


class WholeFiles:
    """The docs' files, served whole: a `Range` header is dropped. Starlette answers a bad one in
    plain text (a 400 or 416), where every other error here is JSON, and a page's scripts and
    styles have no use for parts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]}
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ledger, sync_pool = build_ledger(settings, pool_size=settings.db_pool_size)
        if clock is not None:
            ledger.clock = clock
        pool = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=settings.db_pool_size,
            open=False,
            # Queries only read: no transaction to begin and commit around each one.
            kwargs={"connect_timeout": 5, "autocommit": True},
            timeout=5,
        )
        await pool.open(wait=False)

        async def refresh_pools() -> None:
            await pool.check()
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # psycopg_pool's check() catches a CancelledError
                raise asyncio.CancelledError
            await run_in_threadpool(sync_pool.check)
            await run_in_threadpool(ledger.recorder.datastore.pool.check)  # type: ignore[attr-defined]

        answers = KeptAnswers(settings.query_cache_size)
        shared = SharedPosition(settings.api_position_file)
        watcher = PositionWatcher(
            settings.database_url,
            on_reconnect=refresh_pools,
            on_change=answers.changed,
            shared=shared,
            events_table=events_table(ledger),
        )
        answers.trusted = watcher.current
        await watcher.start()
        app.state.services = Services(settings, ledger, pool, sync_pool, watcher, answers)
        try:
            yield
        finally:
            try:
                await watcher.stop()
                shared.close()
                await pool.close()
            finally:
                # A command whose caller was cancelled may still be running: it ends before the
                # pools it writes through close.
                await asyncio.to_thread(app.state.services.commands.shutdown)
                sync_pool.close()
                ledger.close()

    routes = [
        *starlette_routes(),
        # Served as every path is, also with a trailing slash and under /api (they were not under /api).
        *(Route(path, openapi_json, methods=["GET"]) for path in path_variants("/openapi.json")),
        *(Route(path, docs, methods=["GET"]) for path in path_variants("/docs")),
        Mount("/docs/static", WholeFiles(StaticFiles(directory=SWAGGER_STATIC)), name="docs-static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(RequestObserver), Middleware(BodySizeLimit)],
        exception_handlers={
            ApiError: api_error,
            DomainError: domain_error,
            HTTPException: http_error,
            psycopg.OperationalError: database_unavailable,
            PoolTimeout: database_unavailable,
            persistence.OperationalError: database_unavailable,
            persistence.InterfaceError: database_unavailable,
            ClientDisconnect: client_gone,
            Exception: unexpected,
        },
    )
    # Every path's slash variants are routes of their own; anything else (`/view-loan/1//`) is a
    # 404, not the router's bare 307 to a Location built from the request's Host header.
    app.router.redirect_slashes = False
    return app


def app_from_env() -> Starlette:
    """For uvicorn: `ledger api` serves it with uvloop and `api.server.JsonErrorsProtocol` (plain
    `uvicorn api.app:app_from_env --factory` works too, but answers unparsable requests in text)."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)
