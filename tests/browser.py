"""Debian's Chromium driven by Playwright for Python (no browser download), for tests that need a real browser.

Chromium is started headless with the flags that keep it off the network on its own (no background
networking, component updates or sync), and every request a page makes is recorded, so a test can say that
nothing left 127.0.0.1. Screenshots go to ARTIFACTS (kept after the run, ignored by git).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import require_tool

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic", "--disable-default-apps"]


class Page:
    """A Playwright page with the URLs of every request it made."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.requests: list[str] = []
        self.blocked: dict[str, str] = {}  # url -> why the browser stopped it before it left (e.g. the page's CSP)
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("requestfailed", lambda request: self.blocked.__setitem__(request.url, request.failure or ""))

    def off_host(self, host: str = "127.0.0.1") -> list[str]:
        """Requests that left for anywhere but `host`: data: and blob: URLs stay in the page, and a request the
        browser refused to send under the page's Content-Security-Policy (failure "csp") never left."""
        return [u for u in self.requests
                if not u.startswith((f"http://{host}:", f"http://{host}/", "data:", "blob:"))
                and self.blocked.get(u) != "csp"]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@contextmanager
def chromium(viewport: tuple[int, int] = (1280, 800), mobile: bool = False, extra_args: tuple[str, ...] = ()) -> Iterator[Page]:
    """`mobile`: a phone as Chromium emulates one (touch, mobile viewport meta honoured); `extra_args`: more Chromium flags."""
    executable = require_tool("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=[*CHROMIUM_FLAGS, *extra_args])
        try:
            options: dict[str, Any] = {"viewport": {"width": viewport[0], "height": viewport[1]}}
            if mobile:
                options.update(is_mobile=True, has_touch=True, device_scale_factor=3)
            context = browser.new_context(**options)
            yield Page(context.new_page())
        finally:
            browser.close()
