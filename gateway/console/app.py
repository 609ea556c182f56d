"""The console at /console: its page and static files, the session it signs in with, and the JSON the page reads.

Who calls: a session cookie (the page; POSTs also carry the session's CSRF token) or a bearer token (scripts);
the core decides whether that role may use the console and audits every view and change."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.console import render
from gateway.console.tools import Hl7Tools
from gateway.core import access_audit, operations
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.operations import MESSAGE_STATUSES, OUTBOX_STATUSES, MessageCriteria
from gateway.core.policy.rules import AccessContext
from gateway.core.refusals import Kind, Refused
from gateway.http.errors import http_error
from gateway.http.security import authenticate, gateway_of, what
from gateway.http.session import SessionCookies, session_key, token_expires
from store import audit

STATIC = Path(__file__).parent / "static"
# the page loads only its own script and style sheet, and talks only to this gateway
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


class _Headers:
    """Every console answer, page or JSON, goes out with the security headers (a plain ASGI layer)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def cookies_of(request: Request) -> SessionCookies:
    cookies: SessionCookies = request.app.state.console_cookies
    return cookies


def caller(request: Request) -> Subject:
    """The bearer token's subject, or the session cookie's; a change asked for under a cookie must carry the
    session's CSRF token. No credentials at all is 401, audited like the bearer doors' refusals."""
    gw, cookies = gateway_of(request), cookies_of(request)
    address = request.client.host if request.client else None
    if request.headers.get("authorization"):
        return authenticate(request)
    session = cookies.read(request)
    if session is None:
        access_audit.record_auth_failure(gw, network=address, reason="no console session", what=what(request))
        raise HTTPException(401, "sign in to the console (no session, or it has ended)")
    subject = session.subject(address)
    if request.method not in ("GET", "HEAD") and not cookies.csrf_ok(request, session):
        ctx = operations.operator(gw, subject, what(request))
        raise access_audit.refuse(gw, ctx, what(request), Refused(Kind.FORBIDDEN, "the request does not carry this "
                                                                  "session's CSRF token"))
    return subject


def console_user(request: Request, subject: Annotated[Subject, Depends(caller)]) -> AccessContext:
    """The caller, if its role may use the console (the core decides, and audits a refusal)."""
    return operations.operator(gateway_of(request), subject, what(request))


User = Annotated[AccessContext, Depends(console_user)]


