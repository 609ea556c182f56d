"""The FHIR door over a live socket: every body a valid R4 resource (fhir.resources R4B models), the access matrix
through Patient, Media, DocumentReference, _include and Binary with no leak and no miss, keyset paging that stays
right while photos arrive, date prefixes, and OperationOutcome for every error."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from fhir.resources.R4B.binary import Binary
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient as FhirPatient

from gateway.core.policy.rules import scope_allows
from store.models import Asset, AuditEvent, Consent, Encounter, Patient, PatientIdentifier
from tests.access_matrix import PATIENTS, PHOTOS, USERS, build_access_matrix, expected_knows_patient, expected_visible
from tests.auth_helpers import auth_headers
from tests.test_photos_api import api, audit_events, refused_outright  # noqa: F401 (the live-server fixture)

NHS = "https://fhir.nhs.uk/Id/nhs-number"
MODELS = {"Binary": Binary, "Bundle": Bundle, "Media": Media, "DocumentReference": DocumentReference, "Patient": FhirPatient,
          "OperationOutcome": OperationOutcome, "CapabilityStatement": CapabilityStatement}


def valid(body: dict) -> dict:
    """The body parses as the R4 resource it says it is (and every resource inside a Bundle too)."""
    MODELS[body["resourceType"]].model_validate(body)
    for entry in body.get("entry", []):
        if "resource" in entry:  # a transaction-response's entries may carry a response only
            MODELS[entry["resource"]["resourceType"]].model_validate(entry["resource"])
    return body


def outcome(r, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = valid(r.json())
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]["diagnostics"]


def test_capability_statement_and_smart_configuration(gw, api):  # noqa: F811
    r = api.get("/fhir/metadata")
    cap = valid(r.json())
    assert r.headers["content-type"].startswith("application/fhir+json") and cap["fhirVersion"] == "4.0.1"
    types = {res["type"]: res for res in cap["rest"][0]["resource"]}
    assert set(types) == {"Patient", "Media", "DocumentReference", "Binary", "Consent", "AuditEvent"}
    assert {p["name"] for p in types["Media"]["searchParam"]} >= {"patient", "patient.identifier", "created", "site", "status"}
    assert types["Media"]["searchInclude"] == ["Media:patient"]
    smart = api.get("/fhir/.well-known/smart-configuration").json()
    assert "user/Media.rs" in smart["scopes_supported"] and smart["code_challenge_methods_supported"] == ["S256"]
    assert api.get("/fhir/metadata", params={"_format": "json"}).status_code == 200
    from gateway.core.policy.settings import AuthSettings

    gw.settings.auth = AuthSettings(mode="dev", authorization_endpoint="https://idp.example.nhs.uk/authorize",
                                    token_endpoint="https://idp.example.nhs.uk/token")
    uris = valid(api.get("/fhir/metadata").json())["rest"][0]["security"]["extension"][0]["extension"]
    assert {u["url"]: u["valueUri"] for u in uris} == {"authorize": "https://idp.example.nhs.uk/authorize",
                                                       "token": "https://idp.example.nhs.uk/token"}
    smart = api.get("/fhir/.well-known/smart-configuration").json()
    assert smart["authorization_endpoint"] == "https://idp.example.nhs.uk/authorize" and smart["token_endpoint"].endswith("/token")
    assert "JSON only" in outcome(api.get("/fhir/metadata", params={"_format": "xml"}), 406)


def test_errors_are_operation_outcomes(gw, api):  # noqa: F811
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    assert "bearer token" in outcome(api.get("/fhir/Media"), 401)
    assert outcome(api.get("/fhir/Media/nope", headers=derm), 404) == "photo not found"
    assert "_count" in outcome(api.get("/fhir/Media", params={"_count": "many"}, headers=derm), 400)
    assert "not a FHIR date" in outcome(api.get("/fhir/Media", params={"created": "yesterday"}, headers=derm), 400)
    assert "_sort" in outcome(api.get("/fhir/Media", params={"_sort": "size"}, headers=derm), 400)
    assert "cursor" in outcome(api.get("/fhir/Media", params={"_cursor": "garbage"}, headers=derm), 400)
    assert "no such FHIR interaction" in outcome(api.get("/fhir/Observation", headers=derm), 404)
    assert "not supported" in outcome(api.delete("/fhir/Media/x", headers=derm), 405)
    # an identifier system no patient has is a mistake, answered with the systems that are known
    assert "aliases: nhs" in outcome(api.get("/fhir/Media", params={"patient.identifier": "urn:x|1"}, headers=derm), 400)
    # unknown parameters: lenient by default (named in an outcome entry), refused under handling=strict
    lenient = valid(api.get("/fhir/Media", params={"colour": "red"}, headers=derm).json())
    assert lenient["entry"][-1]["search"]["mode"] == "outcome" and "colour" in lenient["entry"][-1]["resource"]["issue"][0]["diagnostics"]
    assert "colour" in outcome(api.get("/fhir/Media", params={"colour": "red"}, headers={**derm, "Prefer": "handling=strict"}), 400)
    # a purpose the role may not act for
    assert outcome(api.get("/fhir/Media", headers={**derm, "X-Purpose-Of-Use": "PUBLISH"}), 403)


def test_identifier_aliases_as_at_every_door(gw, api):  # noqa: F811
    """`nhs|...` and `mrn|...` name a patient here as at the REST door (the README's "accepted everywhere"): `nhs` was
    handed on unexpanded and refused as an unknown system while the error itself listed it as an alias."""
    world = build_access_matrix(gw)
    with gw.db.write() as s:
        s.add(PatientIdentifier(patient_id=world.patient_ids["PA"], system=NHS, value="9434765919", type_code="NH", assigner="NHS"))
    illustration = auth_headers(gw, role="medical-illustration", sub="mi.alias")  # scopes user/*.cruds

    def ids(resource: str, params: dict) -> set[str]:
        r = api.get(f"/fhir/{resource}", params={**params, "_count": 200}, headers=illustration)
        assert r.status_code == 200, (resource, params, r.text)
        body = valid(r.json())
        return {e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"}

    mrn = world.identifier("PA")
    for resource, name in (("Patient", "identifier"), ("Media", "patient.identifier"), ("DocumentReference", "patient.identifier")):
        want = ids(resource, {name: f"{NHS}|9434765919"})
        assert want and want == ids(resource, {name: f"{mrn[0]}|{mrn[1]}"}), resource
        for alias in ("nhs|9434765919", "nhs-number|943 476 5919", f"mrn|{mrn[1]}"):
            assert ids(resource, {name: alias}) == want, (resource, alias)
    # a mistyped NHS number is said to be one, as at the REST door
    assert "not a valid NHS number" in outcome(api.get("/fhir/Patient", params={"identifier": "nhs|9434765918"}, headers=illustration), 400)


def test_access_matrix_through_fhir(gw, api):  # noqa: F811
    world = build_access_matrix(gw)
    leaks, misses = [], []
    for user in USERS:
        headers = world.headers(gw, user)
        for patient in PATIENTS:
            system, value = world.identifier(patient)
            # Patient search under the need-to-know rule: the patient, or an empty answer like for nobody
            r = api.get("/fhir/Patient", params={"identifier": f"{system}|{value}"}, headers=headers)
            if refused_outright(user) or not scope_allows(user.scopes, "Patient", "s"):
                outcome(r, 403)
            else:
                found = [e["resource"]["id"] for e in valid(r.json()).get("entry", [])]
                knows = expected_knows_patient(user, patient)
                if found and not knows:
                    leaks.append(f"Patient search: {user.key} finds {patient}")
                if knows and found != [world.patient_public_ids[patient]]:
                    misses.append(f"Patient search: {user.key} does not find {patient} ({found})")
            for resource in ("Media", "DocumentReference"):
                want = world.visible_asset_ids(user, patient, resource)
                may_search = scope_allows(user.scopes, resource, "s")
                for params in ({"patient.identifier": f"{system}|{value}"},
                               {"patient": f"Patient/{world.patient_public_ids[patient]}", "_include": f"{resource}:patient"}):
                    r = api.get(f"/fhir/{resource}", params={**params, "_count": 200}, headers=headers)
                    if refused_outright(user) or not may_search:
                        outcome(r, 403)
                        continue
                    body = valid(r.json())
                    got = {e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"}
                    leaks += [f"{resource} {params}: {user.key} sees {world.asset_keys[a]}" for a in got - want]
                    misses += [f"{resource} {params}: {user.key} misses {world.asset_keys[a]}" for a in want - got]
                    assert body["total"] == len(want), (user.key, patient, resource)
                    included = [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "include"]
                    if "_include" in params and got and scope_allows(user.scopes, "Patient", "r"):
                        assert [p["id"] for p in included] == [world.patient_public_ids[patient]]
                    elif not got:
                        assert included == []  # no photo seen, no patient given away
        for photo in PHOTOS:
            asset_id = world.asset_ids[photo.key]
            reads = {
                "Media": api.get(f"/fhir/Media/{asset_id}", headers=headers),
                "DocumentReference": api.get(f"/fhir/DocumentReference/{asset_id}", headers=headers),
                "Binary": api.get(f"/fhir/Binary/{asset_id}", params={"_rendition": "preview"}, headers={**headers, "Accept": "image/jpeg"}),
            }
            if refused_outright(user):
                assert {r.status_code for r in reads.values()} == {403}
                continue
            for resource, resp in reads.items():
                visible = asset_id in world.visible_asset_ids(user, resource=resource)
                if visible and resp.status_code != 200:
                    misses.append(f"{resource} read: {user.key} cannot open {photo.key} ({resp.status_code})")
                elif visible and resource == "Binary":
                    assert resp.content == gw.blobs.read_bytes(world.sha256[(photo.key, "preview")])
                    assert resp.headers["cache-control"] == "private, no-store" and "content-encoding" not in resp.headers
                elif visible:
                    body = valid(resp.json())
                    label = body["meta"]["security"][0]["code"] if resource == "Media" else body["securityLabel"][0]["coding"][0]["code"]
                    assert label == photo.sensitivity
                elif photo.status == "entered-in-error" and expected_visible(user, replace(photo, status="active"), resource):
                    # taken out of the record: 410 to who could otherwise see it
                    assert "entered in error" in outcome(resp, 410), (user.key, photo.key)
                elif resp.status_code != 404:
                    leaks.append(f"{resource}: {user.key} got {resp.status_code} for hidden {photo.key}")
                else:
                    assert outcome(resp, 404) == "photo not found"
    assert not leaks and not misses, "\n".join(leaks + misses)


def _photos_world(gw, n: int) -> tuple[Patient, list[str]]:
    """One patient under dermatology care with n N-photos a minute apart, covered by a record consent."""
    base = datetime(2026, 5, 1, 9, 0, tzinfo=timezone.utc)
    with gw.db.write() as s:
        p = Patient(family_name="Page", given_names="Petra", identifiers=[PatientIdentifier(system=NHS, value="9990000018")])
        s.add(p)
        s.flush()
        s.add(Encounter(patient_id=p.id, visit_system="v", visit_number="VP1", specialty="330", status="in-progress"))
        s.add(Consent(patient_id=p.id, level="record", given_by="patient", scope="patient"))
        ids = []
        for i in range(n):
            a = Asset(patient_id=p.id, study_uid="1.9", series_uid="1.9.1", sop_instance_uid=f"1.9.1.{i}", sha256=f"{i:064x}",
                      size=1, media_type="image/jpeg", source="upload", specialty="330", sensitivity="N",
                      taken_at=base + timedelta(minutes=i), body_site_code="14975008" if i % 2 else "40983000",
                      laterality="left" if i % 2 else None)
            s.add(a)
            s.flush()
            ids.append(a.id)
    return p, ids


def _walk(client, url: str, params: dict | None, headers: dict) -> tuple[list[str], list[dict]]:
    ids, bodies = [], []
    r = client.get(url, params=params, headers=headers)
    while True:
        body = valid(r.json())
        bodies.append(body)
        ids += [e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]
        nxt = next((link["url"] for link in body["link"] if link["relation"] == "next"), None)
        if nxt is None:
            return ids, bodies
        r = client.get(nxt, headers=headers)


def test_keyset_paging_stays_right_while_photos_arrive(gw, api):  # noqa: F811
    patient, ids = _photos_world(gw, 25)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    newest_first = list(reversed(ids))
    first = valid(api.get("/fhir/Media", params={"patient": patient.public_id, "_count": 10}, headers=derm).json())
    assert first["total"] == 25 and [e["resource"]["id"] for e in first["entry"]] == newest_first[:10]
    assert {link["relation"] for link in first["link"]} == {"self", "next"}
    # a newer photo arrives between pages: page two is still the next ten, not a repeat of one
    with gw.db.write() as s:
        s.add(Asset(patient_id=patient.id, study_uid="1.9", series_uid="1.9.1", sop_instance_uid="1.9.1.99", sha256="f" * 64, size=1,
                    media_type="image/jpeg", source="upload", specialty="330", sensitivity="N",
                    taken_at=datetime(2026, 6, 1, tzinfo=timezone.utc)))
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = valid(api.get(nxt, headers=derm).json())
    assert [e["resource"]["id"] for e in second["entry"]] == newest_first[10:20] and second["total"] == 26
    prev = next(link["url"] for link in second["link"] if link["relation"] == "previous")
    assert [e["resource"]["id"] for e in valid(api.get(prev, headers=derm).json())["entry"]] == newest_first[:10]
    # walking every page oldest first gives each photo once
    walked, _ = _walk(api, "/fhir/DocumentReference", {"patient.identifier": f"{NHS}|9990000018", "_sort": "date", "_count": 7}, derm)
    assert len(walked) == 26 and len(set(walked)) == 26


def test_search_parameters(gw, api):  # noqa: F811
    patient, ids = _photos_world(gw, 6)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])

    def found(resource: str = "Media", **params) -> list[str]:
        body = valid(api.get(f"/fhir/{resource}", params={"patient": patient.public_id, **params}, headers=derm).json())
        return sorted(e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match")

    # taken 09:00..09:05 on 2026-05-01
    assert found(created="2026-05-01") == sorted(ids)
    assert found(created="2026-05") == sorted(ids) and found(created="2026-04") == []
    assert found(created="ge2026-05-01T09:03:00Z") == sorted(ids[3:])
    assert found(created="gt2026-05-01T09:03:00Z") == sorted(ids[4:])
    assert found(created="lt2026-05-01T09:02:00Z") == sorted(ids[:2])
    assert found(created="le2026-05-01T09:02:00Z") == sorted(ids[:3])
    assert found(created=["ge2026-05-01T09:01:00Z", "lt2026-05-01T09:03:00Z"]) == sorted(ids[1:3])  # a range: repeats AND
    assert found(created="ne2026-05-01T09:00:00Z") == sorted(ids[1:])
    assert found(created="ge2026-05-01T10:03:00+01:00") == sorted(ids[3:])  # the zone is honoured
    assert found(site="14975008") == sorted(ids[1::2]) and found(site="http://snomed.info/sct|40983000") == sorted(ids[0::2])
    assert found(site="14975008,40983000") == sorted(ids)  # commas OR
    assert found(identifier="urn:dicom:uid|urn:oid:1.9.1.2") == [ids[2]]
    assert found(status="completed") == sorted(ids) and found(status="entered-in-error") == []
    assert found(modality="XC") == sorted(ids) and found(modality="DMS") == []
    assert found("DocumentReference", type="http://loinc.org|72170-4") == sorted(ids)
    assert found("DocumentReference", type="http://loinc.org|11488-4") == []
    assert found(encounter="Encounter/VP1") == []  # photos not filed under that visit
    count = valid(api.get("/fhir/Media", params={"patient": patient.public_id, "_summary": "count"}, headers=derm).json())
    assert count["total"] == 6 and "entry" not in count
    no_total = valid(api.get("/fhir/Media", params={"patient": patient.public_id, "_total": "none"}, headers=derm).json())
    assert "total" not in no_total and len(no_total["entry"]) == 6
    slim = valid(api.get("/fhir/Media", params={"patient": patient.public_id, "_elements": "bodySite,createdDateTime"},
                         headers=derm).json())["entry"][0]["resource"]
    assert set(slim) == {"resourceType", "id", "meta", "bodySite", "createdDateTime", "status", "content"}  # + the mandatory
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} in slim["meta"]["tag"]
    m = valid(api.get(f"/fhir/Media/{ids[1]}", headers=derm).json())
    assert m["bodySite"]["coding"][0]["code"] == "14975008:272741003=7771000" and m["subject"]["reference"] == f"Patient/{patient.public_id}"
    assert m["createdDateTime"] == "2026-05-01T09:01:00.000Z" and m["identifier"][0]["value"] == "urn:oid:1.9.1.1"
    assert m["content"]["url"].endswith(f"/fhir/Binary/{ids[1]}?_rendition=preview")  # a clinician is given the preview
    # every search is audited, with the photos it returned
    searches = audit_events(gw, AuditEvent.subtype == "search", AuditEvent.patient_id == patient.id)
    assert searches and all(e.agent_who == "dr.derm" for e in searches)


def test_patient_read_and_search(gw, api):  # noqa: F811
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    plastics = auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"])
    with gw.db.write() as s:
        grace = Patient(family_name="Okafor", given_names="Grace Ada", sex="F", birth_date=datetime(1956, 3, 14).date(),
                        identifiers=[PatientIdentifier(system=NHS, value="9990000018", type_code="NH")])
        old = Patient(family_name="Okafor", given_names="G")
        s.add_all([grace, old])
        s.flush()
        old.merged_into_id = grace.id
        s.add(Encounter(patient_id=grace.id, visit_system="v", visit_number="V1", specialty="330", status="in-progress"))
    p = valid(api.get(f"/fhir/Patient/{grace.public_id}", headers=derm).json())
    assert p["active"] is True and p["name"][0] == {"family": "Okafor", "given": ["Grace", "Ada"], "use": "official"}
    assert p["birthDate"] == "1956-03-14" and p["gender"] == "female" and p["identifier"][0]["value"] == "9990000018"
    merged = valid(api.get(f"/fhir/Patient/{old.public_id}", headers=derm).json())
    assert merged["active"] is False and merged["link"] == [{"other": {"reference": f"Patient/{grace.public_id}"}, "type": "replaced-by"}]
    for params in ({"identifier": f"{NHS}|9990000018"}, {"family": "oka"}, {"given": "grace"}, {"birthdate": "1956-03-14"},
                   {"_id": grace.public_id}):
        body = valid(api.get("/fhir/Patient", params=params, headers=derm).json())
        assert [e["resource"]["id"] for e in body["entry"]] == [grace.public_id], params
    # no need to know: the same answer as for nobody
    hidden = valid(api.get("/fhir/Patient", params={"family": "okafor"}, headers=plastics).json())
    assert hidden["total"] == 0 and "entry" not in hidden
    assert outcome(api.get(f"/fhir/Patient/{grace.public_id}", headers=plastics), 404) == outcome(
        api.get("/fhir/Patient/" + "0" * 32, headers=plastics), 404)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_binary_as_image_as_resource_and_in_ranges(gw, api, backend):  # noqa: F811
    world = build_access_matrix(gw)
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    asset_id = world.asset_ids["PA-01"]
    original = gw.blobs.read_bytes(world.sha256[("PA-01", "original")])
    r = api.get(f"/fhir/Binary/{asset_id}", headers={**mi, "Accept": "image/jpeg"})
    assert r.status_code == 200 and r.content == original and r.headers["etag"]
    part = api.get(f"/fhir/Binary/{asset_id}", headers={**mi, "Accept": "image/jpeg", "Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == original[:100]
    as_json = valid(api.get(f"/fhir/Binary/{asset_id}", headers={**mi, "Accept": "application/fhir+json"}).json())
    assert as_json["resourceType"] == "Binary" and base64.b64decode(as_json["data"]) == original
    assert "rendition" in outcome(api.get(f"/fhir/Binary/{asset_id}", params={"_rendition": "huge"}, headers=mi), 400)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    assert "original" in outcome(api.get(f"/fhir/Binary/{asset_id}", headers=derm), 403)


def test_a_photo_taken_out_of_the_record_is_gone_only_to_who_could_see_it(gw, api):  # noqa: F811
    from sqlalchemy import update

    _patient, ids = _photos_world(gw, 2)
    with gw.db.write() as s:
        s.execute(update(Asset).where(Asset.id == ids[0]).values(status="entered-in-error"))
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    plastics = auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"])
    assert "entered in error" in outcome(api.get(f"/fhir/Media/{ids[0]}", headers=derm), 410)
    assert api.get(f"/api/v1/photos/{ids[0]}", headers=derm).status_code == 410
    # to a caller the policy hides it from anyway, it is simply not found, like a photo that never existed
    assert outcome(api.get(f"/fhir/Media/{ids[0]}", headers=plastics), 404) == "photo not found"
    assert api.get(f"/fhir/Media/{ids[1]}", headers=derm).status_code == 200


def test_numbers_are_ascii_digits_within_int64_or_refused_as_such(gw, api):  # noqa: F811
    """str.isdigit() took '²' (then int() refused it: a 500), and nothing bounded a number's size: an id past int64
    overflowed SQLite (a 500), 5,000 digits passed int()'s guard (a 500)."""
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    privacy = auth_headers(gw, role="privacy-officer", sub="po.smith")
    api.get("/fhir/Media", headers=derm)  # one event on the trail at least
    for value in ("\u00b2", "9" * 5000, "\u0663", " 5"):
        assert "_count" in outcome(api.get("/fhir/Media", params={"_count": value}, headers=derm), 400)
        assert "_count" in outcome(api.get("/fhir/AuditEvent", params={"_count": value}, headers=privacy), 400)
    assert valid(api.get("/fhir/Media", params={"_count": str(2**63 - 1)}, headers=derm).json())["resourceType"] == "Bundle"
    for seq in ("\u00b2", "9223372036854775808", "9" * 5000, "\u0663"):
        assert outcome(api.get(f"/fhir/AuditEvent/{seq}", headers=privacy), 404) == "audit event not found"
        assert "cursor" in outcome(api.get("/fhir/AuditEvent", params={"_cursor": seq}, headers=privacy), 400)
        # an _id that is no event's matches none (a non-number was ignored, and every event matched)
        assert valid(api.get("/fhir/AuditEvent", params={"_id": seq}, headers=privacy).json())["total"] == 0
    assert valid(api.get("/fhir/AuditEvent", params={"_id": "x"}, headers=privacy).json())["total"] == 0
    # a date in another script's digits is not a FHIR date
    assert "not a FHIR date" in outcome(api.get("/fhir/Media", params={"created": "\u0662\u0660\u0662\u0664"}, headers=derm), 400)
