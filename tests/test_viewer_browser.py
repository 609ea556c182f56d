"""The viewer in Debian's Chromium through Playwright, both backends: opened by IHE IID as every user of the access
matrix (each sees exactly the photos the policy allows), a photo full size with zoom, two compared in step,
break-glass with and without a reason, the watermark mark on an R photo, keyboard-only use of the thumbnails, a
launch link refused the second time, axe-core in the page, a tablet-sized layout, and no request off 127.0.0.1.
Screenshots of each step go to artifacts/screenshots/viewer-*.png."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.access_matrix import MRN_ASSIGNER, PATIENTS, USERS, build_access_matrix
from tests.auth_server import authorization_server, offline, sign_in
from tests.browser import Page, chromium
from tests.test_photos_api import live_server

AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture
def world(gw):
    return build_access_matrix(gw)


@pytest.fixture
def base(gw):
    with live_server(gw) as client:
        yield str(client.base_url).rstrip("/")


def user(key: str):
    return next(u for u in USERS if u.key == key)


def open_by_iid(page, base: str, headers: dict, patient: str = "PA") -> None:
    """Navigate as an EPR would (IID URL), the user's token sent on that one request only, never in the URL."""
    def with_token(route, request):
        route.continue_(headers={**request.headers, **{k.lower(): v for k, v in headers.items()}})

    page.route("**/IHEInvokeImageDisplay*", with_token)
    landed = page.goto(f"{base}/IHEInvokeImageDisplay?requestType=PATIENT&patientID={PATIENTS[patient]['mrn']}^^^{MRN_ASSIGNER}")
    page.unroute("**/IHEInvokeImageDisplay*")
    if landed is None or landed.status != 200:
        return  # refused at launch (a role acting for no purpose, a token without the scopes): no viewer
    page.wait_for_url("**/viewer/")
    page.wait_for_function("() => document.querySelector('#count').textContent.length > 0 || "
                           "document.querySelector('#patient').textContent.startsWith('Cannot')", timeout=30_000)


def thumbnail_ids(page) -> set[str]:
    return set(page.eval_on_selector_all(".thumb", "nodes => nodes.map(n => n.dataset.id)"))


def test_every_matrix_user_sees_exactly_what_the_policy_allows(gw, world, base):
    problems = []
    with chromium() as browser:
        for u in USERS:
            context = browser.page.context.browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            try:
                response_codes: list[int] = []
                page.on("response", lambda r, codes=response_codes: codes.append(r.status) if "/viewer/api/photos" in r.url else None)
                open_by_iid(page, base, world.headers(gw, u))
                got = thumbnail_ids(page) if 200 in response_codes else set()
                problems += world.problems(u, got, patient="PA", door="viewer in Chromium")
            finally:
                context.close()
        assert browser.off_host() == []
    assert not problems, "\n".join(problems)


def test_full_size_zoom_compare_watermark_keyboard_and_accessibility(gw, world, base):
    with chromium() as browser:
        page = browser.page
        open_by_iid(page, base, world.headers(gw, user("illustration")))
        assert page.locator(".banner .name").inner_text() == "ADAMS, Alice"
        want = world.visible_asset_ids(user("illustration"), patient="PA")
        assert thumbnail_ids(page) == want
        browser.screenshot("viewer-1-thumbnails")

        # one photo full size, zoomed in
        page.locator(f'.thumb[data-id="{world.asset_ids["PA-01"]}"]').click()
        page.wait_for_function("() => document.querySelector('.pane img') && document.querySelector('.pane img').naturalWidth > 0")
        page.locator("#zoom-in").click()
        assert page.locator("#zoom-level").inner_text() == "125%"
        assert "Skin structure" in page.locator("#details").inner_text()
        browser.screenshot("viewer-2-full-size-zoomed")
        # deep zoom: past the preview's pixels the full-resolution image (medical illustration may have originals)
        for _ in range(4):
            page.locator("#zoom-in").click()
        page.wait_for_function("() => document.querySelector('.pane img').getAttribute('src').endsWith('/original')")
        page.locator("#zoom-reset").click()

        # an R photo: marked as watermarked, and the image the server sent differs from the stored preview
        page.locator(f'.thumb[data-id="{world.asset_ids["PA-03"]}"]').click()
        page.wait_for_selector(".pane .mark")
        assert "Restricted" in page.locator(".pane .mark").inner_text()
        browser.screenshot("viewer-3-restricted-watermarked")

        # two photos of the same body site side by side, zoom and pan in step
        page.locator("#compare-mode").check()
        page.locator(f'.thumb[data-id="{world.asset_ids["PA-02"]}"]').click()
        page.wait_for_function("() => document.querySelectorAll('.pane img').length === 2 && "
                               "[...document.querySelectorAll('.pane img')].every(i => i.naturalWidth > 0)")
        page.locator("#zoom-in").click()
        page.locator("#zoom-in").click()
        scales = page.eval_on_selector_all(".pane img", "imgs => imgs.map(i => i.style.transform.match(/scale\\(([^)]+)\\)/)[1])")
        assert len(scales) == 2 and scales[0] == scales[1]
        browser.screenshot("viewer-4-compare")
        page.locator("#compare-mode").uncheck()

        # keyboard only: Tab to the first thumbnail, arrows between them, Enter opens one
        page.locator("body").focus()
        for _ in range(20):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.classList.contains('thumb')"):
                break
        first = page.evaluate("() => document.activeElement.dataset.id")
        page.keyboard.press("ArrowRight")
        second = page.evaluate("() => document.activeElement.dataset.id")
        assert first and second and first != second
        page.keyboard.press("Enter")
        assert page.locator(f'.thumb[data-id="{second}"]').get_attribute("aria-pressed") == "true"
        browser.screenshot("viewer-5-keyboard")

        # axe-core in the page (evaluated through DevTools: the page's CSP rightly refuses injected scripts)
        page.evaluate(AXE.read_text())
        result = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
        serious = [(v["id"], v["impact"]) for v in result["violations"] if v["impact"] in ("serious", "critical")]
        assert serious == [], serious
        assert browser.off_host() == []


