"""Who is calling an HTTP door: the bearer token (or API key) and the purpose-of-use headers, as FastAPI
dependencies. Tokens are checked by the core (gateway/core/identity.py); this module reads HTTP."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.core import access, access_audit
from gateway.core.context import Gateway
from gateway.core.identity import AuthError, AuthUnavailable, Subject, TokenVerifier
from gateway.core.refusals import Kind, Refused
from gateway.http.errors import DoorError, challenge, http_error

log = logging.getLogger(__name__)

PURPOSE_HEADER = "x-purpose-of-use"
BREAK_GLASS_HEADER = "x-break-glass"


def gateway_of(request: Request) -> Gateway:
    """The running gateway, as every route reaches it."""
    gw: Gateway = request.app.state.gw
    return gw


def what(request: Request) -> str:
    """The request as audit records name it."""
    return f"{request.method} {request.url.path}"


def verifier_for(app_state: Any, settings: Any) -> TokenVerifier:
    """The app's token verifier, made once per settings (keys loaded and cached once)."""
    verifier = getattr(app_state, "clinphoto_token_verifier", None)
    if verifier is None or verifier.settings is not settings or verifier.auth is not settings.auth:
        verifier = TokenVerifier(settings)
        app_state.clinphoto_token_verifier = verifier
    return verifier


def authenticate(request: Request) -> Subject:
    """The token's subject, or 401 with WWW-Authenticate (RFC 6750); every failure is audited."""
    gw = gateway_of(request)
    settings = gw.settings
    realm = settings.auth.realm
    address = request.client.host if request.client else None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if settings.auth.mode == "api-key":
        key = token if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
        sub = settings.api_keys.get(key or "")
        if not sub:
            access_audit.record_auth_failure(gw, network=address, reason="an unknown API key" if key else "no API key",
                                             what=what(request))
            raise HTTPException(401, "a valid API key is required", headers=challenge(realm, "invalid_token" if key else None))
        return Subject(sub=sub, role="medical-illustration", scopes=("user/*.cruds",), network_address=address)
    if scheme.lower() != "bearer" or not token:
        # every refusal is on the trail, a request without any token too (one record per request)
        access_audit.record_auth_failure(gw, network=address, reason="no bearer token", what=what(request))
        raise HTTPException(401, "a bearer token is required (Authorization: Bearer <JWT>)", headers=challenge(realm))
    try:
        return verifier_for(request.app.state, settings).verify(token, address)
    except AuthUnavailable as exc:
        log.error("cannot check bearer tokens: %s", exc)
        raise DoorError(503, f"authentication is unavailable: {exc}", code=Kind.AUTH_UNAVAILABLE.value) from None
    except AuthError as exc:
        access_audit.record_auth_failure(gw, network=address, reason=str(exc), what=what(request))
        raise HTTPException(401, str(exc), headers=challenge(realm, "invalid_token", str(exc))) from None


def with_request_purpose(subject: Subject, request: Request) -> Subject:
    """The subject with the purpose of use and break-glass reason the request's headers carry."""
    purpose = request.headers.get(PURPOSE_HEADER)
    reason = request.headers.get(BREAK_GLASS_HEADER)
    changes: dict[str, str] = {}
    if purpose is not None and purpose.strip():
        changes["purpose_of_use"] = purpose.strip().upper()
    if reason is not None:
        changes["break_glass_reason"] = reason.strip() or ""
    return replace(subject, **changes) if changes else subject  # type: ignore[arg-type]


# Declares the bearer scheme in the OpenAPI document (the docs' Authorize button); checking is ours.
_bearer_scheme = HTTPBearer(auto_error=False, bearerFormat="JWT", description="OAuth2 access token (JWT, RS256/ES256); dev mode: `clinphoto token`")


PurposeHeader = Annotated[str | None, Header(
    alias="X-Purpose-Of-Use", description="Why the caller asks: TREAT (default), ETREAT (break-glass, with X-Break-Glass), "
    "TRAIN, HRESCH or PUBLISH. TREAT needs record-level consent, TRAIN/HRESCH teaching, PUBLISH publication.")]
BreakGlassHeader = Annotated[str | None, Header(
    alias="X-Break-Glass", description="With X-Purpose-Of-Use: ETREAT, the reason for an emergency override of the "
    "specialty rule and restricted (R) photos; audited as a security alert.")]


def require_subject(request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)] = None,
                    _purpose: PurposeHeader = None, _break_glass: BreakGlassHeader = None) -> Subject:
    """FastAPI dependency: the authenticated caller with the request's purpose of use and break-glass reason;
    a malformed purpose or a break-glass the caller may not use is refused here (audited by the core)."""
    subject = with_request_purpose(authenticate(request), request)
    gw = gateway_of(request)
    try:
        access.screen(gw, subject, what(request))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None
    return subject
