"""Photos in through FHIR: an IHE MHD-shaped transaction and a Media with its image inline go through the core
ingest (EXIF stripped, a valid DICOM object, audit), are found through the REST door, and bad input is refused
whole with an OperationOutcome and nothing stored."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone

from sqlalchemy import func, select

from store.models import Asset, AuditEvent
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import add_patient, assert_stored_dicom_valid
from tests.test_fhir import outcome, valid
from tests.test_photos_api import api, audit_events  # noqa: F401 (the live-server fixture)

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _mhd(patient_ref: dict, images: list[str], kind: str = "DocumentReference") -> dict:
    entries = [{"fullUrl": "urn:uuid:ss-1", "resource": {"resourceType": "List", "status": "current", "mode": "working"},
                "request": {"method": "POST", "url": "List"}}]
    for i, data in enumerate(images):
        url = f"urn:uuid:bin-{i}"
        entries.append({"fullUrl": url, "resource": {"resourceType": "Binary", "contentType": "image/jpeg", "data": data},
                        "request": {"method": "POST", "url": "Binary"}})
        attachment = {"contentType": "image/jpeg", "url": url, "title": f"wound-{i}.jpg"}
        if kind == "DocumentReference":
            resource = {"resourceType": "DocumentReference", "status": "current", "subject": patient_ref,
                        "securityLabel": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}],
                        "content": [{"attachment": {**attachment, "creation": "2026-11-30T10:15:00Z"}}],
                        "context": {"encounter": [{"identifier": {"value": "V100"}}]}}
        else:
            resource = {"resourceType": "Media", "status": "completed", "subject": patient_ref, "content": attachment,
                        "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "40983000:272741003=7771000"}]},
                        "createdDateTime": "2026-11-30T10:15:00Z"}
        entries.append({"fullUrl": f"urn:uuid:doc-{i}", "resource": resource, "request": {"method": "POST", "url": kind}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_an_mhd_transaction_stores_the_photos_whole(gw, api, fx, tmp_path):  # noqa: F811
    p = add_patient(gw)
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    bundle = _mhd({"identifier": {"system": NHS, "value": p["nhs"]}}, [_b64(fx["baseline_444.jpg"]), _b64(fx["gps.jpg"])])
    r = api.post("/fhir", json=bundle, headers=mi)
    assert r.status_code == 200, r.text
    answer = valid(r.json())
    assert answer["type"] == "transaction-response" and len(answer["entry"]) == len(bundle["entry"])
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["200 OK", "201 Created", "201 Created", "201 Created", "201 Created"]
    locations = [e["response"]["location"] for e in answer["entry"][1:]]  # the SubmissionSet is not kept: no location
    docs = [loc for loc in locations if loc.startswith("DocumentReference/")]
    assert len(docs) == 2 and "location" not in answer["entry"][0]["response"]
    photo_id = docs[0].split("/")[1]
    assert answer["entry"][1]["response"]["location"] == f"Binary/{photo_id}"
    # found through the REST door, with the governance the DocumentReference gave
    item = api.get(f"/api/v1/photos/{photo_id}", headers=mi).json()
    # a clinician's attachment is the preview, its hash and size the preview's
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    record_consent = {"resourceType": "Consent", "status": "active", "patient": {"reference": f"Patient/{item['patient']['id']}"},
                      "scope": {"coding": [{"code": "patient-privacy"}]}, "category": [{"text": "photography"}],
                      "extension": [{"url": "https://clinphoto.local/fhir/StructureDefinition/consent-given-by", "valueCode": "patient"}],
                      "provision": {"type": "permit"}}
    assert api.post("/fhir/Consent", json=record_consent, headers=mi).status_code == 201
    doc = valid(api.get(f"/fhir/DocumentReference/{photo_id}", headers=derm).json())
    attachment = doc["content"][0]["attachment"]
    preview = api.get(attachment["url"], headers={**derm, "Accept": "image/jpeg"}).content
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(preview).digest()).decode() and attachment["size"] == len(preview)
    assert item["sensitivity"] == "R" and item["takenAt"].startswith("2026-11-30T10:15")
    # the camera's time wins over the sender's, with the offset it recorded, the same on both backends
    gps_photo = docs[1].split("/")[1]
    camera_time = datetime(2024, 3, 5, 13, 22, 31, tzinfo=timezone.utc)  # 14:22:31 at the +01:00 the camera recorded
    assert api.get(f"/api/v1/photos/{gps_photo}", headers=mi).json()["takenAt"] == camera_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    # the GPS is gone from the renditions everyone else is served; the original is kept untouched as sealed evidence,
    # for the roles allowed originals only; the DICOM objects pass dciodvfy
    preview = api.get(f"/fhir/Binary/{gps_photo}", params={"_rendition": "preview"}, headers={**mi, "Accept": "image/jpeg"}).content
    assert preview.startswith(b"\xff\xd8") and b"Leeds" not in preview and b"GPS" not in preview
    original = api.get(f"/fhir/Binary/{gps_photo}", headers={**mi, "Accept": "image/jpeg"}).content
    assert original == fx["gps.jpg"].read_bytes()
    assert assert_stored_dicom_valid(gw, tmp_path) == 2
    assert audit_events(gw, AuditEvent.type_code == "110107", AuditEvent.agent_who == "mi.jones")
    # the same transaction again: already stored, nothing new
    again = valid(api.post("/fhir", json=bundle, headers=mi).json())
    assert [e["response"]["status"] for e in again["entry"][1:]] == ["200 OK"] * 4


def test_a_media_with_its_image_inline(gw, api, fx):  # noqa: F811
    p = add_patient(gw)
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    with gw.db.read() as s:
        from store.models import Patient

        public = s.scalar(select(Patient.public_id).where(Patient.id == p["id"]))
    media = {"resourceType": "Media", "status": "completed", "subject": {"reference": f"Patient/{public}"},
             "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "40983000:272741003=7771000"}]},
             "view": {"text": "anterior"}, "deviceName": "Ward 7 phone", "operator": {"display": "Nurse Ada"},
             "content": {"contentType": "image/jpeg", "data": _b64(fx["baseline_420.jpg"]), "title": "arm.jpg"}}
    r = api.post("/fhir/Media", json=media, headers=mi)
    assert r.status_code == 201, r.text
    photo_id = r.headers["location"].rsplit("/", 1)[1]
    stored = valid(api.get(f"/fhir/Media/{photo_id}", headers=mi).json())
    assert stored["bodySite"]["coding"][0]["code"] == "40983000:272741003=7771000" and stored["view"] == {"text": "anterior"}
    assert stored["deviceName"] == "Ward 7 phone" and stored["operator"]["display"] == "Nurse Ada" and stored["content"]["title"] == "arm.jpg"
    # Attachment.hash and size describe exactly the bytes at the attachment's url (the original for this role)
    served = api.get(stored["content"]["url"], headers={**mi, "Accept": "image/jpeg"}).content
    assert stored["content"]["hash"] == base64.b64encode(hashlib.sha1(served).digest()).decode()
    assert stored["content"]["size"] == len(served) and served == fx["baseline_420.jpg"].read_bytes()
    assert api.post("/fhir/Media", json=media, headers=mi).status_code == 200  # the same photo again


def test_bad_input_is_refused_whole_and_nothing_is_stored(gw, api, fx):  # noqa: F811
    p = add_patient(gw)
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    ref = {"identifier": {"system": NHS, "value": p["nhs"]}}
    good, truncated = _b64(fx["baseline_420.jpg"]), _b64(fx["truncated.jpg"])
    assert "photo 2 (wound-1.jpg): truncated" in outcome(api.post("/fhir", json=_mhd(ref, [good, truncated]), headers=mi), 422)
    not_image = base64.b64encode(b"%PDF-1.4 not a photo").decode()
    assert outcome(api.post("/fhir", json=_mhd(ref, [not_image]), headers=mi), 415)
    assert "base64" in outcome(api.post("/fhir", json=_mhd(ref, ["***"]), headers=mi), 400)
    orphan = _mhd(ref, [good])
    orphan["entry"].append({"fullUrl": "urn:uuid:lost", "resource": {"resourceType": "Binary", "contentType": "image/jpeg", "data": good}})
    assert "named by no" in outcome(api.post("/fhir", json=orphan, headers=mi), 422)
    unknown = _mhd({"identifier": {"system": NHS, "value": "9434765919"}}, [good])
    assert "patient" in outcome(api.post("/fhir", json=unknown, headers=mi), 422).lower()
    mixed = _mhd(ref, [good, good])
    mixed["entry"][4]["resource"]["securityLabel"][0]["coding"][0]["code"] = "V"
    assert "share" in outcome(api.post("/fhir", json=mixed, headers=mi), 422)
    assert "transaction" in outcome(api.post("/fhir", json={"resourceType": "Bundle", "type": "searchset"}, headers=mi), 400)
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"], scopes="user/Media.rs")
    assert outcome(api.post("/fhir", json=_mhd(ref, [good]), headers=derm), 403)
    with gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 0
    assert not list(gw.spool.path.iterdir())  # no spooled image left behind
