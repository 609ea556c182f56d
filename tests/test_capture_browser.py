"""The bedside capture app in Debian's Chromium emulating a phone (390 x 844, touch), both backends: dev sign-in,
the patient by NHS number (checked as typed) confirmed from the banner, body site, side and a new consent with its
wording, a photo from the camera (set_input_files), uploaded and stored under the right patient with its metadata
and consent (its DICOM object passes dciodvfy); earlier photos of that site shown for the next one; offline the
photo waits encrypted in IndexedDB, is sent once when the network is back and leaves the phone; after sign-out the
browser holds nothing of the patient; axe-core finds no serious violation; nothing leaves 127.0.0.1.
Screenshots: artifacts/screenshots/capture-*.png."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from store.models import Asset, Consent
from tests.auth_server import authorization_server, offline, sign_in
from tests.browser import chromium
from tests.ingest_helpers import add_patient, dicom_tools_check
from tests.test_photos_api import live_server

AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"
NHS = "9449305552"


@pytest.fixture
def base(gw):
    with live_server(gw) as client:
        yield str(client.base_url).rstrip("/")


def assets(gw) -> list[Asset]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(Asset).order_by(Asset.created_at)))
        s.expunge_all()
        return rows


def wristband(folder: Path, number: str) -> Path:
    """A photo of a wristband: the NHS number as a Code 128 barcode (python-barcode) on a white band with the
    patient's name, a little out of focus and JPEG-compressed as a phone camera takes it (held square to the
    camera: ZXing's 1D readers here missed even a 1-degree tilt)."""
    import barcode
    from barcode.writer import ImageWriter
    from PIL import Image, ImageDraw, ImageFilter

    code = Image.open(barcode.get("code128", number, writer=ImageWriter()).save(str(folder / "code128"), {"module_width": 0.4}))
    band = Image.new("RGB", (code.width + 240, code.height + 160), (250, 250, 245))
    ImageDraw.Draw(band).text((20, 20), "O SUILLEABHAIN, Siobhan  03/02/1980", fill=(20, 20, 20))
    band.paste(code, (120, 80))
    photo = band.filter(ImageFilter.GaussianBlur(0.5))
    path = folder / "wristband.jpg"
    photo.save(path, "JPEG", quality=85)
    return path


def axe_serious(page) -> list[tuple[str, str]]:
    page.evaluate(AXE.read_text())
    result = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    return [(v["id"], v["impact"]) for v in result["violations"] if v["impact"] in ("serious", "critical")]


