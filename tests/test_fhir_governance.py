"""Consent and AuditEvent through the FHIR door: consents recorded, read, withdrawn and searched through the one
consent writer (and so with its rules and its audit), and the audit trail for audit roles only."""

from __future__ import annotations

from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.consent import Consent as FhirConsent

from store.models import AuditEvent, Consent
from tests.auth_helpers import auth_headers
from tests.test_fhir import MODELS, _photos_world, outcome, valid
from tests.test_photos_api import api, audit_events  # noqa: F401 (the live-server fixture)

MODELS.update({"Consent": FhirConsent, "AuditEvent": FhirAuditEvent})
GIVEN_BY = "https://clinphoto.local/fhir/StructureDefinition/consent-given-by"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


def _consent(patient_id: str, purposes=("TREAT",), given_by="patient", **more) -> dict:
    return {"resourceType": "Consent", "status": "active", "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"text": "photography"}], "patient": {"reference": f"Patient/{patient_id}"},
            "extension": [{"url": GIVEN_BY, "valueCode": given_by}] if given_by else [],
            "provision": {"type": "permit", "purpose": [{"system": ACT, "code": p} for p in purposes]}, **more}


def test_consent_recorded_read_searched_and_withdrawn(gw, api):  # noqa: F811
    patient, ids = _photos_world(gw, 2)
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    r = api.post("/fhir/Consent", json=_consent(patient.public_id, ("TREAT", "TRAIN"), dateTime="2026-05-01",
                                               provision={"type": "permit", "purpose": [{"system": ACT, "code": "TRAIN"}],
                                                          "data": [{"meaning": "related", "reference": {"reference": f"Media/{ids[0]}"}}]}),
                 headers=mi)
    assert r.status_code == 201, r.text
    made = valid(r.json())
    assert made["status"] == "active" and made["meta"]["versionId"] == "1" and r.headers["location"].endswith(f"/Consent/{made['id']}/_history/1")
    assert {p["code"] for p in made["provision"]["purpose"]} == {"TREAT", "ETREAT", "TRAIN", "HRESCH"}  # teaching
    assert made["provision"]["data"][0]["reference"]["reference"] == f"Media/{ids[0]}"
    with gw.db.read() as s:
        row = s.get(Consent, made["id"])
        assert (row.level, row.given_by, row.scope) == ("teaching", "patient", "photos")
    assert valid(api.get(f"/fhir/Consent/{made['id']}", headers=mi).json()) == made
    found = valid(api.get("/fhir/Consent", params={"patient": f"Patient/{patient.public_id}", "status": "active"}, headers=mi).json())
    assert made["id"] in [e["resource"]["id"] for e in found["entry"]]

    # the one writer's rules: a best-interests decision covers the record only
    bad = api.post("/fhir/Consent", json=_consent(patient.public_id, ("PUBLISH",), given_by="best-interests"), headers=mi)
    assert "best-interests" in outcome(bad, 422)
    assert "given" in outcome(api.post("/fhir/Consent", json=_consent(patient.public_id, given_by=None), headers=mi), 422)

    # update only withdraws; If-Match guards it
    changed = {**made, "provision": {"type": "permit", "purpose": [{"system": ACT, "code": "TREAT"}]}}
    assert "withdrawal" in outcome(api.put(f"/fhir/Consent/{made['id']}", json=changed, headers=mi), 422)
    stale = api.put(f"/fhir/Consent/{made['id']}", json={**made, "status": "inactive"}, headers={**mi, "If-Match": 'W/"2"'})
    assert "version 1" in outcome(stale, 412)
    r = api.put(f"/fhir/Consent/{made['id']}", json={**made, "status": "inactive"}, headers={**mi, "If-Match": 'W/"1"'})
    withdrawn = valid(r.json())
    assert withdrawn["status"] == "inactive" and withdrawn["meta"]["versionId"] == "2" and "end" in withdrawn["provision"]["period"]
    with gw.db.read() as s:
        assert s.get(Consent, made["id"]).status == "withdrawn"
    searched = valid(api.get("/fhir/Consent", params={"patient": patient.public_id, "status": "inactive"}, headers=mi).json())
    assert [e["resource"]["id"] for e in searched["entry"]] == [made["id"]]
    recorded = audit_events(gw, AuditEvent.subtype == "consent")
    assert len([e for e in recorded if e.action == "C"]) == 1 and len([e for e in recorded if e.action == "U"]) == 1


