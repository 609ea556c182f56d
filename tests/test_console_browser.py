"""The console in Debian's Chromium, on both backends: an integration engineer signs in (keyboard only), sees the
received messages, opens a failed one, fixes the mapping and reprocesses it, tries a message on the mapping bench,
retries a dead outbox item and checks the audit chain; a clinician is refused. axe-core finds no serious or critical
violation, nothing leaves 127.0.0.1, no photo is asked for, and the token is in no URL and no page storage.
Screenshots of each step: artifacts/screenshots/console-*.png."""

from __future__ import annotations

from tests.auth_helpers import token_for
from tests.axe import violations
from tests.browser import chromium
from tests.console_world import (
    A01,
    BAD_VERSION,
    PI_TYPED,
    dead_outbox_item,
    fix_mapping,
    mapping_that_misses_pi,
    receive,
)
from tests.test_photos_api import live_server

TIMEOUT = 15_000


def _keyboard_sign_in(page, token: str) -> None:
    """Tab to the token field, type, Enter: signing in needs no mouse."""
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "token":
            break
    assert page.evaluate("document.activeElement.id") == "token", "the token field is not reachable by Tab"
    page.keyboard.type(token)
    page.keyboard.press("Enter")


CONTROLS = """() => {
    const all = [...document.querySelectorAll('a[href], button, input, select, textarea, summary, [tabindex="0"]')]
        .filter(e => !e.disabled && e.checkVisibility());
    all.forEach((e, i) => e.dataset.kb = String(i));
    return all.length;
}"""


def _every_control_reachable_by_tab(page) -> None:
    """Tab from the top of the page reaches every visible control (links, buttons, fields, scrollable text)."""
    total = page.evaluate(CONTROLS)
    # the sequential focus starting point at the top of the document, as after loading the page
    page.evaluate("() => { window.scrollTo(0, 0); document.body.tabIndex = -1; document.body.focus(); document.body.removeAttribute('tabindex'); }")
    seen: set[str] = set()
    for _ in range(total * 2):  # Chromium also stops on scrolled boxes (the wide tables)
        page.keyboard.press("Tab")
        mark = page.evaluate("() => document.activeElement && document.activeElement.dataset.kb")
        if mark is not None:
            seen.add(mark)
    missing = sorted(set(map(str, range(total))) - seen, key=int)
    assert total > 20 and not missing, page.evaluate(
        "(marks) => marks.map(m => document.querySelector(`[data-kb='${m}']`).outerHTML.slice(0, 120))", missing)


def _no_serious_violations(page, where: str) -> None:
    found = violations(page)
    assert not found, f"axe-core on {where}: {found}"


