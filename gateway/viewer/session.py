"""The viewer's browser session: an HttpOnly, SameSite=Strict cookie holding who launched the viewer, on which
patient, until when, and any break-glass reason, sealed (gateway/http/sealed.py) with the gateway's session key.
The user's bearer token is never kept: it is checked once at launch, and the page never sees it (not in a URL, a
log line or the page's storage)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.core.identity import Subject
from gateway.core.launches import FirstView, subject_from_json, subject_to_json
from gateway.http import sealed
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
    """The gateway's one session key (gateway/http/session.py: DATA_DIR/session.key); the viewer's values carry
    their own purposes, so no other door's cookie passes for them."""
    return load_or_create_key(Path(data_dir) / "session.key")


def seal(key: bytes, session: ViewerSession) -> str:
    return sealed.seal(key, "viewer-session", {"s": subject_to_json(session.subject), "p": session.patient_id,
                                               "f": session.first.to_json(), "e": session.expires})


def unseal(key: bytes, value: str | None) -> ViewerSession | None:
    """The session a cookie holds, None when absent, tampered with or expired."""
    raw = sealed.unseal(key, "viewer-session", value)
    if raw is None or float(raw["e"]) <= time.time():
        return None
    return ViewerSession(subject_from_json(raw["s"]), int(raw["p"]), FirstView.from_json(raw["f"]), float(raw["e"]))
