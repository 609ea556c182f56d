"""The one table from the core's refusal kinds to HTTP statuses, for every HTTP door."""

from __future__ import annotations

from fastapi import HTTPException

from gateway.core.refusals import Kind, Refused

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
    return HTTPException(STATUS[refused.kind], refused.reason, headers=headers)
