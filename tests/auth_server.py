"""A real OIDC / OAuth 2.0 authorization server for browser tests (tests/smart_auth_server.mjs: panva's
oidc-provider from npm, run by node), and the gateway's auth settings pointed at it (jwt mode)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.core.policy.settings import AuthSettings
from tests.conftest import require_tool
from tests.net import free_port

AUDIENCE = "https://clinphoto.test"
USER = {"role": "clinician", "name": "Dr Derm", "specialties": ["330"]}


@contextmanager
def authorization_server(gw, folder: Path, *, client_id: str, redirect_uri: str, launches: dict | None = None,
                         scopes: list[str] | None = None, cors_origins: list[str] | None = None) -> Iterator[str]:
    """The provider running on a free port (yields its URL); the gateway checks its tokens while it runs."""
    node = require_tool("node", "nodejs")
    port = free_port()
    provider = f"http://127.0.0.1:{port}"
    config = folder / f"auth-{client_id}.json"
    config.write_text(json.dumps({"client_id": client_id, "redirect_uri": redirect_uri, "audience": AUDIENCE, "user": USER,
                                  "launches": launches or {}, "scopes": scopes or [], "cors_origins": cors_origins or []}))
    server = subprocess.Popen([node, str(Path(__file__).parent / "smart_auth_server.mjs"), str(port), str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "ready" in (server.stdout.readline() if server.stdout else ""), server.stderr.read() if server.stderr else ""
        gw.settings.auth = AuthSettings(mode="jwt", issuer=provider, audience=AUDIENCE, jwks_url=f"{provider}/jwks",
                                        authorization_endpoint=f"{provider}/auth", token_endpoint=f"{provider}/token")
        yield provider
    finally:
        server.terminate()
        server.wait(10)


def sign_in(page, provider: str, user: str, asked_for: str) -> None:
    """The provider's own sign-in and consent pages, as a user goes through them."""
    page.wait_for_url(f"{provider}/**")
    page.locator("input[name=login]").fill(user)
    page.locator("input[name=password]").fill("any")
    page.locator("button[type=submit]").click()
    page.wait_for_selector(f"text={asked_for}")  # the consent page lists what the app asked for
    page.locator("button[type=submit]").click()


def offline(page) -> None:
    """Keep a page's requests on 127.0.0.1 (the provider's development pages ask Google Fonts)."""
    page.route(lambda url: not url.startswith("http://127.0.0.1"), lambda route: route.abort())
