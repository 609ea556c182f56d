"""SMART on FHIR EHR launch for the viewer (SMART App Launch 2.x): the EHR opens /viewer/smart/launch with `iss`
(its FHIR server, which must be one the settings allow) and `launch`; the viewer discovers the authorization
server from `{iss}/.well-known/smart-configuration`, sends the browser there (authorization code, PKCE S256, a
state bound to an HttpOnly cookie), and at the callback exchanges the code for an access token, which the gateway
checks as it checks every token; the token response's `patient` is the patient the viewer opens on.

The flow's secrets (state, PKCE verifier) live in a short-lived sealed cookie, SameSite=Lax: the callback is a
top-level navigation from the authorization server, which a Strict cookie would not follow."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx

from gateway.http import sealed

COOKIE = "clinphoto_smart"
PATH = "/viewer/smart"
FLOW_SECONDS = 600  # the user has ten minutes to sign in at the authorization server


class SmartError(Exception):
    """A launch that cannot go on; the message says why (safe to show)."""


@dataclass(frozen=True)
class Flow:
    state: str
    verifier: str
    iss: str
    token_endpoint: str
    expires: float


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def seal(key: bytes, flow: Flow) -> str:
    return sealed.seal(key, "smart-flow", dict(flow.__dict__))


def unseal(key: bytes, value: str | None) -> Flow | None:
    raw = sealed.unseal(key, "smart-flow", value)
    flow = Flow(**raw) if raw is not None else None
    return flow if flow is not None and flow.expires > time.time() else None


def discover(iss: str) -> dict[str, str]:
    """The authorization and token endpoints the FHIR server `iss` advertises."""
    try:
        answer = httpx.get(f"{iss.rstrip('/')}/.well-known/smart-configuration", timeout=10, follow_redirects=False)
        config = answer.json() if answer.status_code == 200 else {}
    except (httpx.HTTPError, ValueError) as exc:
        raise SmartError(f"the FHIR server's SMART configuration could not be read ({type(exc).__name__})") from None
    if not isinstance(config, dict) or not config.get("authorization_endpoint") or not config.get("token_endpoint"):
        raise SmartError("the FHIR server does not advertise SMART authorization and token endpoints")
    return {"authorization_endpoint": str(config["authorization_endpoint"]), "token_endpoint": str(config["token_endpoint"])}


def start(iss: str, launch: str, client_id: str, scope: str, redirect_uri: str) -> tuple[str, Flow]:
    """Where to send the browser, and the flow to keep in the cookie."""
    endpoints = discover(iss)
    flow = Flow(state=secrets.token_urlsafe(24), verifier=secrets.token_urlsafe(48), iss=iss,
                token_endpoint=endpoints["token_endpoint"], expires=time.time() + FLOW_SECONDS)
    challenge = _b64(hashlib.sha256(flow.verifier.encode()).digest())
    query = urlencode({"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope,
                       "state": flow.state, "aud": iss, "launch": launch, "code_challenge": challenge,
                       "code_challenge_method": "S256"})
    return f"{endpoints['authorization_endpoint']}?{query}", flow


def exchange(flow: Flow, code: str, client_id: str, redirect_uri: str) -> dict[str, object]:
    """The token response for the code (access_token, and the launch's `patient`)."""
    try:
        answer = httpx.post(flow.token_endpoint, data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                                                       "client_id": client_id, "code_verifier": flow.verifier}, timeout=15)
        body = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise SmartError(f"the authorization server did not answer the token request ({type(exc).__name__})") from None
    if answer.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
        why = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
        raise SmartError(f"the authorization server refused the code: {why or answer.status_code}")
    return body
