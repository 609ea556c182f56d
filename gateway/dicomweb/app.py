"""The DICOMweb door (PS3.18): QIDO-RS, WADO-RS and STOW-RS on the core, as its own app mounted at /dicomweb.

A door only: requests are parsed into core calls (study_query, access, ingest) and what comes back is rendered;
the policy, the audit and every refusal are the core's. Errors are JSON `{"detail": ...}` with the PS3.18
status; 405 names the methods the path takes in `Allow`. CORS (off unless origins are configured) lets a
browser viewer on another origin call it with its bearer token."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.core.context import Gateway
from gateway.core.refusals import Refused
from gateway.dicomweb import qido, stow, wado
from gateway.dicomweb.common import DicomwebError
from gateway.dicomweb.config import DicomwebSettings
from gateway.http.errors import http_error

log = logging.getLogger("clinphoto.dicomweb")

# headers a browser client sends and may read (the Warning of a paged QIDO answer)
CORS_REQUEST_HEADERS = ["Authorization", "Accept", "Content-Type", "X-Purpose-Of-Use", "X-Break-Glass"]
CORS_EXPOSED_HEADERS = ["Warning", "Content-Type", "Content-Length"]


NOT_FOR_CACHES = "private, no-store"


class NotForCaches:
    """Every answer of this door was decided by the policy for this caller at this moment (a consent withdrawn, a
    sensitivity raised or an access list shortened changes it), so none is for a cache to serve again, without a
    decision or an audit record: `Cache-Control: private, no-store`, as the REST and FHIR doors answer photos. The
    stored thumbnail and rendered image went out as FileResponse with Last-Modified and no Cache-Control at all:
    heuristically fresh for any cache. A route that sets its own Cache-Control keeps it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "cache-control" not in headers:
                    headers["Cache-Control"] = NOT_FOR_CACHES
            await send(message)

        await self.app(scope, receive, sending)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers=headers)


def _leaves(routes: list[Any]) -> Iterator[Any]:
    """The routes themselves, through the routers included (FastAPI keeps each included router as one entry)."""
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            yield from _leaves(inner)
        else:
            yield route


def create_dicomweb_app(gw: Gateway, settings: DicomwebSettings) -> FastAPI:
    app = FastAPI(title="clinphoto DICOMweb", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gw = gw
    app.state.public_url = settings.public_url

    @app.exception_handler(DicomwebError)
    async def refused_here(_request: Request, exc: DicomwebError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        err = http_error(exc, gw.settings.auth.realm)
        return _error(err.status_code, str(err.detail), dict(err.headers or {}))

    @app.exception_handler(HTTPException)
    async def http_exception(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # every route of the path, not only the one Starlette tried (GET and POST /studies are two routes)
            allowed = sorted({m for r in _leaves(app.router.routes) if r.matches(request.scope)[0] != Match.NONE
                              for m in (getattr(r, "methods", None) or ())})
            headers["Allow"] = ", ".join(allowed)
            return _error(405, f"{request.method} is not supported on {request.url.path}; allowed: {headers['Allow']}", headers)
        if exc.status_code == 404 and exc.detail == "Not Found":
            return _error(404, f"{request.url.path}: no such DICOMweb resource here (QIDO-RS, WADO-RS, STOW-RS under /dicomweb)")
        return _error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception) -> JSONResponse:
        log.error("DICOMweb %s %s failed: %s", request.method, request.url.path, type(exc).__name__)
        log.debug("DICOMweb failure", exc_info=True)
        return _error(500, f"the server failed ({type(exc).__name__}); the failure is logged")

    app.include_router(qido.router)
    app.include_router(wado.router)
    app.include_router(stow.router)
    # HEAD wherever GET (RFC 9110 9.3.2): answered, and audited, as the GET is; the server sends no body
    for route in _leaves(app.router.routes):
        if isinstance(route, APIRoute) and route.methods and "GET" in route.methods:
            route.methods.add("HEAD")

    app.add_middleware(NotForCaches)
    origins = settings.cors_origins
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    return app
