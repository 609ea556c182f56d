"""Request headers for a test caller. (API-key version; the governance issue makes it mint JWTs.)"""

from __future__ import annotations

import secrets


def auth_headers(gw, role: str = "medical-illustration", sub: str = "test-user", specialties=(), **_ignored) -> dict[str, str]:
    key = secrets.token_hex(8)
    gw.settings.api_keys[key] = sub
    return {"Authorization": f"Bearer {key}"}