def test_an_integration_engineer_fixes_a_feed_in_the_browser(gw, fx, tmp_path, backend):
    mapping = mapping_that_misses_pi(gw, tmp_path)
    applied, failed, rejected = receive(gw, A01, PI_TYPED, BAD_VERSION)
    assert (applied.status, failed.status, rejected.status) == ("applied", "error", "rejected")
    dead = dead_outbox_item(gw, fx, tmp_path)
    token = token_for(gw, role="integration-engineer", sub="ie.alex", name="Alex Engineer")
    clinician = token_for(gw, role="clinician", sub="dr.derm", specialties=["330"])

    def shot(step: str) -> None:
        browser.screenshot(f"console-{step}-{backend}")

    with live_server(gw) as api, chromium() as browser:
        base = str(api.base_url).rstrip("/")
        page = browser.page
        page.set_default_timeout(TIMEOUT)
        page.goto(f"{base}/console/")
        page.wait_for_selector("#login-form")
        _no_serious_violations(page, "the sign-in page")
        _keyboard_sign_in(page, token)
        page.wait_for_selector("#app", state="visible")
        assert page.locator("#who-name").inner_text() == "Alex Engineer"
        assert page.locator("#token").input_value() == ""  # not kept in the page
        page.wait_for_selector(f"#messages-table tbody tr >> text={failed.message_id}")
        rows = page.locator("#messages-table tbody tr")
        assert rows.count() == 3
        page.wait_for_selector("#counters-table tbody tr")
        assert "1 applied" in page.locator("#totals").inner_text() and "1 error" in page.locator("#totals").inner_text()
        shot("1-signed-in-messages-and-counters")
        _no_serious_violations(page, "the console")
        _every_control_reachable_by_tab(page)

        # only the failed messages, then the one that failed
        page.locator("#f-status").select_option("error")
        page.get_by_role("button", name="Show messages").click()
        page.wait_for_function("() => document.querySelectorAll('#messages-table tbody tr').length === 1")
        page.get_by_role("button", name=f"Open message {failed.message_id}").click()
        detail = page.locator("#message-detail")
        detail.wait_for(state="visible")
        assert "no usable patient identifier" in detail.inner_text()
        assert "H1^^^RX1^PI" in page.locator("#detail-raw").inner_text()
        assert "MSA|AE|PI-1" in page.locator("#detail-ack").inner_text()
        shot("2-failed-message-raw-ack-and-mapping")

        # the engineer registers PI as a hospital-number type in the gateway's mapping file, checks it, reprocesses
        fix_mapping(mapping)
        page.get_by_role("button", name="Check the mapping file again").click()
        page.wait_for_function("() => document.querySelector('#mapping-fields').innerText.includes('MR, PI') || "
                               "document.querySelector('#mapping-text').textContent.includes('[MR, PI]')")
        assert "yes" in page.locator("#mapping-fields").inner_text()
        page.get_by_role("button", name="Reprocess this message").click()
        page.wait_for_function("() => document.querySelector('#reprocess-result').textContent.includes('applied (AA)')")
        assert page.locator("#reprocess-result").inner_text() == f"Message {failed.message_id}: error -> applied (AA)"
        page.wait_for_function("() => document.querySelector('#detail-fields').innerText.includes('applied')")
        assert "MSA|AA|PI-1" in page.locator("#detail-ack").inner_text()
        shot("3-reprocessed-applied")

        # the mapping bench: a pasted message, nothing committed
        page.get_by_label("HL7 v2 message").fill(A01.decode().replace("\r", "\n"))
        page.get_by_role("button", name="Map message").click()
        page.wait_for_function("() => document.querySelector('#bench-status').textContent.includes('would be applied')")
        assert "9449305552" in page.locator("#bench-report").inner_text()
        assert "MSA|AA|A01-0001" in page.locator("#bench-ack").inner_text()
        shot("4-mapping-bench")

        # DICOM peers and the outbox: the dead item tried again
        assert "PACS1" in page.locator("#peers-table").inner_text()
        page.locator("#o-status").select_option("dead")
        page.get_by_role("button", name="Show outbox").click()
        page.get_by_role("button", name=f"Retry outbox item {dead.id}").click()
        page.wait_for_function(f"() => document.querySelector('#outbox-status').textContent === 'Outbox item {dead.id}: pending.'")
        page.locator("#o-status").select_option("")
        page.get_by_role("button", name="Show outbox").click()
        page.wait_for_selector("#outbox-table tbody tr[data-status='pending']")
        shot("5-outbox-retried")

        # the audit trail: the chain checked, the engineer's own actions on it
        page.get_by_role("button", name="Verify the audit chain").click()
        page.wait_for_function("() => document.querySelector('#verify-result').textContent.startsWith('Audit trail intact')")
        page.wait_for_selector("#audit-table >> text=console-reprocess")
        assert "console-outbox-retry" in page.locator("#audit-table").inner_text()
        page.locator("#audit").scroll_into_view_if_needed()
        shot("6-audit-verified")
        _no_serious_violations(page, "the console after every step")

        # nothing of the token or the session is left where a script could read it
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert page.evaluate("document.cookie") == ""  # HttpOnly
        assert token not in page.content()

        # a clinician is refused the console
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_selector("#login", state="visible")
        page.locator("#token").fill(clinician)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_function("() => document.querySelector('#login-error').textContent.includes('may use the console')")
        assert page.locator("#app").is_hidden()
        shot("7-clinician-refused")

        assert browser.requests and not browser.off_host(), browser.off_host()
        assert not [u for u in browser.requests if token in u or clinician in u]
        # no clinical image was asked for: only the console's page, files and JSON
        assert all("/console/" in u for u in browser.requests), [u for u in browser.requests if "/console/" not in u]
        assert not [u for u in browser.requests if "/image" in u or "/photos" in u or "/Binary" in u]