def test_capture_from_sign_in_to_stored_photo_offline_and_sign_out(gw, base, fx, tmp_path):
    patient = add_patient(gw, nhs=NHS)
    with chromium(viewport=(390, 844), mobile=True) as browser:
        page = browser.page
        page.goto(f"{base}/capture/")
        page.wait_for_selector("#dev-form:not([hidden])")
        assert axe_serious(page) == []
        page.locator("#dev-user").fill("dr.derm")
        page.locator("#dev-name").fill("Dr Derm")
        page.locator("#dev-specialty").fill("330")
        browser.screenshot("capture-1-sign-in")
        page.locator("#dev-form button[type=submit]").click()

        # the patient: the NHS number checked as typed, then the banner to confirm against the wristband
        page.wait_for_selector("#step-patient:not([hidden])")
        page.locator("#patient-id").fill(NHS[:-1] + "3")
        assert "Not a valid NHS number" in page.locator("#patient-check").inner_text()
        # the wristband's barcode (Code 128 of the NHS number), photographed with the camera, fills the number in
        page.locator("#scan").set_input_files(str(wristband(tmp_path, NHS)))
        page.wait_for_function(f"() => document.querySelector('#patient-id').value === '{NHS}'", timeout=30_000)
        assert page.locator("#patient-check").inner_text() == "Valid NHS number"
        page.locator("#patient-form button[type=submit]").click()
        page.wait_for_selector("#banner:not([hidden])")
        assert "SÚILLEABHÁIN" in page.locator("#banner-name").inner_text().upper()
        assert "944 930 5552" in page.locator("#banner-facts").inner_text()
        browser.screenshot("capture-2-patient-banner")
        assert axe_serious(page) == []
        page.locator("#confirm-patient").click()

        # what the photos are: body site from the list, side, a new consent with the wording shown
        page.wait_for_selector("#step-details:not([hidden])")
        assert page.locator("#encounter").input_value() == "V100" and page.locator("#specialty").input_value() == "330"
        page.locator("#to-photos").click()
        assert "body site" in page.locator("#details-error").inner_text()
        page.locator("#site-search").fill("hand")
        page.locator("#site-list button", has_text="Hand structure").click()
        page.locator("input[name=laterality][value=left]").check()
        page.locator("input[name=consent][value=new]").check()
        page.locator("#consent-level").select_option("teaching")
        assert "teach" in page.locator("#consent-wording").inner_text()
        page.locator("#to-photos").click()
        assert "wording" in page.locator("#details-error").inner_text()  # not uploaded without the consent decision
        page.locator("#consent-read").check()
        browser.screenshot("capture-3-details")
        assert axe_serious(page) == []
        page.locator("#to-photos").click()

        # a photo from the camera (the file input the phone's camera fills), uploaded with its progress
        page.wait_for_selector("#step-photos:not([hidden])")
        page.locator("#camera").set_input_files(str(fx["baseline_420.jpg"]))
        page.wait_for_selector("#taken li img")
        browser.screenshot("capture-4-taken")
        page.locator("#upload").click()
        page.wait_for_selector("#taken li >> text=In the record")
        browser.screenshot("capture-5-stored")
        [stored] = assets(gw)
        assert (stored.patient_id, stored.body_site_code, stored.laterality) == (patient["id"], "85562004", "left")
        assert (stored.photographer, stored.specialty, stored.sensitivity, stored.uploaded_by) == ("Dr Derm", "330", "N", "dr.derm")
        with gw.db.read() as s:
            consent = s.get(Consent, stored.consent_id)
            assert consent is not None and (consent.level, consent.given_by, consent.scope) == ("teaching", "patient", "encounter")
        dicom_tools_check(gw.blobs.path(stored.dicom_sha256))

        # the next photo of the same site: the earlier one is shown to frame it the same way
        page.locator("#next-patient").click()
        page.locator("#patient-id").fill(NHS)
        page.locator("#patient-form button[type=submit]").click()
        page.locator("#confirm-patient").click()
        page.locator("#site-search").fill("hand")
        page.locator("#site-list button", has_text="Hand structure").click()
        page.wait_for_selector("#earlier:not([hidden]) img")
        page.locator("input[name=laterality][value=left]").check()
        page.locator(f"input[name=consent][value='{stored.consent_id}']").check()
        browser.screenshot("capture-6-earlier-photos")
        page.locator("#to-photos").click()

        # no signal: the photo waits in IndexedDB, encrypted, and is counted
        page.context.set_offline(True)
        page.locator("#camera").set_input_files(str(fx["baseline_444.jpg"]))
        page.locator("#upload").click()
        page.wait_for_selector("#queue:not([hidden])")
        assert page.locator("#queue").inner_text() == "1 waiting to upload"
        held = page.evaluate("""() => new Promise((resolve) => {
            const open = indexedDB.open('clinphoto-capture');
            open.onsuccess = () => {
                const all = open.result.transaction('queue').objectStore('queue').getAll();
                all.onsuccess = () => { const b = new Uint8Array(all.result[0].sealed);
                    resolve({count: all.result.length, head: [b[0], b[1], b[2]], size: b.length}); open.result.close(); };
            };
        })""")
        jpeg = Path(fx["baseline_444.jpg"]).read_bytes()
        assert held["count"] == 1 and held["head"] != [0xFF, 0xD8, 0xFF] and held["size"] > len(jpeg)
        browser.screenshot("capture-7-offline-queued")
        assert len(assets(gw)) == 1
        # signing out now asks first (the photo would be lost); keep it
        page.locator("#sign-out").click()
        page.wait_for_selector("#confirm-dialog[open]")
        assert "1 photo has not reached the record" in page.locator("#confirm-text").inner_text()
        browser.screenshot("capture-7b-sign-out-asks-first")
        page.locator("#confirm-keep").click()
        # the network comes back: sent once, confirmed, gone from the phone
        page.context.set_offline(False)
        page.wait_for_selector("#queue[hidden]", state="attached", timeout=30_000)
        page.wait_for_function("() => !document.querySelector('#queue').textContent")
        assert len(assets(gw)) == 2
        assert page.evaluate("""() => new Promise((resolve) => {
            const open = indexedDB.open('clinphoto-capture');
            open.onsuccess = () => { const c = open.result.transaction('queue').objectStore('queue').count();
                c.onsuccess = () => { resolve(c.result); open.result.close(); }; };
        })""") == 0
        browser.screenshot("capture-8-back-online")

        # sign out: nothing of the patient is left in the browser
        page.locator("#sign-out").click()
        page.wait_for_selector("#dev-form:not([hidden])")
        left = page.evaluate("""async () => ({
            databases: (await indexedDB.databases()).map((d) => d.name),
            local: localStorage.length, session: sessionStorage.length,
            cached: (await Promise.all((await caches.keys()).map(async (k) => (await (await caches.open(k)).keys()).map((r) => r.url)))).flat(),
        })""")
        assert left["databases"] == [] and left["local"] == 0 and left["session"] == 0
        assert all(u.split("/capture/")[0] == base and "/api/" not in u for u in left["cached"]), left["cached"]
        assert page.context.cookies() == []
        assert browser.off_host() == []


