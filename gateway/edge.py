"""What every HTTP request meets first, before any door: one plain ASGI layer.

Plain ASGI, not FastAPI's @app.middleware("http"): each of those wraps the request in a BaseHTTPMiddleware, and
three of them with the FHIR mount measured ~0.5 ms of a 2.2 ms round trip (bench/fhir_search.py's anchor).

Request bodies are bounded here. FastAPI reads a route's whole body into memory before any dependency runs, the
token check included: a 300 MB chunked body to POST /api/v1/consents without a token took the gateway's memory from
148 MB to 1 GB, with a token to 4.5 GB (pydantic's parse). The doors that stream a body to the spool as it comes
(photo upload, STOW-RS) bound it themselves and are let through; every other body is cut off at its limit, as it
arrives (chunked ones too), and answered 413.

Whatever a door answers before it has read its whole body (a 401, 403, 406, 413 or 415 at once, a 400 part way), the
connection ends with the answer when more is left unread than DRAIN_MAX (see there): uvicorn would read the rest and
throw it away on the event loop, and an unauthenticated POST /dicomweb/studies declaring 50 GB was answered 401 and
then sent ~35 GB in 8 s.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.fhir.ingest import MAX_BODY as FHIR_INGEST_MAX_BODY
from gateway.fhir.outcome import FHIR_JSON, operation_outcome
from gateway.http.errors import BodyTooLarge

NUL_IN_URL = "the request URL holds a NUL byte (%00); no identifier or parameter may contain one"
DOCS_PAGES = ("/api/docs", "/api/redoc")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'self'")


# the largest body of a JSON request (a consent, an access grant, a viewer launch, the console's): some kB
MAX_BODY = 1024 * 1024
# a FHIR resource other than a photo (a Consent, or a transaction without photos): room for one that carries a
# document (a scanned consent form) inline as base64
MAX_FHIR_BODY = 8 * 1024 * 1024


def body_limit(method: str, path: str) -> int | None:
    """The most body bytes a request may send; None: its door streams the body to the spool and bounds it itself."""
    if method == "POST" and (path == "/api/v1/photos" or path.startswith("/dicomweb/studies")):
        return None  # upload (ingest.max_bytes x max_files) and STOW-RS (MAX_BODY_FACTOR x ingest.max_bytes)
    if path.startswith("/fhir/"):
        return FHIR_INGEST_MAX_BODY if method == "POST" and path in ("/fhir/", "/fhir/Media") else MAX_FHIR_BODY
    return MAX_BODY


# After an answer sent before the body was read (a 413, a 401), uvicorn reads the rest of the body and throws it away,
# on the event loop the other HTTP doors share (25 GB in 10 s of a declared 100 GB). Past this much left unread, or
# when no length is declared, the connection ends with the answer instead (closing_unread). Not always: a client that
# writes its whole body before it reads (Python's http.client, so requests and urllib3) then meets a reset, not the
# answer (5 of 5 with 16 MiB bodies over a 1 MiB limit).
DRAIN_MAX = 128 * 1024 * 1024


def _too_large(path: str, limit: int) -> JSONResponse:
    text = f"the request body is over {limit // (1024 * 1024)} MiB, the most this endpoint takes"
    if path.startswith("/fhir"):
        return JSONResponse(operation_outcome([("error", "too-long", text)]), 413, media_type=FHIR_JSON)
    return JSONResponse({"error": "too-large", "message": text, "detail": text}, 413)


def closing_unread(scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send]:
    """receive and send for the app, such that an answer begun while more than DRAIN_MAX of the body is unread (or a
    chunked body has not ended) says Connection: close, which makes uvicorn end the connection once it is sent instead
    of reading on. Every door's early answer is covered this way, not a list of paths."""
    headers = dict(scope["headers"])
    declared = headers.get(b"content-length")
    if b"transfer-encoding" not in headers and (declared is None or declared == b"0"):
        return receive, send  # no body (a GET, most requests)
    length = int(declared) if declared is not None and declared.isdigit() and b"transfer-encoding" not in headers else None
    received, ended = 0, False

    async def counting_receive() -> Message:
        nonlocal received, ended
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            ended = not message.get("more_body", False)
        else:
            ended = True  # the client went: nothing more to read
        return message

    async def closing_send(message: Message) -> None:
        if message["type"] == "http.response.start" and not ended and (length is None or length - received > DRAIN_MAX):
            MutableHeaders(scope=message)["Connection"] = "close"
        await send(message)

    return counting_receive, closing_send


class Edge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive, send = closing_unread(scope, receive, send)
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
        elif path.startswith("/dicomweb/") and path.endswith("/") and len(path) > len("/dicomweb/"):
            # /dicomweb/studies/ names the resource /dicomweb/studies does (PS3.18's URLs have no trailing slash) and is
            # answered as it: the app's redirect (307) made a STOW-RS client send its body again, which one that
            # streams it cannot, and cost any client a round trip
            raw = scope.get("raw_path") or b""
            scope = {**scope, "path": path[:-1], "raw_path": raw[:-1] if raw.endswith(b"/") else path[:-1].encode()}
        if path in DOCS_PAGES:
            # Swagger UI and ReDoc come from the gateway; ReDoc's bundle still links its maker's logo on the web:
            # the policy keeps every request of the docs pages on this host
            async def with_csp(message: Message) -> None:
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message)["Content-Security-Policy"] = DOCS_CSP
                await send(message)

            await self.app(scope, receive, with_csp)
            return
        limit = body_limit(scope["method"], scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return
        await self._bounded(scope, receive, send, limit)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """The app, its body cut off at `limit`: a declared longer one is refused before the app runs; one that grows
        past it (chunked, or longer than declared) raises BodyTooLarge in the app's read, whatever the app then sends
        is held back, and the 413 goes instead (closing_unread ends the connection with it when much is left unread)."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(scope["path"], limit)(scope, receive, send)
            return
        received = 0
        cut_off = False
        started = False  # a response of the app's went out (before the cut: it stands)

        async def bounded_receive() -> Message:
            nonlocal received, cut_off
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut_off = True
                    raise BodyTooLarge()
            return message

        async def held_send(message: Message) -> None:
            nonlocal started
            if cut_off and not started:
                return  # the app's answer to a read that failed (a 400 or 500): the 413 goes instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, held_send)
        except Exception:
            if not cut_off or started:
                raise
        if cut_off and not started:
            await _too_large(scope["path"], limit)(scope, receive, send)
