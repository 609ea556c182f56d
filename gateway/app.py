"""The HTTP app: REST API, FHIR, DICOMweb and the viewer are routers on one FastAPI app."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from gateway.api import consents, photos, upload
from gateway.context import Gateway

log = logging.getLogger(__name__)


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="clinphoto", version="0.1.0", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.gw = gw

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> JSONResponse:
        """The database and the blob store answer."""
        problems = {}
        for name, probe in (("database", gw.db.ping), ("blobs", gw.blobs.ping)):
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
    return app
