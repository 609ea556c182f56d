"""Who is calling. (API-key version; the governance issue replaces the insides with JWTs.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException, Request


@dataclass(frozen=True)
class Subject:
    sub: str
    role: str
    name: str | None = None
    specialties: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    patient: str | None = None
    purpose_of_use: str = "TREAT"
    break_glass_reason: str | None = None
    network_address: str | None = None
    extra: dict = field(default_factory=dict)


def require_subject(request: Request) -> Subject:
    gw = request.app.state.gw
    header = request.headers.get("authorization", "")
    key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else request.headers.get("x-api-key")
    sub = gw.settings.api_keys.get(key or "")
    if not sub:
        raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": 'Bearer realm="clinphoto"'})
    return Subject(sub=sub, role="medical-illustration", network_address=request.client.host if request.client else None)
