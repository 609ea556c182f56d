"""Browser sessions for the HTTP doors' pages (the console, the viewer): a bearer token, checked once, exchanged for
a short-lived signed cookie, so the token never sits in a URL, a log line or the page's storage.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Secure over HTTPS,
scoped to its door's path, and holds the subject the token named, signed with HMAC-SHA256 under a key kept in the
data directory like the audit key (`DATA_DIR/session.key`, made on first use, mode 0600): a page cannot forge or
widen it, and it ends at its expiry or the token's, whichever is first. Each session has a random id; the CSRF token
a page sends back on every state-changing request (header X-CSRF-Token) is a keyed hash of it, so it is bound to
that session and cannot be guessed from another.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jwt
from fastapi import Request, Response

from gateway.core.context import CoreSettings
from gateway.core.identity import Subject
from gateway.http import sealed
from store.audit import load_or_create_key

CSRF_HEADER = "x-csrf-token"


def session_key(settings: CoreSettings) -> bytes:
    """The key that signs every door's session cookies (beside the audit key; back it up or lose the sessions)."""
    return load_or_create_key(Path(settings.data_dir) / "session.key")


@dataclass(frozen=True)
class BrowserSession:
    """Who a session cookie stands for, until when, and its random id (what its CSRF token is bound to)."""

    sub: str
    role: str
    name: str | None
    specialties: tuple[str, ...]
    scopes: tuple[str, ...]
    sid: str
    expires: int  # Unix time

    def subject(self, network_address: str | None) -> Subject:
        return Subject(sub=self.sub, role=self.role, name=self.name, specialties=self.specialties, scopes=self.scopes,
                       network_address=network_address)


def token_expires(token: str) -> int | None:
    """When a token that has just verified ends (its exp), so a session made from it ends no later."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return int(exp) if isinstance(exp, (int, float)) else None


class SessionCookies:
    """One door's session cookie: its name, path and lifetime. `audience` keeps one door's cookie out of another's."""

    def __init__(self, key: bytes, *, name: str, path: str, audience: str, minutes: int = 20) -> None:
        self.key, self.name, self.path, self.audience, self.seconds = key, name, path, audience, minutes * 60

    def _purpose(self, what: str) -> str:
        return f"{self.audience}.{what}"

    def issue(self, response: Response, request: Request, subject: Subject, token_expires: int | None = None) -> BrowserSession:
        """Set the cookie for `subject` on `response`; it ends after `minutes`, or when the token did if sooner."""
        expires = int(time.time()) + self.seconds
        if token_expires is not None:
            expires = min(expires, token_expires)
        session = BrowserSession(subject.sub, subject.role, subject.name, tuple(subject.specialties), tuple(subject.scopes),
                                 secrets.token_urlsafe(18), expires)
        response.set_cookie(self.name, sealed.seal(self.key, self._purpose("cookie"), asdict(session)), max_age=max(expires - int(time.time()), 0),
                            path=self.path, secure=request.url.scheme == "https", httponly=True, samesite="strict")
        return session

    def read(self, request: Request) -> BrowserSession | None:
        """The session the request's cookie stands for, or None (absent, forged, altered or expired)."""
        data = sealed.unseal(self.key, self._purpose("cookie"), request.cookies.get(self.name))
        if data is None:
            return None
        try:
            session = BrowserSession(sub=str(data["sub"]), role=str(data["role"]), name=data.get("name"),
                                     specialties=tuple(data.get("specialties") or ()), scopes=tuple(data.get("scopes") or ()),
                                     sid=str(data["sid"]), expires=int(data["expires"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def clear(self, response: Response) -> None:
        response.delete_cookie(self.name, path=self.path, httponly=True, samesite="strict")

    def csrf_token(self, session: BrowserSession) -> str:
        """The token a page sends back (X-CSRF-Token) with each change it asks for in this session."""
        return sealed.sign(self.key, self._purpose("csrf"), session.sid)

    def csrf_ok(self, request: Request, session: BrowserSession) -> bool:
        """A state-changing request carries this session's CSRF token and, when it says where it comes from, comes
        from this origin (SameSite=Strict already keeps other sites' requests from carrying the cookie)."""
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/") != f"{request.url.scheme}://{request.url.netloc}":
            return False
        sent = request.headers.get(CSRF_HEADER, "")
        return bool(sent) and hmac.compare_digest(sent.encode(), self.csrf_token(session).encode())
