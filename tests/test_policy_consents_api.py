"""Consent over REST, and its effect on what each caller sees through the photos door (withdrawal at once)."""

from __future__ import annotations

from sqlalchemy import select

from store.models import AuditEvent, Patient, PatientIdentifier
from tests.auth_helpers import auth_headers
from tests.test_photos_api import api  # noqa: F401 (the live-server fixture)
from tests.test_policy import add_asset, add_patient

SYSTEM = "https://trust.example.nhs.uk/Id/mrn"


def public_id(gw, patient_id: int) -> str:
    with gw.db.read() as session:
        return session.get(Patient, patient_id).public_id


def seed(gw):
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add(PatientIdentifier(patient_id=patient.id, system=SYSTEM, value="M1"))
        photo = add_asset(session, patient, specialty="330")
        intimate = add_asset(session, patient, specialty="330", sensitivity="R")
    return patient.id, photo.id, intimate.id


def test_consent_recorded_and_withdrawn_over_rest_changes_visibility_at_once(gw, api):  # noqa: F811
    pid, photo, intimate = seed(gw)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    teacher = auth_headers(gw, role="educator", sub="ed.teacher", purpose="TRAIN")
    listing = {"patient": f"{SYSTEM}|M1"}
    assert api.get("/api/v1/photos", params=listing, headers=derm).json()["total"] == 0  # no consent yet

    r = api.post("/api/v1/consents", json={"patient": f"{SYSTEM}|M1", "level": "teaching", "givenBy": "patient"}, headers=derm)
    assert r.status_code == 201, r.text
    consent = r.json()
    assert consent["capturedBy"] == "dr.derm" and consent["status"] == "active" and consent["patient"]["id"] == public_id(gw, pid)
    assert {i["id"] for i in api.get("/api/v1/photos", params=listing, headers=derm).json()["items"]} == {photo, intimate}
    assert {i["id"] for i in api.get("/api/v1/photos", params=listing, headers=teacher).json()["items"]} == {photo}
    assert api.get(f"/api/v1/photos/{photo}", headers=teacher).json()["consent"]["level"] == "teaching"

    r = api.post(f"/api/v1/consents/{consent['id']}/withdraw", headers=derm)
    assert r.status_code == 200 and r.json()["status"] == "withdrawn" and r.json()["withdrawnAt"].endswith("Z")
    assert api.get("/api/v1/photos", params=listing, headers=teacher).json()["total"] == 0
    assert api.get(f"/api/v1/photos/{photo}", headers=teacher).status_code == 404
    assert api.get("/api/v1/photos", params=listing, headers=derm).json()["total"] == 2  # still there for care
    again = api.post(f"/api/v1/consents/{consent['id']}/withdraw", headers=derm)
    assert again.status_code == 409 and "already withdrawn" in again.json()["detail"]

    listed = api.get("/api/v1/consents", params=listing, headers=derm).json()
    assert listed["total"] == 1 and listed["items"][0]["status"] == "withdrawn"
    with gw.db.read() as session:
        consent_events = session.scalars(select(AuditEvent).where(AuditEvent.subtype == "consent").order_by(AuditEvent.seq))
        actions = [(e.action, e.agent_who) for e in consent_events]
    assert actions == [("C", "dr.derm"), ("U", "dr.derm"), ("R", "dr.derm")]


def test_photo_scoped_consent_only_for_photos_the_caller_sees(gw, api):  # noqa: F811
    pid, photo, intimate = seed(gw)
    plastics = auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"])
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    body = {"patient": f"{SYSTEM}|M1", "level": "record", "givenBy": "patient", "scope": "photos", "photos": [intimate]}
    r = api.post("/api/v1/consents", json=body, headers=plastics)
    assert r.status_code == 404 and r.json()["detail"] == f"photo not found: {intimate}"
    # the photo has no consent yet, so the consent rule hides it; every other rule lets dr.derm see it,
    # and this consent is what will cover it
    assert api.get(f"/api/v1/photos/{intimate}", headers=derm).status_code == 404
    r = api.post("/api/v1/consents", json=body, headers=derm)
    assert r.status_code == 201, r.text
    assert api.get(f"/api/v1/photos/{intimate}", headers=derm).status_code == 200
    r = api.post("/api/v1/consents", json={**body, "photos": [photo], "level": "publication", "purposeNote": "BJD case report"}, headers=derm)
    assert r.status_code == 201, r.text