def test_hospital_sign_in_with_pkce_and_the_idle_time_out(gw, base, tmp_path):
    """jwt mode: the app signs in at a real OIDC provider (tests/smart_auth_server.mjs) with authorization code and
    PKCE, exchanges the code from the page, keeps the token in memory only and finds a patient with it; left
    untouched past capture.idle_minutes it signs out and erases what it holds."""
    add_patient(gw, nhs=NHS)
    with authorization_server(gw, tmp_path, client_id="clinphoto-capture", redirect_uri=f"{base}/capture/",
                              scopes=["user/Media.cruds", "user/Patient.rs", "user/Consent.cruds"], cors_origins=[base]):
        gw.settings.capture.client_id = "clinphoto-capture"
        gw.settings.capture.idle_minutes = 0.1
        with chromium(viewport=(390, 844), mobile=True) as browser:
            page = browser.page
            offline(page)
            page.goto(f"{base}/capture/")
            assert page.locator("#dev-form").is_hidden()
            page.locator("#sso").click()
            sign_in(page, gw.settings.auth.issuer, "dr.derm", "user/Media.cruds")
            page.wait_for_selector("#step-patient:not([hidden])", timeout=30_000)
            assert page.url == f"{base}/capture/"  # the code left the address bar
            assert page.locator("#who").inner_text() == "Dr Derm"
            page.locator("#patient-id").fill(NHS)
            page.locator("#patient-form button[type=submit]").click()
            page.wait_for_selector("#banner:not([hidden])")
            stored = page.evaluate("async () => ({local: localStorage.length, session: sessionStorage.length})")
            assert stored == {"local": 0, "session": 0}  # the token is in memory only
            browser.screenshot("capture-9-hospital-sign-in")
            # idle: signed out, back at the sign-in screen
            page.wait_for_selector("#sso:not([hidden])", timeout=30_000)
            page.wait_for_selector("#step-sign-in:not([hidden])")
            assert page.locator("#who").inner_text() == ""