def test_break_glass_with_and_without_a_reason(gw, world, base):
    with chromium() as browser:
        page = browser.page
        open_by_iid(page, base, world.headers(gw, user("ed-treat")))
        before = thumbnail_ids(page)
        assert before == world.visible_asset_ids(user("ed-treat"), patient="PA")
        page.locator("#break-glass").click()
        page.locator("#glass-confirm").click()
        assert "Say why" in page.locator("#glass-error").inner_text()
        assert page.locator("#glass-dialog").is_visible()
        browser.screenshot("viewer-6-break-glass-asks-a-reason")
        page.locator("#glass-reason").fill("unconscious patient in resus")
        page.locator("#glass-confirm").click()
        page.wait_for_selector("#glass-state:not([hidden])")
        after = len(world.visible_asset_ids(user("ed-breakglass"), patient="PA"))
        page.wait_for_function(f"() => document.querySelectorAll('.thumb').length === {after}")
        assert thumbnail_ids(page) == world.visible_asset_ids(user("ed-breakglass"), patient="PA") != before
        browser.screenshot("viewer-7-break-glass-on")
        assert browser.off_host() == []


def test_a_launch_link_works_once_and_the_tablet_layout(gw, world, base):
    import httpx

    headers = world.headers(gw, user("derm"))
    link = httpx.post(f"{base}/api/v1/viewer/launch", json={"patient": f"mrn|{PATIENTS['PA']['mrn']}"}, headers=headers).json()["url"]
    with chromium(viewport=(768, 1024)) as browser:
        page = browser.page
        page.goto(f"{base}{link}")
        page.wait_for_url("**/viewer/")
        page.wait_for_function("() => document.querySelector('#count').textContent.length > 0")
        assert thumbnail_ids(page) == world.visible_asset_ids(user("derm"), patient="PA")
        page.locator(".thumb").first.click()
        page.wait_for_function("() => document.querySelector('.pane img') && document.querySelector('.pane img').naturalWidth > 0")
        browser.screenshot("viewer-8-tablet-768x1024")
        again = page.context.browser.new_context().new_page()
        again.goto(f"{base}{link}")
        assert "already used" in again.locator("[role=alert]").inner_text()
        Page(again).screenshot("viewer-9-launch-link-used-twice")
        assert browser.off_host() == []


def test_smart_ehr_launch_through_a_real_authorization_server(gw, world, base, tmp_path):
    """The EHR launches the viewer the SMART way: /viewer/smart/launch?iss=&launch= sends the browser to a real OIDC
    provider (panva's oidc-provider, tests/smart_auth_server.mjs), the user signs in there, the code comes back and
    is exchanged with PKCE; the access token (JWT, the provider's JWKS) names the user, the token response the
    patient; the viewer opens on that patient with the policy's photos for that user."""
    with authorization_server(gw, tmp_path, client_id="clinphoto-viewer", redirect_uri=f"{base}/viewer/smart/callback",
                              launches={"launch-123": world.patient_public_ids["PA"]}) as provider:
        gw.settings.viewer.smart_client_id = "clinphoto-viewer"
        gw.settings.viewer.smart_issuers = [f"{base}/fhir"]
        with chromium() as browser:
            page = browser.page
            offline(page)
            # a FHIR server not on the list may not launch the viewer (no open redirect to a stranger's sign-in)
            refused = page.goto(f"{base}/viewer/smart/launch?iss=http://127.0.0.1:9/fhir&launch=launch-123")
            assert refused.status == 400
            page.goto(f"{base}/viewer/smart/launch?iss={base}/fhir&launch=launch-123")
            assert page.url.startswith(provider), page.content()[:1000]
            browser.screenshot("viewer-10-smart-sign-in")
            sign_in(page, provider, "dr.derm", "user/Media.rs")
            page.wait_for_url("**/viewer/", timeout=30_000)
            page.wait_for_function("() => document.querySelector('#count').textContent.length > 0")
            assert page.locator(".banner .name").inner_text() == "ADAMS, Alice"
            assert "Dr Derm (clinician)" in page.locator("#user").inner_text()
            assert thumbnail_ids(page) == world.visible_asset_ids(user("derm"), patient="PA")
            browser.screenshot("viewer-11-smart-launched")
            assert not any("access_token" in u or "code_verifier" in u for u in browser.requests)
            # the viewer's own page asks nothing of anywhere else (the provider's development pages ask Google Fonts,
            # which the route above keeps from leaving the machine)
            browser.requests.clear()
            page.reload()
            page.wait_for_function("() => document.querySelector('#count').textContent.length > 0")
            assert browser.off_host() == []