def test_consent_requests_are_checked(gw, api):  # noqa: F811
    seed(gw)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    base = {"patient": f"{SYSTEM}|M1", "level": "record", "givenBy": "patient"}
    cases = [
        (derm, {**base, "level": "teaching", "givenBy": "best-interests"}, 400, "record only"),
        (derm, {**base, "level": "publication"}, 400, "specific use"),
        (derm, {**base, "level": "gold"}, 422, None),
        (derm, {**base, "colour": "blue"}, 422, None),
        (derm, {**base, "patient": "M1"}, 400, "system|value"),
        (derm, {**base, "patient": f"{SYSTEM}|NOPE"}, 404, "patient not found"),
        (auth_headers(gw, role="educator", sub="ed", purpose="TRAIN"), base, 403, "may not handle consent"),
        (auth_headers(gw, role="clinician", sub="dr.derm", scopes="user/Media.rs"), base, 403, "scopes"),
        (auth_headers(gw, role="clinician", sub="dr.derm", scopes="patient/Consent.cru", patient=999), base, 403, "another patient"),
        ({}, base, 401, None),
    ]
    for headers, body, status, message in cases:
        r = api.post("/api/v1/consents", json=body, headers=headers)
        assert r.status_code == status, (body, r.text)
        if message:
            assert message in r.json()["detail"]
    assert api.get("/api/v1/consents", params={"patient": f"{SYSTEM}|M1"}, headers=derm).json()["total"] == 0
    assert api.post("/api/v1/consents/nope/withdraw", headers=derm).status_code == 404


def test_refusals_come_before_lookups_and_are_audited(gw, api):  # noqa: F811
    """A caller who may not handle consent learns nothing: a known and an unknown patient (or consent) get the same 403."""
    from store import audit
    from tests.test_photos_api import audit_events

    pid, _photo, _intimate = seed(gw)
    with gw.db.write() as session:
        from gateway.core.consents import record_consent

        consent = record_consent(session, patient_id=pid, level="record", given_by="patient", captured_by="mi").id
    base = {"level": "record", "givenBy": "patient"}
    callers = [
        auth_headers(gw, role="researcher", sub="res.smith", purpose="HRESCH"),
        auth_headers(gw, role="admin", sub="root"),
        auth_headers(gw, role="clinician", sub="dr.derm", scopes="user/Media.rs"),  # right role, no Consent scope
        auth_headers(gw, role="clinician", sub="dr.derm", scopes="patient/Consent.cru", patient=999),  # another patient
    ]
    for headers in callers:
        answers = [
            api.post("/api/v1/consents", json={**base, "patient": f"{SYSTEM}|M1"}, headers=headers),
            api.post("/api/v1/consents", json={**base, "patient": f"{SYSTEM}|NOPE"}, headers=headers),
            api.get("/api/v1/consents", params={"patient": f"{SYSTEM}|M1"}, headers=headers),
            api.get("/api/v1/consents", params={"patient": f"{SYSTEM}|NOPE"}, headers=headers),
        ]
        assert [r.status_code for r in answers] == [403] * 4, [r.text for r in answers]
        assert answers[0].json() == answers[1].json() and answers[2].json() == answers[3].json()
        known = api.post(f"/api/v1/consents/{consent}/withdraw", headers=headers)
        unknown = api.post("/api/v1/consents/" + "0" * 32 + "/withdraw", headers=headers)
        assert known.status_code == unknown.status_code == 403 and known.json() == unknown.json()
    refusals = audit_events(gw, AuditEvent.subtype == "refused")
    assert len(refusals) == 6 * len(callers)
    assert all(e.outcome == audit.MINOR_FAILURE and e.outcome_desc for e in refusals)
    assert {e.agent_who for e in refusals} == {"res.smith", "root", "dr.derm"}
    with gw.db.read() as session:
        from gateway.core.consents import list_consents

        assert [c.status for c in list_consents(session, pid)] == ["active"]  # nothing was withdrawn
    # a hidden photo named in a photo-scoped consent is a denial on the trail too
    plastics = auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"])
    r = api.post("/api/v1/consents", json={**base, "patient": f"{SYSTEM}|M1", "scope": "photos", "photos": [_intimate]}, headers=plastics)
    assert r.status_code == 404
    last = audit_events(gw, AuditEvent.subtype == "refused")[-1]
    assert last.agent_who == "dr.plastics" and {"type": "asset", "id": _intimate} in last.entities and last.patient_id == pid


def test_consent_body_is_camel_case_as_every_rest_body(gw, api):  # noqa: F811
    """givenBy/capturedBy/date, as in the upload's consent object; the snake_case spellings are refused, naming them."""
    from tests.auth_helpers import auth_headers
    from tests.ingest_helpers import add_patient

    patient = add_patient(gw, nhs="9990000034", mrn="M777")
    headers = auth_headers(gw, role="medical-illustration", sub="mi.keys")
    r = api.post("/api/v1/consents", headers=headers, json={
        "patient": f"nhs|{patient['nhs']}", "level": "teaching", "givenBy": "patient", "capturedBy": "Nurse B",
        "date": "2026-11-20"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["givenBy"], body["capturedBy"], body["date"]) == ("patient", "Nurse B", "2026-11-20")
    assert all("_" not in key for key in body)
    old = api.post("/api/v1/consents", headers=headers, json={
        "patient": f"nhs|{patient['nhs']}", "level": "teaching", "given_by": "patient"})
    assert old.status_code == 422 and "given_by" in old.text
