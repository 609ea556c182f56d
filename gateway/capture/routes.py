"""The capture app's files and the little it needs besides the public APIs.

GET  /capture/                 the app (strict CSP: nothing but this gateway, no inline script)
GET  /capture/{app.js,app.css,sw.js,manifest.webmanifest,icon.svg}
GET  /capture/vendor/zxing.js  the barcode reader (npm @zxing/library, installed by `npm ci`, never copied here)
GET  /capture/options          body sites, views, consent wording (a YAML file integration engineers change)
GET  /capture/auth             how to sign in: dev, or the authorization server's endpoints and our client id (PKCE)
POST /capture/dev-sign-in      dev mode only: a short-lived dev token for a named user (as `clinphoto token` prints)
Photos, patients, consents and earlier photos go through /api/v1 with the user's token, like any client's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.capture.settings import CaptureSettings
from gateway.core.identity import mint_dev_token
from gateway.http.security import gateway_of

HERE = Path(__file__).resolve().parent
FILES = {"app.js": "text/javascript", "app.css": "text/css", "sw.js": "text/javascript",
         "manifest.webmanifest": "application/manifest+json", "icon.svg": "image/svg+xml"}
DEV_TOKEN_MINUTES = 60
ROLES = ("clinician", "medical-illustration")  # who captures photos at the bedside


class DevSignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")
    name: str | None = Field(None, max_length=100)
    role: str = Field("clinician")
    specialty: str | None = Field(None, pattern=r"^\d{3}$")


def create_router(settings: CaptureSettings) -> APIRouter:
    router = APIRouter(tags=["capture"], include_in_schema=False)
    options = yaml.safe_load((settings.options_file or HERE / "options.yaml").read_text(encoding="utf-8"))

    def csp(request: Request) -> str:
        token_origin = ""
        auth = gateway_of(request).settings.auth
        if auth.mode == "jwt" and auth.token_endpoint:
            parts = urlsplit(auth.token_endpoint)
            token_origin = f" {parts.scheme}://{parts.netloc}"  # the PKCE code exchange is the page's own request
        return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                f"connect-src 'self'{token_origin}; manifest-src 'self'; worker-src 'self'; base-uri 'none'; "
                "form-action 'none'; frame-ancestors 'none'")

    @router.get("/capture")
    def root() -> Response:
        return RedirectResponse("/capture/", status_code=308)

    @router.get("/capture/")
    def page(request: Request) -> Response:
        return FileResponse(HERE / "static" / "index.html", media_type="text/html", headers={
            "Content-Security-Policy": csp(request), "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Permissions-Policy": "camera=(self), geolocation=(), microphone=()"})

    @router.get("/capture/options")
    def capture_options() -> JSONResponse:
        return JSONResponse(options, headers={"Cache-Control": "no-cache"})

    @router.get("/capture/auth")
    def how_to_sign_in(request: Request) -> JSONResponse:
        auth = gateway_of(request).settings.auth
        body: dict[str, Any] = {"mode": auth.mode, "idleMinutes": settings.idle_minutes}
        if auth.mode == "jwt":
            body.update(clientId=settings.client_id, scope=settings.scope, authorizationEndpoint=auth.authorization_endpoint,
                        tokenEndpoint=auth.token_endpoint, audience=auth.audience)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @router.post("/capture/dev-sign-in")
    def dev_sign_in(request: Request, body: DevSignIn) -> JSONResponse:
        gw = gateway_of(request)
        if gw.settings.auth.mode != "dev":
            raise HTTPException(404, "dev sign-in exists only in auth mode dev")
        if body.role not in ROLES:
            raise HTTPException(400, f"role must be one of {', '.join(ROLES)}")
        token = mint_dev_token(gw.settings, sub=body.user, role=body.role, name=body.name or body.user,
                               specialties=(body.specialty,) if body.specialty else (), minutes=DEV_TOKEN_MINUTES)
        return JSONResponse({"accessToken": token, "expiresIn": DEV_TOKEN_MINUTES * 60}, headers={"Cache-Control": "no-store"})

    @router.get("/capture/vendor/zxing.js")
    def barcode_reader() -> Response:
        path = settings.vendor_dir / "@zxing" / "library" / "umd" / "index.min.js"
        if not path.is_file():
            raise HTTPException(404, "the barcode reader is not installed (npm ci); type the number instead")
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    @router.get("/capture/{name}")
    def asset(name: str) -> Response:
        if name not in FILES:
            raise HTTPException(404, "no such file")
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if name == "sw.js":
            headers["Service-Worker-Allowed"] = "/capture/"
        return FileResponse(HERE / "static" / name, media_type=FILES[name], headers=headers)

    return router
