"""Values an HTTP door hands the browser to keep and give back (a session cookie, a SMART launch's state): JSON,
readable by the browser but sealed with an HMAC-SHA256 under the gateway's session key, so a changed value is
refused. `purpose` keeps one kind of value (or one door's) from passing as another."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: str, body: bytes) -> bytes:
    return hmac.new(key, purpose.encode() + b"|" + body, hashlib.sha256).digest()


def sign(key: bytes, purpose: str, text: str) -> str:
    """A keyed hash of `text` for `purpose` (e.g. a CSRF token bound to a session id)."""
    return _b64(_mac(key, purpose, text.encode()))


def seal(key: bytes, purpose: str, payload: dict[str, Any]) -> str:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return f"{_b64(body)}.{_b64(_mac(key, purpose, body))}"


def unseal(key: bytes, purpose: str, value: str | None) -> dict[str, Any] | None:
    """The payload, or None when the value is absent, malformed or was changed."""
    if not value or "." not in value:
        return None
    body_text, _, mac_text = value.partition(".")
    try:
        body, mac = _unb64(body_text), _unb64(mac_text)
    except ValueError:
        return None
    if not hmac.compare_digest(mac, _mac(key, purpose, body)):
        return None
    payload = json.loads(body)
    return payload if isinstance(payload, dict) else None
