"""The viewer's browser session: an HttpOnly, SameSite=Strict cookie holding who launched the viewer, on which
patient, until when, and any break-glass reason, sealed with an HMAC key of the gateway's own. The user's bearer
token is never kept: it is checked once at launch, and the page never sees it (not in a URL, a log line or the
page's storage)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.core.identity import Subject
from gateway.core.launches import FirstView, subject_from_json, subject_to_json
from store.audit import load_or_create_key

COOKIE = "clinphoto_viewer"
PATH = "/viewer"


@dataclass(frozen=True)
class ViewerSession:
    subject: Subject
    patient_id: int
    first: FirstView
    expires: float  # epoch seconds

    def with_break_glass(self, reason: str) -> ViewerSession:
        return replace(self, subject=replace(self.subject, purpose_of_use="ETREAT", break_glass_reason=reason))


def key_for(data_dir: Path) -> bytes:
    return load_or_create_key(Path(data_dir) / "viewer-session.key")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal(key: bytes, session: ViewerSession) -> str:
    body = json.dumps({"s": subject_to_json(session.subject), "p": session.patient_id, "f": session.first.to_json(),
                       "e": session.expires}, separators=(",", ":")).encode()
    return f"{_b64(body)}.{_b64(hmac.new(key, body, hashlib.sha256).digest())}"


def unseal(key: bytes, value: str | None) -> ViewerSession | None:
    """The session a cookie holds, None when absent, tampered with or expired."""
    if not value or "." not in value:
        return None
    body_text, _, mac_text = value.partition(".")
    try:
        body, mac = _unb64(body_text), _unb64(mac_text)
    except ValueError:
        return None
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        return None
    raw = json.loads(body)
    if float(raw["e"]) <= time.time():
        return None
    return ViewerSession(subject_from_json(raw["s"]), int(raw["p"]), FirstView.from_json(raw["f"]), float(raw["e"]))
