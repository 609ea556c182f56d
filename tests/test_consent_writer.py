"""One consent writer: the consent API, a consent captured with an upload, the importer and the demo data all
record through consents.record_consent, so the same rules refuse the same input everywhere and every consent
gets the same audit record."""

from __future__ import annotations

import csv
import json
from datetime import date, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gateway.app import create_app
from gateway.core.ingest.importer import run_import
from gateway.core.ingest.request import Source
from store import audit
from store.models import Asset, AuditEvent, Consent, ConsentAsset
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import NHS, add_patient, photo_fixtures

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")


@pytest.fixture
def client(gw):
    with TestClient(create_app(gw)) as c:
        yield c


def upload(client, gw, photo, metadata):
    headers = auth_headers(gw, role="clinician", sub="dr.jones", specialties=["330"])
    parts = [("files", (photo.name, photo.read_bytes(), "image/jpeg")),
             ("metadata", (None, json.dumps(metadata), "application/json"))]
    return client.post("/api/v1/photos", files=parts, headers=headers)


def counts(gw) -> tuple[int, int, int]:
    with gw.db.read() as s:
        return (s.scalar(select(func.count()).select_from(Asset)),
                s.scalar(select(func.count()).select_from(Consent).where(Consent.scope == "photos")),
                s.scalar(select(func.count()).select_from(ConsentAsset)))


def consent_records(gw) -> list[AuditEvent]:
    with gw.db.read() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.subtype == "consent", AuditEvent.action == "C")
                         .order_by(AuditEvent.seq)).scalars().all()
        for row in rows:
            s.expunge(row)
        return rows


def shape(event: AuditEvent) -> tuple:
    """What a consent's audit record holds, without the values that differ per consent."""
    return (event.type_code, event.action, event.subtype, event.outcome, tuple(e["type"] for e in event.entities),
            tuple(sorted(event.detail)))


REFUSED_CONSENTS = [
    ({"level": "publication", "givenBy": "best-interests", "purpose": "atlas"}, "consent.givenBy", "best-interests"),
    ({"level": "publication", "givenBy": "patient"}, "consent.purpose", "specific use"),
    ({"level": "record", "givenBy": "patient", "date": (date.today() + timedelta(days=3)).isoformat()}, "consent.date", "future"),
]


@pytest.mark.parametrize("consent,field,words", REFUSED_CONSENTS, ids=["best-interests-publication", "publication-no-purpose",
                                                                        "future-date"])
def test_an_upload_whose_consent_breaks_a_rule_is_refused_with_nothing_stored(gw, fx, client, consent, field, words):
    patient = add_patient(gw)
    blobs_before = {b.sha256 for b in gw.blobs.iter_blobs()}
    r = upload(client, gw, fx["baseline_420.jpg"], {"patient": f"{NHS}|{patient['nhs']}", "specialty": "330",
                                                    "consent": consent})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "bad-metadata" and body["field"] == field and words in body["message"]
    assert counts(gw) == (0, 0, 0)
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == blobs_before  # checked before any blob was written
    with gw.db.read() as s:
        refusal = s.execute(select(AuditEvent).where(AuditEvent.type_code == audit.IMPORT)).scalars().one()
        assert refusal.outcome == audit.MINOR_FAILURE and refusal.detail["code"] == "bad-metadata"


def test_the_consent_api_refuses_the_same_input(gw, client):
    patient = add_patient(gw)
    r = client.post("/api/v1/consents", headers=auth_headers(gw, role="clinician", sub="dr.jones", specialties=["330"]),
                    json={"patient": f"{NHS}|{patient['nhs']}", "level": "publication", "givenBy": "best-interests",
                          "purposeNote": "atlas"})
    assert r.status_code == 400 and "best-interests" in r.json()["detail"]


