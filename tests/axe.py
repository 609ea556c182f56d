"""axe-core (npm, package.json: installed by `npm ci`, never copied into the repository) run in a page under test.

The page's own Content-Security-Policy allows no inline script, so axe is evaluated through the DevTools protocol
(Playwright's evaluate), which the policy does not govern; the page itself still loads nothing but its own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"


def violations(page: Any, impacts: tuple[str, ...] = ("serious", "critical")) -> list[dict]:
    """axe-core's violations of the page as it stands, of the given impacts (WCAG 2.x A and AA rules, best practice)."""
    if not AXE.exists():
        message = "axe-core is not installed: run `npm ci` (make test does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    page.evaluate(AXE.read_text() + "\n;0")
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ["violations"]});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.map(n => n.target.join(" ")).slice(0, 5)}));
    }""")
    return [v for v in result if v["impact"] in impacts]
