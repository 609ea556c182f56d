"""Request headers for a test caller: a dev-mode JWT signed with the gateway's local key."""

from __future__ import annotations

from gateway.core.identity import mint_dev_token


def token_for(gw, role: str = "medical-illustration", sub: str = "test-user", specialties=(), scopes=None,
              patient=None, name=None, purpose_claim=None, minutes=None) -> str:
    return mint_dev_token(
        gw.settings, sub=sub, role=role, name=name, specialties=tuple(specialties),
        scopes=tuple(scopes.split() if isinstance(scopes, str) else scopes) if scopes is not None else None,
        patient=str(patient) if patient is not None else None, purpose=purpose_claim, minutes=minutes,
    )


def auth_headers(gw, role: str = "medical-illustration", sub: str = "test-user", specialties=(), scopes=None,
                 purpose: str | None = None, break_glass: str | None = None, patient=None, name=None) -> dict[str, str]:
    """Authorization (+ X-Purpose-Of-Use / X-Break-Glass) headers; scopes default to user/*.cruds."""
    headers = {"Authorization": f"Bearer {token_for(gw, role, sub, specialties, scopes, patient, name)}"}
    if purpose:
        headers["X-Purpose-Of-Use"] = purpose
    if break_glass is not None:
        headers["X-Break-Glass"] = break_glass
    return headers
