"""REST doors attacked as a careless or curious caller would (issue 8, item 9): each test reproduces one finding."""

from __future__ import annotations

import io
import json

from PIL import Image

from store.models import AuditEvent, Consent, PatientIdentifier
from tests.auth_helpers import auth_headers
from tests.test_photos_api import api, audit_events  # noqa: F401 (the live-server fixture)
from tests.test_policy import add_asset, add_patient

SYSTEM = "https://trust.example.nhs.uk/Id/mrn"


def test_a_request_without_any_token_is_audited(gw, api):  # noqa: F811
    for path in ("/api/v1/photos?patient=x|y", "/api/v1/consents?patient=x|y"):
        r = api.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    refused = audit_events(gw, AuditEvent.subtype == "token")
    assert len(refused) == 2  # one record per request
    assert all(e.outcome == "4" and e.outcome_desc == "no bearer token" and e.agent_network for e in refused)
    assert refused[0].entities == [{"type": "request", "id": "GET /api/v1/photos"}]


def test_a_search_the_scopes_do_not_allow_is_refused_and_audited_as_such(gw, api):  # noqa: F811
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add(PatientIdentifier(patient_id=patient.id, system=SYSTEM, value="S1"))
    read_only = auth_headers(gw, role="medical-illustration", sub="mi.jones", scopes="user/Media.r")
    r = api.get("/api/v1/photos", params={"patient": f"{SYSTEM}|S1"}, headers=read_only)
    assert r.status_code == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert "'s' on Media" in r.json()["detail"]
    events = audit_events(gw, AuditEvent.agent_who == "mi.jones")
    assert [(e.subtype, e.outcome) for e in events] == [("refused", "4")]


def _consent_world(gw) -> int:
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add(PatientIdentifier(patient_id=patient.id, system=SYSTEM, value="C1"))
        add_asset(session, patient, specialty="330")
        session.add(Consent(patient_id=patient.id, level="teaching", given_by="patient", captured_by="n.one",
                            scope="patient", purpose_note="secret purpose"))
    return patient.id


def test_consents_follow_the_need_to_know_rule_and_hide_unknown_patients_alike(gw, api):  # noqa: F811
    pid = _consent_world(gw)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    plastics = auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"])
    mine = api.get("/api/v1/consents", params={"patient": f"{SYSTEM}|C1"}, headers=derm)
    assert mine.status_code == 200 and mine.json()["total"] == 1

    hidden = api.get("/api/v1/consents", params={"patient": f"{SYSTEM}|C1"}, headers=plastics)
    unknown = api.get("/api/v1/consents", params={"patient": f"{SYSTEM}|NOBODY"}, headers=plastics)
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json() == unknown.json() and "secret purpose" not in hidden.text
    refusals = audit_events(gw, AuditEvent.agent_who == "dr.plastics")
    assert [(e.outcome, e.patient_id) for e in refusals] == [("4", pid), ("4", None)]
    assert "need to know" in refusals[0].outcome_desc and "no such patient" in refusals[1].outcome_desc

    # a current encounter in one's specialty is a need to know too, as for photos
    from store.models import Encounter

    with gw.db.write() as session:
        session.add(Encounter(patient_id=pid, visit_system="v", visit_number="E1", specialty="160", status="in-progress"))
    assert api.get("/api/v1/consents", params={"patient": f"{SYSTEM}|C1"}, headers=plastics).status_code == 200


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 90)).save(out, "JPEG")
    return out.getvalue()


def test_originals_are_downloads_with_a_sanitised_name(gw, api):  # noqa: F811
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add(PatientIdentifier(patient_id=patient.id, system=SYSTEM, value="O1"))
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    meta = {"patient": f"{SYSTEM}|O1", "consent": {"level": "record", "givenBy": "patient"}}
    name = '../../evil"; filename=x.html\r\n<script>.jpg'
    r = api.post("/api/v1/photos", files=[("files", (name, _jpeg(), "image/jpeg"))],
                 data={"metadata": json.dumps(meta)}, headers=mi)
    assert r.status_code == 201, r.text
    asset = r.json()["photos"][0]["assetId"]
    original = api.get(f"/api/v1/photos/{asset}/image", params={"rendition": "original"}, headers=mi)
    assert original.status_code == 200
    disposition = original.headers["content-disposition"]
    assert disposition.startswith("attachment;") and "<" not in disposition and "/" not in disposition
    assert disposition.count('"') == 2 and disposition.endswith('.jpg"'), disposition
    preview = api.get(f"/api/v1/photos/{asset}/image", params={"rendition": "preview"}, headers=mi)
    assert preview.headers["content-disposition"].startswith("inline;")
