"""Patients as REST resources: found by identifier, read by opaque id, under the need-to-know rule."""

from __future__ import annotations

import re
from datetime import date, datetime, timezone

from store.models import AuditEvent, Encounter, Patient, PatientIdentifier
from tests.auth_helpers import auth_headers
from tests.test_photos_api import api, audit_events  # noqa: F401 (the live-server fixture)

NHS = "https://fhir.nhs.uk/Id/nhs-number"
MRN = "https://clinphoto.local/Id/mrn/RX1"


def world(gw) -> dict[str, Patient]:
    with gw.db.write() as session:
        grace = Patient(family_name="Okafor", given_names="Grace", birth_date=date(1956, 3, 14), sex="F",
                        identifiers=[PatientIdentifier(system=NHS, value="9990000018", type_code="NH", assigner="NHS"),
                                     PatientIdentifier(system=MRN, value="D100001", type_code="MR", assigner="RX1")])
        old = Patient(family_name="Okafor", given_names="G",
                      identifiers=[PatientIdentifier(system=MRN, value="D999999", type_code="MR", assigner="RX1")])
        session.add_all([grace, old])
        session.flush()
        old.merged_into_id, old.merged_at = grace.id, datetime(2026, 1, 2, tzinfo=timezone.utc)
        session.add(Encounter(patient_id=grace.id, visit_system="v", visit_number="V1", specialty="330",
                              status="in-progress", location="Ward 7", class_code="IMP",
                              admitted_at=datetime(2026, 12, 1, 9, tzinfo=timezone.utc)))
    return {"grace": grace, "old": old}


def test_found_by_identifier_with_the_aliases_and_read_by_opaque_id(gw, api):  # noqa: F811
    people = world(gw)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])  # caring for her: encounter in 330
    for identifier in (f"{NHS}|9990000018", "nhs|999 000 0018", "mrn|D100001"):
        r = api.get("/api/v1/patients", params={"identifier": identifier}, headers=derm)
        assert r.status_code == 200 and r.json()["total"] == 1, (identifier, r.text)
    grace = r.json()["items"][0]
    assert re.fullmatch(r"[0-9a-f]{32}", grace["id"]) and grace["id"] == people["grace"].public_id
    assert grace["name"] == {"family": "Okafor", "given": "Grace", "prefix": None} and grace["birthDate"] == "1956-03-14"
    assert {(i["system"], i["value"]) for i in grace["identifiers"]} == {(NHS, "9990000018"), (MRN, "D100001")}
    assert grace["currentEncounter"]["visitNumber"] == "V1" and grace["currentEncounter"]["specialty"] == "330"
    assert grace["mergedInto"] is None and all("_" not in key for key in grace)
    assert api.get(f"/api/v1/patients/{grace['id']}", headers=derm).json() == grace

    # the merged record reads as itself, naming the survivor
    old = api.get(f"/api/v1/patients/{people['old'].public_id}", headers=derm).json()
    assert old["mergedInto"]["id"] == grace["id"] and old["mergedAt"].startswith("2026-01-02") and old["currentEncounter"] is None
    reads = audit_events(gw, AuditEvent.subtype == "patient", AuditEvent.outcome == "0")
    assert len(reads) == 5 and all(e.patient_id == people["grace"].id for e in reads)


def test_without_need_to_know_the_answer_is_the_one_for_nobody(gw, api):  # noqa: F811
    people = world(gw)
    plastics = auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"])
    hidden = api.get("/api/v1/patients", params={"identifier": "nhs|9990000018"}, headers=plastics)
    nobody = api.get("/api/v1/patients", params={"identifier": "nhs|9449305552"}, headers=plastics)
    assert hidden.status_code == nobody.status_code == 200 and hidden.json() == nobody.json() == {"total": 0, "items": []}
    by_id = api.get(f"/api/v1/patients/{people['grace'].public_id}", headers=plastics)
    missing = api.get("/api/v1/patients/" + "0" * 32, headers=plastics)
    assert by_id.status_code == missing.status_code == 404 and by_id.json() == missing.json()
    refusals = audit_events(gw, AuditEvent.agent_who == "dr.plastics")
    assert [(e.outcome, e.patient_id) for e in refusals] == [("4", people["grace"].id), ("4", None),
                                                              ("4", people["grace"].id), ("4", None)]
    assert "need to know" in refusals[0].outcome_desc and "no such patient" in refusals[1].outcome_desc
    # medical illustration is not bound by the specialty rule
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    assert api.get(f"/api/v1/patients/{people['grace'].public_id}", headers=mi).status_code == 200


def test_scopes_roles_and_mistakes(gw, api):  # noqa: F811
    people = world(gw)
    no_patient_scope = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"], scopes="user/Media.rs")
    r = api.get(f"/api/v1/patients/{people['grace'].public_id}", headers=no_patient_scope)
    assert r.status_code == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]
    engineer = auth_headers(gw, role="integration-engineer", sub="ie.one")
    assert api.get(f"/api/v1/patients/{people['grace'].public_id}", headers=engineer).status_code == 403
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    wrong = api.get("/api/v1/patients", params={"identifier": "urn:nowhere|1"}, headers=derm)
    assert wrong.status_code == 400 and "unknown identifier system" in wrong.json()["detail"]
    assert api.get("/api/v1/patients", params={"identifier": "nhs|1234567890"}, headers=derm).status_code == 400
    own = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"], scopes="patient/Patient.rs",
                       patient=people["grace"].public_id)
    assert api.get(f"/api/v1/patients/{people['grace'].public_id}", headers=own).status_code == 200
    assert api.get(f"/api/v1/patients/{people['old'].public_id}", headers=own).status_code == 200  # merged into her
