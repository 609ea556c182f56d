"""The HTTP app: REST API, FHIR, DICOMweb, the viewer and the console are routers or mounted apps on one FastAPI app."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import DataError

from gateway.api import consents, patients, photos, upload
from gateway.capture.routes import create_router as create_capture_router
from gateway.capture.settings import CaptureSettings
from gateway.console.app import create_console_app
from gateway.console_tools import hl7_tools
from gateway.core.context import Gateway
from gateway.core.identity import AuthUnavailable
from gateway.dicomweb.app import create_dicomweb_app
from gateway.dicomweb.config import DicomwebSettings
from gateway.edge import Edge
from gateway.fhir.app import create_fhir_app
from gateway.http.errors import install_problem_handlers, problem_response
from gateway.http.security import verifier_for
from gateway.viewer.routes import create_router as create_viewer_router
from gateway.viewer.settings import ViewerSettings

log = logging.getLogger(__name__)

BAD_VALUE = "a value in the request cannot be stored or compared (too long, or not valid for its field)"
API_DESCRIPTION = """Clinical photo gateway REST API. Every call needs `Authorization: Bearer <JWT>` (dev mode:
`clinphoto token`). `X-Purpose-Of-Use` (TREAT, ETREAT, TRAIN, HRESCH, PUBLISH) and `X-Break-Glass: <reason>` (with
ETREAT) say why the caller asks; every access, allowed or refused, is audited. Patients are named `system|value`
(aliases `nhs|...`, `mrn|...`); bodies are camelCase; a photo the caller may not see is answered 404, like one that
does not exist. Every refusal is `{"error": code, "message": text, "detail": ..., "field": name}` (see Problem)."""


def create_app(gw: Gateway) -> FastAPI:
    # the docs' Swagger UI and ReDoc assets come from the installed fastapi-offline package: a hospital
    # network reaches no CDN, and the page must make no third-party request
    app = FastAPIOffline(title="clinphoto", version="0.1.0", description=API_DESCRIPTION, docs_url="/api/docs",
                         redoc_url="/api/redoc", openapi_url="/api/openapi.json", static_url="/api/docs/static")
    app.state.gw = gw
    # built now, not on the first call: a bad PEM key stops start-up (one line) instead of 503 on every call
    try:
        verifier_for(app.state, gw.settings)
    except AuthUnavailable as exc:
        raise AuthUnavailable(f"auth: {exc}") from None

    app.add_middleware(Edge)
    # one error body for the REST door (and the viewer's and capture app's JSON); the mounted apps have their own
    install_problem_handlers(app)

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        # the last line of defence behind the checks at the edge: a value the database refused is the
        # caller's bad input (400), not our failure (500); the SQL and its parameters never go out
        log.warning("database refused a value in %s %s: %s", request.method, request.url.path, type(exc.orig).__name__)
        return problem_response(400, "bad-request", BAD_VALUE)

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
    # the point-of-care viewer (IHE IID, launch links) and its page; its settings are the wiring's, not the core's
    app.include_router(create_viewer_router(getattr(gw.settings, "viewer", None) or ViewerSettings(), gw.settings.data_dir))
    # the bedside capture app (its files; it uploads through /api/v1 like any client)
    app.include_router(create_capture_router(getattr(gw.settings, "capture", None) or CaptureSettings()))
    # the EPR door: its own app under /fhir, so every error there is an OperationOutcome
    app.mount("/fhir", create_fhir_app(gw))
    # the integration engineer's console: its own app under /console (its page's CSP, its session cookie)
    app.mount("/console", create_console_app(gw, hl7_tools(getattr(gw.settings, "hl7", None))))
    # the PACS door (QIDO-RS, WADO-RS, STOW-RS): its own app, so its errors and CORS are its own
    app.mount("/dicomweb", create_dicomweb_app(gw, getattr(gw.settings, "dicomweb", None) or DicomwebSettings()))
    return app