def test_a_consent_captured_with_an_upload_is_recorded_and_audited_as_the_api_records_one(gw, fx, client):
    patient = add_patient(gw)
    r = upload(client, gw, fx["baseline_420.jpg"], {
        "patient": f"{NHS}|{patient['nhs']}", "specialty": "330",
        "consent": {"level": "publication", "givenBy": "patient", "capturedBy": "Nurse Ada", "purpose": "wound atlas"}})
    assert r.status_code == 201, r.text
    consent_id, asset_id = r.json()["consentId"], r.json()["photos"][0]["assetId"]
    with gw.db.read() as s:
        consent = s.get(Consent, consent_id)
        assert (consent.scope, consent.level, consent.captured_by, consent.purpose_note) == ("photos", "publication", "Nurse Ada",
                                                                                            "wound atlas")
        assert s.get(ConsentAsset, (consent_id, asset_id)) is not None and s.get(Asset, asset_id).consent_id == consent_id
    by_api = client.post("/api/v1/consents", headers=auth_headers(gw, role="clinician", sub="dr.jones", specialties=["330"]),
                         json={"patient": f"{NHS}|{patient['nhs']}", "level": "record", "givenBy": "patient",
                               "scope": "photos", "photos": [asset_id]})
    assert by_api.status_code == 201, by_api.text
    captured, recorded = consent_records(gw)
    assert shape(captured) == shape(recorded)
    assert captured.entities[0] == {"type": "consent", "id": consent_id} and captured.detail["assets"] == [asset_id]
    assert (captured.agent_who, captured.detail["captured_by"]) == ("dr.jones", "Nurse Ada")


def write_manifest(path, rows):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_importer_records_consents_through_the_writer(gw, tmp_path):
    folder = tmp_path / "archive"
    photo_fixtures.make_all(folder / "photos")
    patient = add_patient(gw)
    who = f"nhs|{patient['nhs']}"
    manifest = write_manifest(folder / "manifest.csv", [
        {"file": "photos/baseline_420.jpg", "patient": who, "consentLevel": "teaching", "consentGivenBy": "parent",
         "consentCapturedBy": "archivist", "consentDate": "2019-05-01"},
        {"file": "photos/gray.jpg", "patient": who, "consentLevel": "publication", "consentGivenBy": "patient",
         "consentPurpose": "dermatology textbook"},
        {"file": "photos/rgb.png", "patient": who, "consentLevel": "publication", "consentGivenBy": "best-interests"},
    ])
    summary = run_import(gw, folder, manifest, Source.importer("cli:tester"))
    assert (summary.imported, summary.rejected) == (2, 1)
    code, message = summary.rejections[0][1:]
    assert code == "bad-metadata" and "best-interests" in message
    with gw.db.read() as s:
        consents = s.execute(select(Consent).where(Consent.scope == "photos").order_by(Consent.level)).scalars().all()
        assert [(c.level, c.given_by, c.captured_by, c.consent_date, c.purpose_note) for c in consents] == [
            ("publication", "patient", "cli:tester", date.today(), "dermatology textbook"),
            ("teaching", "parent", "archivist", date(2019, 5, 1), None)]
        assert s.scalar(select(func.count()).select_from(ConsentAsset)) == 2
    records = consent_records(gw)
    assert len(records) == 2 and {r.agent_who for r in records} == {"cli:tester"} and {r.agent_role for r in records} == {"importer"}
    # the same shape as a consent recorded by the API
    from gateway.core.consents import record_consent

    with gw.db.write() as s:
        record_consent(s, patient_id=patient["id"], level="record", given_by="patient", captured_by="dr.jones",
                       actor="dr.jones", actor_role="clinician", actor_network="127.0.0.1")
    assert shape(consent_records(gw)[-1]) == shape(records[0])
    assert set(records[0].detail) == {"level", "status", "scope", "assets", "given_by", "captured_by"}


def test_the_demo_records_its_consents_through_the_writer(gw):
    from gateway.demo import seed_demo

    seed_demo(gw)
    with gw.db.read() as s:
        consents = [(c.id, c.level, c.purpose_note) for c in s.execute(select(Consent)).scalars()]
    records = consent_records(gw)
    assert sorted(r.entities[0]["id"] for r in records) == sorted(c[0] for c in consents)  # one audit record per consent
    assert {r.agent_who for r in records} == {"clinphoto-demo"}
    assert len({shape(r) for r in records}) == 1
    publication = [c for c in consents if c[1] == "publication"]
    assert publication and all(c[2] for c in publication)
