"""What every FHIR route shares: the caller, the answer's media type, the server's base URL."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from gateway.core import access
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.refusals import Refused
from gateway.fhir.outcome import FHIR_JSON, FhirError
from gateway.fhir.params import Query, query_of
from gateway.http.security import authenticate, with_request_purpose


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def base_url(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}{request.scope.get('root_path', '')}".rstrip("/")


def gateway_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gw
    return gw


def caller(request: Request) -> Subject:
    """The authenticated subject with the request's purpose of use; refusals as OperationOutcome (audited)."""
    try:
        subject = with_request_purpose(authenticate(request), request)
    except HTTPException as exc:
        raise FhirError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})) from None
    try:
        access.screen(gateway_of(request), subject, f"{request.method} {request.url.path}")
    except Refused as refused:
        raise FhirError.of(refused) from None
    return subject


Caller = Annotated[Subject, Depends(caller)]


def query(request: Request) -> Query:
    return query_of(list(request.query_params.multi_items()), request.headers.get("prefer"))


def what(request: Request) -> str:
    return f"{request.method} {request.url.path}?{request.url.query}" if request.url.query else f"{request.method} {request.url.path}"


