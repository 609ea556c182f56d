"""The point-of-care viewer over real HTTP, both backends: IHE Invoke Image Display and single-use launch links open
a session cookie (never a token in a URL); the photos it lists are exactly the access matrix's for each user and
patient; images outside the launch's patient are not found; R photos come watermarked; break-glass needs a reason,
the page's own request and a role allowed it, and is audited."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from gateway.viewer.session import COOKIE
from store import audit
from store.models import AuditEvent
from tests.access_matrix import MRN_ASSIGNER, PATIENTS, USERS, build_access_matrix, expected_visible
from tests.auth_helpers import auth_headers
from tests.test_photos_api import live_server

PAGE = {"X-Clinphoto-Viewer": "1"}


@pytest.fixture
def world(gw):
    return build_access_matrix(gw)


@pytest.fixture
def web(gw):
    with live_server(gw) as client:
        yield client


def iid(web: httpx.Client, headers: dict, patient: str, **params) -> httpx.Response:
    mrn = PATIENTS[patient]["mrn"]
    return web.get("/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": f"{mrn}^^^{MRN_ASSIGNER}", **params},
                   headers=headers)


def opened(web: httpx.Client, response: httpx.Response) -> httpx.Client:
    """A browser-like client holding the session cookie the launch set (and nothing else)."""
    # a page that moves on to /viewer/ (a redirect would lose the Strict cookie when the EPR's site started it)
    assert response.status_code == 200 and 'content="0;url=/viewer/"' in response.text, response.text
    cookie = response.cookies[COOKIE]
    set_cookie = response.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/viewer" in set_cookie
    return httpx.Client(base_url=str(web.base_url), cookies={COOKIE: cookie}, timeout=30)


def test_the_access_matrix_through_the_viewer(gw, world, web):
    problems = []
    for user in USERS:
        headers = world.headers(gw, user)
        for patient in PATIENTS:
            launch = iid(web, headers, patient)
            want = {world.asset_ids[p.key] for p in _photos(patient) if expected_visible(user, p)}
            if launch.status_code != 200:  # refused at launch (a role acting for no purpose, a token without scopes)
                assert launch.status_code in (401, 403), launch.text
                problems += [f"MISS {user.key} could not open {patient} to see {world.asset_keys[a]}" for a in sorted(want)]
                continue
            with opened(web, launch) as browser:
                listed = browser.get("/viewer/api/photos")
                got = {p["id"] for p in listed.json()["items"]} if listed.status_code == 200 else set()
                assert listed.status_code in (200, 403), listed.text
                for asset_id in got:  # every listed image opens; thumbnails and previews alike
                    assert browser.get(f"/viewer/img/{asset_id}/thumbnail").status_code == 200
            problems += world.problems(user, got, patient=patient, door="viewer")
    assert not problems, "\n".join(problems)


def _photos(patient: str):
    from tests.access_matrix import PHOTOS

    return [p for p in PHOTOS if p.patient == patient]


def test_a_launch_link_opens_once_and_only_in_time(gw, world, web):
    headers = auth_headers(gw, role="clinician", sub="dr.derm", specialties=("330",), scopes="user/Media.rs user/Patient.rs")
    link = web.post("/api/v1/viewer/launch", json={"patient": f"mrn|{PATIENTS['PA']['mrn']}"}, headers=headers)
    assert link.status_code == 200, link.text
    url = link.json()["url"]
    assert url.startswith("/viewer/launch/") and "Bearer" not in url
    first = web.get(url)
    with opened(web, first) as browser:
        page = browser.get("/viewer/")
        assert page.status_code == 200 and "frame-ancestors 'self'" in page.headers["content-security-policy"]
        session = browser.get("/viewer/api/session").json()
        assert session["patient"]["familyName"] == "ADAMS" and session["user"]["name"] == "dr.derm"
        assert {p["id"] for p in browser.get("/viewer/api/photos").json()["items"]} == \
            world.visible_asset_ids(next(u for u in USERS if u.key == "derm"), patient="PA")
    again = web.get(url)
    assert again.status_code == 404 and "already used" in again.text and COOKIE not in again.cookies
    alerts = _audit(gw, AuditEvent.subtype == "viewer-launch-refused")
    assert [a.outcome_desc for a in alerts] == ["a launch link used again"] and alerts[0].agent_who == "dr.derm"
    # a link not used in time is refused the same way
    gw.settings.viewer.launch_seconds = 0.2
    late = web.post("/api/v1/viewer/launch", json={"patient": f"mrn|{PATIENTS['PA']['mrn']}"}, headers=headers).json()["url"]
    time.sleep(0.4)
    assert web.get(late).status_code == 404
    assert web.get("/viewer/launch/not-a-link-at-all-xxxxxxxxxxxxx").status_code == 404


def test_the_epr_origins_allowed_to_frame_the_viewer_are_a_setting(gw, world):
    gw.settings.viewer.frame_ancestors = ["https://epr.example.nhs.uk"]
    headers = world.headers(gw, next(u for u in USERS if u.key == "illustration"))
    with live_server(gw) as web, opened(web, iid(web, headers, "PA")) as browser:
        csp = browser.get("/viewer/").headers["content-security-policy"]
        assert "frame-ancestors 'self' https://epr.example.nhs.uk" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


def test_the_viewer_needs_its_session_and_stays_on_the_launch_patient(gw, world, web):
    assert web.get("/viewer/api/photos").status_code == 401
    assert web.get("/viewer/").status_code == 401
    headers = world.headers(gw, next(u for u in USERS if u.key == "illustration"))
    with opened(web, iid(web, headers, "PA")) as browser:
        forged = browser.cookies[COOKIE][:-3] + "abc"
        assert web.get("/viewer/api/photos", cookies={COOKIE: forged}).status_code == 401
        other = world.asset_ids["PB-01"]  # medical illustration may see it, but the viewer was opened on PA
        assert browser.get(f"/viewer/img/{other}/preview").status_code == 404
        denial = _audit(gw, AuditEvent.outcome != audit.SUCCESS, AuditEvent.agent_who == "mi.jones")[-1]
        assert "outside the patient this viewer was launched for" in (denial.outcome_desc or "")


def test_restricted_photos_come_watermarked(gw, world, web):
    headers = world.headers(gw, next(u for u in USERS if u.key == "illustration"))
    with opened(web, iid(web, headers, "PA")) as browser:
        plain = browser.get(f"/viewer/img/{world.asset_ids['PA-01']}/preview")
        marked = browser.get(f"/viewer/img/{world.asset_ids['PA-03']}/preview")  # sensitivity R
        assert plain.status_code == marked.status_code == 200
        assert plain.content == gw.blobs.path(world.sha256[("PA-01", "preview")]).read_bytes()
        stored = Image.open(gw.blobs.path(world.sha256[("PA-03", "preview")])).convert("RGB")
        shown = Image.open(io.BytesIO(marked.content)).convert("RGB")
        assert shown.size == stored.size and list(shown.getdata()) != list(stored.getdata())
        assert marked.headers["cache-control"] == "private, no-store"


def test_break_glass_needs_a_reason_the_page_and_a_role_and_is_audited(gw, world, web):
    ed = next(u for u in USERS if u.key == "ed-treat")
    with opened(web, iid(web, world.headers(gw, ed), "PA")) as browser:
        before = {p["id"] for p in browser.get("/viewer/api/photos").json()["items"]}
        assert browser.post("/viewer/api/break-glass", json={"reason": "resus"}).status_code == 403  # not from the page
        assert browser.post("/viewer/api/break-glass", json={"reason": "  "}, headers=PAGE).status_code == 400
        done = browser.post("/viewer/api/break-glass", json={"reason": "unconscious patient in resus"}, headers=PAGE)
        assert done.status_code == 200
        browser.cookies.set(COOKIE, done.cookies[COOKIE])
        after = {p["id"] for p in browser.get("/viewer/api/photos").json()["items"]}
        glass = next(u for u in USERS if u.key == "ed-breakglass")
        assert before == world.visible_asset_ids(ed, patient="PA") and after == world.visible_asset_ids(glass, patient="PA")
        assert after > before
        assert browser.get("/viewer/api/session").json()["breakGlass"] == "unconscious patient in resus"
    overrides = _audit(gw, AuditEvent.type_code == audit.EMERGENCY_OVERRIDE)
    assert overrides and all("unconscious patient in resus" in (o.outcome_desc or "") for o in overrides)
    # a role that may not break glass is refused
    mi = next(u for u in USERS if u.key == "illustration")
    with opened(web, iid(web, world.headers(gw, mi), "PA")) as browser:
        assert browser.post("/viewer/api/break-glass", json={"reason": "curious"}, headers=PAGE).status_code == 403


def test_iid_study_request_and_bad_requests(gw, world, web):
    headers = world.headers(gw, next(u for u in USERS if u.key == "illustration"))
    with gw.db.read() as s:
        from store.models import Asset

        study = s.scalar(select(Asset.study_uid).where(Asset.id == world.asset_ids["PA-01"]))
    launch = web.get("/IHEInvokeImageDisplay", params={"requestType": "STUDY", "studyUID": study}, headers=headers)
    with opened(web, launch) as browser:
        assert [p["id"] for p in browser.get("/viewer/api/photos").json()["items"]] == [world.asset_ids["PA-01"]]
    assert web.get("/IHEInvokeImageDisplay", params={"requestType": "SERIES"}, headers=headers).status_code == 400
    assert web.get("/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "123"}, headers=headers).status_code == 400
    assert iid(web, headers, "PA", lowerDateTime="last tuesday").status_code == 400
    assert web.get("/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "MA0001^^^RXX"}).status_code == 401
    # an unknown patient opens an empty viewer, as a hidden one does: the launch does not tell who is registered
    with opened(web, web.get("/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "MZ9999^^^RXX"},
                             headers=headers)) as browser:
        assert browser.get("/viewer/api/photos").json()["items"] == [] and browser.get("/viewer/api/session").json()["patient"] is None
    # most recent N, newest first
    with opened(web, iid(web, headers, "PA", mostRecentResults=2)) as browser:
        assert len(browser.get("/viewer/api/photos").json()["items"]) == 2


def test_iid_names_the_patient_by_nhs_number(gw, world, web):
    """The README's form, `9434765919^^^NHS`, and the OID form open the patient's photos, as the MRN does (the
    issuer's `nhs` was handed on unexpanded and refused as an unknown system)."""
    from store.models import PatientIdentifier

    with gw.db.write() as s:
        s.add(PatientIdentifier(patient_id=world.patient_ids["PA"], system="https://fhir.nhs.uk/Id/nhs-number",
                                value="9434765919", type_code="NH", assigner="NHS"))
    headers = world.headers(gw, next(u for u in USERS if u.key == "illustration"))
    with opened(web, iid(web, headers, "PA")) as browser:
        by_mrn = {p["id"] for p in browser.get("/viewer/api/photos").json()["items"]}
    assert by_mrn
    for issued in ("9434765919^^^NHS", "943 476 5919^^^&2.16.840.1.113883.2.1.4.1&ISO"):
        launch = web.get("/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": issued}, headers=headers)
        with opened(web, launch) as browser:
            assert {p["id"] for p in browser.get("/viewer/api/photos").json()["items"]} == by_mrn, issued
    # a mistyped NHS number is the caller's mistake to fix, said as such
    bad = web.get("/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "9434765918^^^NHS"}, headers=headers)
    assert bad.status_code == 400 and "not a valid NHS number" in bad.text


def _audit(gw, *where) -> list[AuditEvent]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(AuditEvent).where(*where).order_by(AuditEvent.seq)))
        s.expunge_all()
        return rows


def test_photos_whose_teaching_consent_was_withdrawn_are_marked_care_only(gw, world, web):
    headers = world.headers(gw, next(u for u in USERS if u.key == "illustration"))
    with opened(web, iid(web, headers, "PB")) as browser:
        items = {p["id"]: p for p in browser.get("/viewer/api/photos").json()["items"]}
    # Bob's publication consent was withdrawn, his record consent stands: his photos stay for care only
    assert items and all(p["careOnly"] for p in items.values())
    with opened(web, iid(web, headers, "PA")) as browser:
        assert not any(p["careOnly"] for p in browser.get("/viewer/api/photos").json()["items"])  # Alice's teaching consent stands