def test_consent_needs_a_consent_role_and_a_need_to_know(gw, api):  # noqa: F811
    patient, _ids = _photos_world(gw, 1)
    educator = auth_headers(gw, role="educator", sub="ed.u", purpose="TRAIN")
    assert "may not handle consent" in outcome(api.post("/fhir/Consent", json=_consent(patient.public_id), headers=educator), 403)
    plastics = auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"])
    hidden = valid(api.get("/fhir/Consent", params={"patient": patient.public_id}, headers=plastics).json())
    assert hidden["total"] == 0 and "entry" not in hidden
    with gw.db.read() as s:
        consent_id = s.query(Consent.id).filter(Consent.patient_id == patient.id).scalar()
    assert outcome(api.get(f"/fhir/Consent/{consent_id}", headers=plastics), 404) == outcome(
        api.get("/fhir/Consent/" + "0" * 32, headers=plastics), 404)


def test_audit_events_for_audit_roles_only(gw, api):  # noqa: F811
    patient, ids = _photos_world(gw, 3)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    assert api.get(f"/fhir/Media/{ids[0]}", headers=derm).status_code == 200
    assert api.get("/fhir/Media", params={"patient": patient.public_id}, headers=derm).status_code == 200
    privacy = auth_headers(gw, role="privacy-officer", sub="po.smith")
    assert "audit trail" in outcome(api.get("/fhir/AuditEvent", headers=derm), 403)

    body = valid(api.get("/fhir/AuditEvent", params={"patient": f"Patient/{patient.public_id}", "agent": "dr.derm"},
                         headers=privacy).json())
    events = [e["resource"] for e in body["entry"]]
    assert body["total"] == len(events) >= 2
    read = next(e for e in events if e["action"] == "R" and any(x.get("what", {}).get("reference") == f"Media/{ids[0]}"
                                                                 for x in e.get("entity", [])))
    assert read["agent"][0]["who"]["identifier"]["value"] == "dr.derm" and read["agent"][0]["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    assert any(x.get("what", {}).get("reference") == f"Patient/{patient.public_id}" for x in read["entity"])
    search = next(e for e in events if e["action"] == "E")
    assert any("query" in x for x in search["entity"])
    by_entity = valid(api.get("/fhir/AuditEvent", params={"entity": f"Media/{ids[0]}"}, headers=privacy).json())
    assert by_entity["total"] >= 1 and all(
        any(x.get("what", {}).get("reference") == f"Media/{ids[0]}" for x in e["resource"].get("entity", []))
        for e in by_entity["entry"])
    one = valid(api.get(f"/fhir/AuditEvent/{read['id']}", headers=privacy).json())
    assert one == read
    assert valid(api.get("/fhir/AuditEvent", params={"outcome": "8"}, headers=privacy).json())["total"] == 0
    paged = valid(api.get("/fhir/AuditEvent", params={"_count": 1}, headers=privacy).json())
    nxt = next(link["url"] for link in paged["link"] if link["relation"] == "next")
    second = valid(api.get(nxt, headers=privacy).json())
    assert int(second["entry"][0]["resource"]["id"]) < int(paged["entry"][0]["resource"]["id"])
    # reading the trail is itself on the trail
    assert audit_events(gw, AuditEvent.subtype == "audit-search", AuditEvent.agent_who == "po.smith")