def create_console_app(gw: Gateway, tools: Hl7Tools) -> ASGIApp:
    app = FastAPI(title="clinphoto console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gw = gw
    cookies = SessionCookies(session_key(gw.settings), name="clinphoto_console", path="/console", audience="console")
    app.state.console_cookies = cookies

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        error = http_error(exc, gw.settings.auth.realm)
        return JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems or "bad request"}, 400)

    # -- the page -----------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- the session --------------------------------------------------------------------------------------

    @app.post("/session")
    def sign_in(request: Request, response: Response) -> dict[str, Any]:
        """Exchange the bearer token (Authorization header, never the URL) for the console's session cookie."""
        subject = authenticate(request)
        ctx = operations.operator(gw, subject, what(request))
        _, _, token = request.headers.get("authorization", "").partition(" ")
        session = cookies.issue(response, request, subject, token_expires(token.strip()))
        operations.record(gw, ctx, "sign-in", what=what(request), action="E", type_code=audit.LOGIN,
                          detail={"expires": session.expires})
        return render.session(session, cookies.csrf_token(session))

    @app.get("/session")
    def who(request: Request, ctx: User) -> dict[str, Any]:
        session = cookies.read(request)
        if session is None:  # a bearer caller: it has no session to show
            raise HTTPException(404, "no console session: this request came with a bearer token")
        return render.session(session, cookies.csrf_token(session))

    @app.post("/session/end")
    def sign_out(request: Request, response: Response, ctx: User) -> dict[str, str]:
        cookies.clear(response)
        operations.record(gw, ctx, "sign-out", what=what(request), action="E", type_code=audit.LOGIN)
        return {"status": "signed out"}

    # -- received HL7 messages ------------------------------------------------------------------------------

    @app.get("/api/messages")
    def list_messages(request: Request, ctx: User,
                      status: Annotated[list[str] | None, Query(description="applied, ignored, error, rejected")] = None,
                      type_: Annotated[str | None, Query(alias="type", max_length=21, pattern=r"^[A-Za-z0-9]{0,10}(\^[A-Za-z0-9_]{0,10})?$")] = None,
                      received_from: Annotated[datetime | None, Query(alias="from")] = None,
                      received_before: Annotated[datetime | None, Query(alias="to")] = None,
                      control_id: Annotated[str | None, Query(alias="controlId", max_length=199)] = None,
                      before: Annotated[int | None, Query(ge=1)] = None,
                      count: Annotated[int, Query(ge=1, le=operations.MAX_PAGE)] = 50) -> dict[str, Any]:
        bad = sorted(set(status or ()) - set(MESSAGE_STATUSES))
        if bad:
            raise HTTPException(400, f"status must be one of {', '.join(MESSAGE_STATUSES)} (not {', '.join(bad)})")
        criteria = MessageCriteria(tuple(status or ()), type_ or None, received_from, received_before, control_id or None)
        page = operations.messages(gw, ctx, criteria, count=count, before_id=before, what=_query(request))
        return render.message_page(page)

    @app.get("/api/messages/{message_id}")
    def read_message(request: Request, ctx: User, message_id: int) -> dict[str, Any]:
        stored = operations.message(gw, ctx, message_id, what=what(request))
        return {**render.stored_message(stored), "mapped": render.bench(tools.bench(gw, stored.raw, False))}

    @app.post("/api/messages/{message_id}/reprocess")
    def reprocess(request: Request, ctx: User, message_id: int) -> dict[str, Any]:
        result = operations.reprocess(gw, ctx, message_id, tools.reapply, what=what(request))
        return {"id": message_id, "previousStatus": result.previous_status, "status": result.status,
                "ackCode": result.ack_code, "error": result.error}

    # -- the mapping bench and the mapping file -------------------------------------------------------------

    @app.post("/api/bench")
    def bench(request: Request, ctx: User,
              message: Annotated[str, Body(embed=True, min_length=1, max_length=1_000_000)],
              database: Annotated[bool, Body(embed=True)] = False) -> dict[str, Any]:
        """A pasted message through the mapping in force (and, with `database`, applied inside a transaction that is
        rolled back): nothing is committed. The message itself is not kept in the audit record (it holds patient data)."""
        raw = message.replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
        result = tools.bench(gw, raw, database)
        operations.record(gw, ctx, "mapping-test", what=what(request), action="E",
                          detail={"database": database, "message": str(result.report.get("message")), "ok": result.ok})
        return render.bench(result)

    @app.get("/api/mapping")
    def mapping(request: Request, ctx: User) -> dict[str, Any]:
        check = tools.mapping()
        operations.record(gw, ctx, "mapping", what=what(request), detail={"valid": check.valid})
        return render.mapping(check)

    # -- DICOM peers and the routing outbox -----------------------------------------------------------------

    @app.get("/api/peers")
    def peers(request: Request, ctx: User) -> dict[str, Any]:
        return render.peers(operations.peers(gw, ctx, what=what(request)), gw.settings.routing)

    @app.get("/api/outbox")
    def outbox(request: Request, ctx: User, status: Annotated[str | None, Query()] = None,
               count: Annotated[int, Query(ge=1, le=operations.MAX_PAGE)] = 50) -> dict[str, Any]:
        if status and status not in OUTBOX_STATUSES:
            raise HTTPException(400, f"status must be one of {', '.join(OUTBOX_STATUSES)}")
        return {"items": [render.outbox_item(i) for i in operations.outbox(gw, ctx, status or None, count=count,
                                                                           what=_query(request))]}

    @app.post("/api/outbox/{item_id}/retry")
    def retry(request: Request, ctx: User, item_id: int) -> dict[str, Any]:
        operations.outbox_change(gw, ctx, item_id, "retry", what=what(request))
        return {"id": item_id, "status": "pending"}

    @app.post("/api/outbox/{item_id}/cancel")
    def cancel(request: Request, ctx: User, item_id: int) -> dict[str, Any]:
        operations.outbox_change(gw, ctx, item_id, "cancel", what=what(request))
        return {"id": item_id, "status": "cancelled"}

    # -- the audit trail and the counters -------------------------------------------------------------------

    @app.get("/api/audit")
    def recent_audit(request: Request, ctx: User, before: Annotated[int | None, Query(ge=1)] = None,
                     count: Annotated[int, Query(ge=1, le=operations.MAX_PAGE)] = 50) -> dict[str, Any]:
        total, views = operations.recent_audit(gw, ctx, count=count, before_seq=before, what=_query(request))
        return render.audit_page(total, views, count)

    @app.get("/api/audit/verify")
    def verify(request: Request, ctx: User) -> dict[str, Any]:
        return render.verify(operations.verify_audit(gw, ctx, what=what(request)))

    @app.get("/api/counters")
    def counters(request: Request, ctx: User, minutes: Annotated[int, Query(ge=1, le=24 * 60)] = 15) -> dict[str, Any]:
        return render.counters(operations.counters(gw, ctx, minutes=minutes, what=what(request)))

    return _Headers(app)


def _query(request: Request) -> str:
    """The request with its query, as the audit record of a search names it (no patient data goes in a console URL)."""
    return f"{request.method} {request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
