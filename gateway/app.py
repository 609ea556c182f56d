"""The HTTP app: REST API, FHIR, DICOMweb and the viewer are routers on one FastAPI app."""

from __future__ import annotations

import logging
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

from gateway.api import consents, patients, photos, upload
from gateway.api.security import verifier_for
from gateway.core.context import Gateway
from gateway.core.identity import AuthUnavailable

log = logging.getLogger(__name__)

NUL_IN_URL = "the request URL holds a NUL byte (%00); no identifier or parameter may contain one"
BAD_VALUE = "a value in the request cannot be stored or compared (too long, or not valid for its field)"


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="clinphoto", version="0.1.0", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.gw = gw
    # built now, not on the first call: a bad PEM key stops start-up (one line) instead of 503 on every call
    try:
        verifier_for(app.state, gw.settings)
    except AuthUnavailable as exc:
        raise AuthUnavailable(f"auth: {exc}") from None

    @app.middleware("http")
    async def refuse_nul_in_url(request: Request, call_next):
        # PostgreSQL text cannot hold NUL: refused at the edge for every door, with a message that says so
        if "\x00" in request.url.path or b"\x00" in unquote_to_bytes(request.scope.get("query_string", b"").decode("latin-1")):
            return JSONResponse({"detail": NUL_IN_URL}, status_code=400)
        return await call_next(request)

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        # the last line of defence behind the checks at the edge: a value the database refused is the
        # caller's bad input (400), not our failure (500); the SQL and its parameters never go out
        log.warning("database refused a value in %s %s: %s", request.method, request.url.path, type(exc.orig).__name__)
        return JSONResponse({"detail": BAD_VALUE}, status_code=400)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> JSONResponse:
        """The database and the blob store answer, and bearer tokens can be checked."""
        problems = {}
        probes = (("database", gw.db.ping), ("blobs", gw.blobs.ping), ("auth", lambda: verifier_for(app.state, gw.settings).ping()))
        for name, probe in probes:
            try:
                probe()
            except Exception as exc:
                log.warning("readiness probe %s failed: %s", name, exc)
                problems[name] = type(exc).__name__
        if problems:
            return JSONResponse({"status": "unavailable", "failing": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    # -- routers: one line each (keep this marker) --
    app.include_router(upload.router)
    app.include_router(photos.router)
    app.include_router(consents.router)
    app.include_router(patients.router)
    return app
