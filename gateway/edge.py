"""What every HTTP request meets first, before any door: one plain ASGI layer.

Plain ASGI, not FastAPI's @app.middleware("http"): each of those wraps the request in a BaseHTTPMiddleware, and
three of them with the FHIR mount measured ~0.5 ms of a 2.2 ms round trip (bench/fhir_search.py's anchor)."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.fhir.outcome import FHIR_JSON, operation_outcome

NUL_IN_URL = "the request URL holds a NUL byte (%00); no identifier or parameter may contain one"
DOCS_PAGES = ("/api/docs", "/api/redoc")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'self'")


class Edge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        # PostgreSQL text cannot hold NUL: refused here for every door, with a message that says so
        if "\x00" in path or b"\x00" in unquote_to_bytes(scope.get("query_string", b"").decode("latin-1")):
            if path.startswith("/fhir"):
                refusal = JSONResponse(operation_outcome([("error", "invalid", NUL_IN_URL)]), 400, media_type=FHIR_JSON)
            else:
                refusal = JSONResponse({"error": "bad-request", "message": NUL_IN_URL, "detail": NUL_IN_URL}, 400)
            await refusal(scope, receive, send)
            return
        if path == "/fhir":
            # FHIR clients post transactions to the base URL itself, which the mounted FHIR app sees as /fhir/
            scope = {**scope, "path": "/fhir/", "raw_path": b"/fhir/"}
        if path in DOCS_PAGES:
            # Swagger UI and ReDoc come from the gateway; ReDoc's bundle still links its maker's logo on the web:
            # the policy keeps every request of the docs pages on this host
            async def with_csp(message: Message) -> None:
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message)["Content-Security-Policy"] = DOCS_CSP
                await send(message)

            await self.app(scope, receive, with_csp)
            return
        await self.app(scope, receive, send)
