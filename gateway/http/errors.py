"""The one table from the core's refusal kinds to HTTP statuses, for every HTTP door, and the one error body of the
REST door (and the viewer's and capture app's JSON on the same app): `{"error": code, "message": sentence,
"detail": ..., "field": name}`.

`error` is a stable code (the core's refusal kind, the upload's codes, or one for the status), `message` a sentence
for people, `field` the parameter or metadata key it is about (when one is). `detail` is what FastAPI's own bodies
held, kept for the clients that read it (the viewer's and capture app's pages): the message, or for a malformed
request FastAPI's list of field errors. FHIR (OperationOutcome), DICOMweb and the console are apps of their own,
with their own error bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.core.refusals import Kind, Refused


class BodyTooLarge(Exception):
    """Raised to a door reading a request body past its limit: the edge (gateway/edge.py) answers 413 in its place."""

STATUS = {
    Kind.NOT_AUTHENTICATED: 401,
    Kind.AUTH_UNAVAILABLE: 503,
    Kind.BAD_REQUEST: 400,
    Kind.FORBIDDEN: 403,
    Kind.INSUFFICIENT_SCOPE: 403,
    Kind.NOT_FOUND: 404,
    Kind.GONE: 410,
    Kind.CONFLICT: 409,
    Kind.INVALID: 400,
}


# the code of an error raised with a status only (routing's 404 and 405, a route's own HTTPException)
STATUS_CODES = {
    400: "bad-request", 401: Kind.NOT_AUTHENTICATED.value, 403: Kind.FORBIDDEN.value, 404: Kind.NOT_FOUND.value,
    405: "method-not-allowed", 409: Kind.CONFLICT.value, 410: Kind.GONE.value, 413: "too-large",
    415: "unsupported-media-type", 422: Kind.INVALID.value, 500: "internal-error", 503: "unavailable",
}


class DoorError(HTTPException):
    """An HTTPException with the error body's code and field."""

    def __init__(self, status: int, message: str, *, code: str | None = None, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers=headers)
        self.code, self.field = code, field


def problem(code: str, message: str, *, detail: Any = None, **extra: Any) -> dict[str, Any]:
    """The error body; `extra` keys that are None are left out."""
    body: dict[str, Any] = {"error": code, "message": message, "detail": message if detail is None else detail}
    body.update({key: value for key, value in extra.items() if value is not None})
    return body


def problem_response(status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None,
                     detail: Any = None, **extra: Any) -> JSONResponse:
    return JSONResponse(problem(code, message, detail=detail, **extra), status_code=status, headers=headers)


async def _http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304):  # no body allowed (as Starlette's own handler)
        return Response(status_code=exc.status_code, headers=exc.headers)
    code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, f"http-{exc.status_code}")
    return problem_response(exc.status_code, code, str(exc.detail), headers=exc.headers, field=getattr(exc, "field", None))


async def _validation_error(_request: Request, exc: Exception) -> Response:
    """FastAPI's malformed-request answer (422), its list of field errors kept as `detail`."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    named = [(".".join(str(part) for part in e.get("loc", ())[1:]) or "request", str(e.get("msg", "invalid")))
             for e in errors[:3]]
    message = "; ".join(f"{name}: {msg}" for name, msg in named) or "the request is malformed"
    if len(errors) > 3:
        message += f" (and {len(errors) - 3} more)"
    field = named[0][0] if named and named[0][0] != "request" else None
    return problem_response(422, Kind.INVALID.value, message, detail=jsonable_encoder(errors), field=field)


def install_problem_handlers(app: FastAPI) -> None:
    """Every HTTPException and malformed request on `app` answers with the one error body."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)


def challenge(realm: str, error: str | None = None, description: str | None = None) -> dict[str, str]:
    """WWW-Authenticate for a bearer-token refusal (RFC 6750)."""
    value = f'Bearer realm="{realm}"'
    if error:
        value += f', error="{error}"'
    if description:
        value += ', error_description="' + description.replace('"', "'") + '"'
    return {"WWW-Authenticate": value}


def http_error(refused: Refused, realm: str = "clinphoto") -> HTTPException:
    """The HTTPException a refusal answers as (with its challenge where RFC 6750 wants one)."""
    headers = None
    if refused.kind == Kind.INSUFFICIENT_SCOPE:
        headers = challenge(realm, "insufficient_scope", f"needs a scope granting {refused.needs}" if refused.needs else None)
    elif refused.kind == Kind.NOT_AUTHENTICATED:
        headers = challenge(realm)
    return DoorError(STATUS[refused.kind], refused.reason, code=refused.kind.value, headers=headers)
