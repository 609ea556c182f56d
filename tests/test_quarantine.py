"""The records officer's reconciliation of quarantined photos (gateway/core/quarantine.py, `clinphoto quarantine`), on
both backends: a release files a held photo under a registered patient (visible to an allowed reader, served under
their PatientID, routed, audited) and nothing else; a rejection hides it for good; every refusal changes nothing."""

from __future__ import annotations

import io
import json

import pydicom
import pytest
from sqlalchemy import func, select

from gateway.core import access, patient_views, quarantine
from gateway.core.identity import Subject
from gateway.core.ingest.metadata import parse_metadata
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, Governance, ImageFile, ReceivedObject, Source
from gateway.core.patients import Actor
from gateway.core.refusals import Kind, Refused
from gateway.core.routing import Route
from store.models import Asset, AuditEvent, Consent, OutboxItem, Patient, PatientIdentifier
from tests import dicom_objects as objects
from tests.ingest_helpers import NHS, UPLOADER, add_patient, capture
from tests.test_adt_events import Feed, ack_fields, build, msh
from tests.test_cli_operator import cli

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")

PEER = Source.dicom_peer("MODALITY1", "10.1.2.3")
READER = Subject(sub="mi.jones", role="medical-illustration", scopes=("user/*.cruds",))
OFFICER = Actor(who="os:records", role="operator", network="local")
UNKNOWN_NHS = "9999999999"  # valid, registered by no feed


@pytest.fixture
def held(gw, fx, tmp_path):
    """A registered patient; a DICOM object and an upload of two unknown patients, quarantined; one active photo."""
    gw.settings.ingest.quarantine_unknown_patients = True
    gw.settings.routing.routes = [Route(destination="PACS1")]
    patient = add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "u.dcm", PatientID="RX99999", IssuerOfPatientID="RXX",
                           PatientName="UNKNOWN^PERSON", BodyPartExamined="ARM")
    dicom = ingest(gw, CaptureRequest(source=PEER, items=[ReceivedObject(sent, filename="u.dcm")], governance=Governance()))
    upload = ingest(gw, capture([ImageFile(fx["gray.jpg"])], parse_metadata({
        "patient": f"nhs|{UNKNOWN_NHS}", "specialty": "330", "bodySite": {"code": "368209003", "laterality": "right"},
        "consent": {"level": "record", "givenBy": "patient", "capturedBy": "nurse", "date": "2024-03-05"}}), UPLOADER))
    active = ingest(gw, capture([ImageFile(fx["rgb.png"])], parse_metadata({"patient": f"nhs|{patient['nhs']}"}), UPLOADER))
    assert dicom.photos[0].quarantined and upload.photos[0].quarantined and not active.photos[0].quarantined
    return {"patient": patient, "dicom": dicom.photos[0].asset_id, "upload": upload.photos[0].asset_id,
            "upload_consent": upload.consent_id, "active": active.photos[0].asset_id}


def served(gw, asset_id: str) -> pydicom.Dataset:
    ctx = access.photo_request(gw, READER, "read", "test")
    return pydicom.dcmread(io.BytesIO(access.dicom_object(gw, ctx, asset_id).served.read()))


def hidden(gw, asset_id: str) -> Kind:
    with pytest.raises(Refused) as refused:
        served(gw, asset_id)
    return refused.value.kind


def state(gw) -> tuple:
    """Everything a reconciliation may change."""
    with gw.db.read() as s:
        return (sorted(s.execute(select(Asset.id, Asset.status, Asset.patient_id, Asset.filed_patient_id)).tuples()),
                sorted(s.execute(select(Consent.id, Consent.patient_id)).tuples()),
                s.scalar(select(func.count()).select_from(OutboxItem)),
                s.scalar(select(func.count()).select_from(AuditEvent)))


def records(gw, subtype: str) -> list[AuditEvent]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(AuditEvent).where(AuditEvent.subtype == subtype).order_by(AuditEvent.seq)))
        s.expunge_all()
        return rows


def test_the_worklist_lists_held_photos_oldest_first_and_is_audited(gw, held):
    photos = quarantine.held(gw, OFFICER)
    assert [p.id for p in photos] == [held["dicom"], held["upload"]]
    dicom, upload = photos
    assert (dicom.source, dicom.sender, dicom.identifier) == ("dimse", "ae:MODALITY1", "RXX|RX99999 (DICOM issuer|PatientID)")
    assert (upload.source, upload.sender, upload.identifier) == ("upload", "dr.jones", f"nhs|{UNKNOWN_NHS}")
    assert (upload.specialty, upload.laterality) == ("330", "right") and upload.body_site
    (record,) = records(gw, "quarantine-list")
    assert (record.agent_who, record.action, record.detail) == ("os:records", "R", {"returned": 2})
    assert {"type": "asset", "id": held["dicom"]} in record.entities


def test_a_release_files_the_photo_under_the_patient_visible_served_routed_and_audited(gw, held):
    patient = held["patient"]
    assert hidden(gw, held["dicom"]) == Kind.NOT_FOUND
    with gw.db.read() as s:
        placeholder = s.scalar(select(Asset.patient_id).where(Asset.id == held["dicom"]))
        assert s.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.asset_id == held["dicom"])) == 0
        public_id = s.scalar(select(Patient.public_id).where(Patient.id == patient["id"]))

    done = quarantine.release(gw, OFFICER, [held["dicom"]], f"nhs|{patient['nhs'][:3]} {patient['nhs'][3:]}",
                              "PAS number typed in the modality; confirmed with the ward")
    assert (done.patient, done.patient_identifier) == (public_id, f"nhs|{patient['nhs']}")
    assert [(p.id, p.routed) for p in done.photos] == [(held["dicom"], 1)]

    # visible to an allowed reader, as the patient's, and served with their Patient Module (the object not rewritten)
    ds = served(gw, held["dicom"])
    assert (ds.PatientID, ds.IssuerOfPatientID, str(ds.PatientName)) == (patient["nhs"], "NHS", "Ó Súilleabháin^Siobhán")
    ctx = access.photo_request(gw, READER, "search", "test")
    found = access.search(gw, ctx, patient=(NHS, patient["nhs"]), query="test")
    assert {v.asset.id for v in found.photos} == {held["dicom"], held["active"]}
    with gw.db.read() as s:
        asset = s.get_one(Asset, held["dicom"])
        assert (asset.status, asset.patient_id, asset.filed_patient_id, asset.encounter_id) == ("active", patient["id"],
                                                                                                patient["id"], None)
        outbox = s.scalars(select(OutboxItem).where(OutboxItem.asset_id == held["dicom"])).all()
        assert [(o.destination, o.status) for o in outbox] == [("PACS1", "pending")]
        assert s.get(Patient, placeholder) is not None  # kept: the earlier records name it (see quarantine.release)
    # nothing else shown: the other held photo stays hidden
    assert hidden(gw, held["upload"]) == Kind.NOT_FOUND
    assert [p.id for p in quarantine.held(gw, OFFICER)] == [held["upload"]]

    (record,) = records(gw, "quarantine-release")
    assert (record.agent_who, record.action, record.patient_id) == ("os:records", "U", patient["id"])
    assert {"type": "asset", "id": held["dicom"]}.items() <= record.entities[0].items()
    assert record.detail["placeholder_identifier"] == "RXX|RX99999 (DICOM issuer|PatientID)"
    assert record.detail["placeholder_patient_id"] == placeholder
    assert (record.detail["patient_identifier"], record.detail["reason"]) == (
        f"nhs|{patient['nhs']}", "PAS number typed in the modality; confirmed with the ward")


def test_a_released_upload_takes_its_captured_consent_to_the_patient(gw, held):
    patient = held["patient"]
    quarantine.release(gw, OFFICER, [held["upload"]], f"mrn|{patient['mrn']}", "wrong NHS number on the request")
    with gw.db.read() as s:
        assert s.get_one(Consent, held["upload_consent"]).patient_id == patient["id"]
        assert s.get_one(Asset, held["upload"]).consent_id == held["upload_consent"]
    assert served(gw, held["upload"]).PatientID == patient["nhs"]
    (record,) = records(gw, "quarantine-release")
    assert record.detail["consents_moved"] == [held["upload_consent"]]


def test_a_rejected_photo_is_entered_in_error_and_hidden_for_good(gw, held):
    before = quarantine.held(gw, OFFICER)
    assert quarantine.reject(gw, OFFICER, [held["upload"]], "photo of the wrong patient") == [held["upload"]]
    with gw.db.read() as s:
        assert s.get_one(Asset, held["upload"]).status == "entered-in-error"
        assert s.scalar(select(func.count()).select_from(OutboxItem)) == 1  # the active photo's only
    assert hidden(gw, held["upload"]) == Kind.GONE
    assert [p.id for p in quarantine.held(gw, OFFICER)] == [p.id for p in before if p.id != held["upload"]]
    (record,) = records(gw, "quarantine-reject")
    assert (record.action, record.detail["reason"], record.detail["placeholder_identifier"]) == (
        "D", "photo of the wrong patient", f"nhs|{UNKNOWN_NHS}")
    with pytest.raises(quarantine.QuarantineError, match="not quarantined"):
        quarantine.release(gw, OFFICER, [held["upload"]], f"nhs|{held['patient']['nhs']}", "changed my mind")
    assert hidden(gw, held["upload"]) == Kind.GONE


def test_refusals_change_nothing(gw, held):
    patient = held["patient"]
    merged = add_patient(gw, nhs="9434765919", mrn="M200", visit=None)
    with gw.db.write() as s:
        s.get_one(Patient, merged["id"]).merged_into_id = patient["id"]
        placeholder = s.scalar(select(Patient.public_id).join(Asset, Asset.patient_id == Patient.id)
                               .where(Asset.id == held["upload"]))
    before = state(gw)
    target = f"nhs|{patient['nhs']}"
    cases = [
        ([held["dicom"], "no-such-photo"], target, "why", "no photo no-such-photo"),
        ([held["dicom"], held["active"]], target, "why", f"photo {held['active']} is not quarantined (it is active)"),
        ([held["dicom"]], "nhs|9000000009", "why", "no registered patient nhs|9000000009"),
        ([held["dicom"]], "nhs|9462934786", "why", "not a valid NHS number"),
        ([held["dicom"]], "nowhere|1", "why", "unknown identifier system"),
        ([held["dicom"]], f"nhs|{UNKNOWN_NHS}", "why", "is a quarantine placeholder"),
        ([held["dicom"]], placeholder, "why", "is a quarantine placeholder"),
        ([held["dicom"]], "nhs|9434765919", "why", "was merged into patient"),
        ([held["dicom"]], target, "  ", "a reason is required"),
    ]
    for photos, who, why, said in cases:
        with pytest.raises(quarantine.QuarantineError) as refused:
            quarantine.release(gw, OFFICER, photos, who, why)
        assert said in str(refused.value) and "\n" not in str(refused.value)
    for photos, why, said in [([held["active"]], "why", "not quarantined"), (["no-such-photo"], "why", "no photo"),
                              ([held["dicom"]], "", "a reason is required")]:
        with pytest.raises(quarantine.QuarantineError, match=said):
            quarantine.reject(gw, OFFICER, photos, why)
    assert state(gw) == before
    assert hidden(gw, held["dicom"]) == Kind.NOT_FOUND


def test_a_held_copy_of_a_photo_the_patient_has_is_refused_as_a_duplicate(gw, fx, held):
    patient = held["patient"]
    again = ingest(gw, capture([ImageFile(fx["rgb.png"])], parse_metadata({"patient": f"nhs|{UNKNOWN_NHS}"}), UPLOADER))
    assert again.photos[0].quarantined
    before = state(gw)
    with pytest.raises(quarantine.QuarantineError, match="already holds the same image"):
        quarantine.release(gw, OFFICER, [again.photos[0].asset_id], f"nhs|{patient['nhs']}", "same photo")
    assert state(gw) == before


def test_the_cli_lists_releases_rejects_and_refuses_with_exit_2(gw, held, database_url, tmp_path):
    env = {"CLINPHOTO_DATA_DIR": str(tmp_path), "CLINPHOTO_DATABASE_URL": database_url}
    listed = cli(env, "quarantine", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["PHOTO", "RECEIVED"] and [line.split()[0] for line in lines[1:]] == [held["dicom"], held["upload"]]
    assert "Súilleabháin" not in listed.stdout and "UNKNOWN" not in listed.stdout

    before = state(gw)
    refused = cli(env, "quarantine", "release", held["active"], "--patient", f"nhs|{held['patient']['nhs']}", "--reason", "x")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [f"clinphoto: photo {held['active']} is not quarantined (it is active); "
                                                   "nothing was changed"]
    no_reason = cli(env, "quarantine", "reject", held["dicom"])
    assert no_reason.returncode == 2 and no_reason.stderr.strip().count("\n") == 0 and "a reason is required" in no_reason.stderr
    assert state(gw)[:3] == before[:3]  # the refused commands changed nothing (the listing's audit record aside)

    released = cli(env, "quarantine", "release", held["dicom"], "--patient", f"nhs|{held['patient']['nhs']}",
                   "--reason", "confirmed with the ward")
    assert released.returncode == 0, released.stderr
    # (no route in this process's settings: routing on release is the core test's)
    assert released.stdout.startswith(f"photo {held['dicom']}: released to patient ")
    rejected = cli(env, "quarantine", "reject", held["upload"], "--reason", "wrong patient")
    assert rejected.returncode == 0, rejected.stderr
    assert cli(env, "quarantine", "list").stderr.strip() == "no quarantined photos"
    assert served(gw, held["dicom"]).PatientID == held["patient"]["nhs"]
    assert hidden(gw, held["upload"]) == Kind.GONE
    (release,) = records(gw, "quarantine-release")
    assert release.agent_who.startswith("os:") and release.detail["reason"] == "confirmed with the ward"
    verify = cli(env, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    json.dumps(release.detail)  # plain JSON on the trail


def test_a_placeholder_merged_by_a40_keeps_its_photos_held_and_named_by_the_identifier_given(gw, held):
    """An A40 merging the placeholder into a registered record moves its photos there, still held: the worklist and
    the release's audit record name the identifier the sender gave (the placeholder's), not the survivor's."""
    patient = held["patient"]
    with gw.db.read() as s:
        placeholder = s.scalar(select(Asset.patient_id).where(Asset.id == held["upload"]))
    answer = Feed(gw.db).send(build(msh("A40", "MERGE-1"), "EVN|A40|20240301090000",
                                    f"PID|1||{patient['nhs']}^^^NHS^NH||Ó SÚILLEABHÁIN^SIOBHÁN||19800203|F",
                                    f"MRG|{UNKNOWN_NHS}^^^NHS^NH"))
    assert ack_fields(answer.ack)["code"] == "AA"
    with gw.db.read() as s:
        assert s.get_one(Asset, held["upload"]).patient_id == patient["id"]
    assert hidden(gw, held["upload"]) == Kind.NOT_FOUND  # still held
    listed = {p.id: p for p in quarantine.held(gw, OFFICER)}
    assert listed[held["upload"]].identifier == f"nhs|{UNKNOWN_NHS}"

    done = quarantine.release(gw, OFFICER, [held["upload"]], f"nhs|{patient['nhs']}", "merged by the PAS")
    assert done.photos[0].identifier == f"nhs|{UNKNOWN_NHS}"
    (record,) = records(gw, "quarantine-release")
    assert (record.detail["placeholder_identifier"], record.detail["placeholder_patient_id"]) == (
        f"nhs|{UNKNOWN_NHS}", placeholder)
    assert {"type": "patient", "id": placeholder, "role": "placeholder"} in record.entities
    assert served(gw, held["upload"]).PatientID == patient["nhs"]


def test_the_pas_adding_a_placeholders_identifier_to_a_registered_patient_takes_the_placeholder_in(gw, fx, held):
    """The PAS adds the NHS number a held upload named to the patient it belongs to (A31: hospital number and NHS
    number): the placeholder holding it is merged into that patient, its photo moved there still held until
    released, and a new photo naming the NHS number goes straight to the patient. Refused before ('the identifiers
    belong to different patients'), for good: a release leaves the placeholder holding the identifier."""
    feed = Feed(gw.db)
    registered = feed.send(build(msh("A28", "ADD-1"), "EVN|A28|20240301090000",
                                 "PID|1||RX10003^^^RX1^MR||NGUYEN^AN||20150607|F"))
    assert ack_fields(registered.ack)["code"] == "AA"
    with gw.db.read() as s:
        placeholder = s.scalar(select(Asset.patient_id).where(Asset.id == held["upload"]))
        pid = s.scalar(select(PatientIdentifier.patient_id).where(PatientIdentifier.value == "RX10003"))
    update = feed.send(build(msh("A31", "UPD-1", t="20240302101500"), "EVN|A31|20240302090000",
                             f"PID|1||RX10003^^^RX1^MR~{UNKNOWN_NHS}^^^NHS^NH||NGUYEN^AN||20150607|F"))
    assert ack_fields(update.ack)["code"] == "AA", ack_fields(update.ack)["text"]
    with gw.db.read() as s:
        assert s.get_one(Patient, placeholder).merged_into_id == pid
        asset = s.get_one(Asset, held["upload"])
        assert (asset.patient_id, asset.status) == (pid, "quarantined")
        assert s.get_one(Consent, held["upload_consent"]).patient_id == pid
        merge = s.scalars(select(AuditEvent).where(AuditEvent.subtype == "merge+update")).one()  # one per patient
        assert (merge.patient_id, merge.detail["merged_patient_id"], merge.detail["assets_moved"]) == (pid, placeholder, 1)
        assert s.scalars(select(AuditEvent.patient_id).where(AuditEvent.subtype == "merged-into")).all() == [placeholder]
    assert hidden(gw, held["upload"]) == Kind.NOT_FOUND  # held until released
    assert held["upload"] in {p.id for p in quarantine.held(gw, OFFICER)}

    new = ingest(gw, capture([ImageFile(fx["rgb.png"])], parse_metadata({"patient": f"nhs|{UNKNOWN_NHS}"}), UPLOADER))
    assert (new.patient_id, new.photos[0].quarantined) == (pid, False)
    # the identifier stays on the merged placeholder (as an A40 leaves it): the officer names the survivor
    with pytest.raises(quarantine.QuarantineError, match="was merged into patient"):
        quarantine.release(gw, OFFICER, [held["upload"]], f"nhs|{UNKNOWN_NHS}", "registered by the PAS")
    done = quarantine.release(gw, OFFICER, [held["upload"]], "https://clinphoto.local/Id/mrn/RX1|RX10003",
                              "registered by the PAS")
    assert done.photos[0].identifier == f"nhs|{UNKNOWN_NHS}"
    assert served(gw, held["upload"]).PatientID == UNKNOWN_NHS
    ctx = access.photo_request(gw, READER, "search", "test")
    found = access.search(gw, ctx, patient=(NHS, UNKNOWN_NHS), query="test")
    # the released photo, covered by the consent captured with it (the new one has none: hidden by consent)
    assert [v.asset.id for v in found.photos] == [held["upload"]]


def test_the_pas_registering_a_placeholders_identifier_makes_it_the_patient_its_photos_held_until_released(gw, fx, held):
    feed = Feed(gw.db)
    answer = feed.send(build(msh("A04", "REG-1"), "EVN|A04|20240301090000",
                             f"PID|1||{UNKNOWN_NHS}^^^NHS^NH||NGUYEN^AN||20150607|F", "PV1|1|O"))
    assert ack_fields(answer.ack)["code"] == "AA"
    with gw.db.read() as s:
        placeholder = s.scalar(select(Asset.patient_id).where(Asset.id == held["upload"]))
        assert s.get_one(Patient, placeholder).family_name == "NGUYEN"
    assert hidden(gw, held["upload"]) == Kind.NOT_FOUND
    new = ingest(gw, capture([ImageFile(fx["rgb.png"])], parse_metadata({"patient": f"nhs|{UNKNOWN_NHS}"}), UPLOADER))
    assert (new.patient_id, new.photos[0].quarantined) == (placeholder, False)
    quarantine.release(gw, OFFICER, [held["upload"]], f"nhs|{UNKNOWN_NHS}", "registered by the PAS")
    assert served(gw, held["upload"]).PatientID == UNKNOWN_NHS


def test_a_placeholder_is_no_patient_to_any_reader_until_a_feed_registers_it(gw, held):
    """The placeholder holding the identifier a sender gave is not shown as a patient (REST and FHIR Patient read,
    search): an unregistered NHS number was on it as a Patient with no name, found by identifier, by id and in an
    open search, while its photos were hidden."""
    with gw.db.read() as s:
        placeholder = s.scalar(select(Patient.public_id).join(Asset, Asset.patient_id == Patient.id)
                               .where(Asset.id == held["upload"]))
    ctx = access.photo_request(gw, READER, "search", "test")
    everyone = patient_views.search(gw, ctx, patient_views.PatientCriteria(), limit=50, query="test")
    assert [p.identifiers[0].value for p in everyone] == [held["patient"]["nhs"]]
    assert patient_views.search(gw, ctx, patient_views.PatientCriteria(identifier=(NHS, UNKNOWN_NHS)), limit=50,
                                query="test") == []
    for look in (lambda: patient_views.by_identifier(gw, ctx, (NHS, UNKNOWN_NHS), "test"),
                 lambda: patient_views.by_id(gw, ctx, placeholder, "test")):
        with pytest.raises(Refused) as refused:
            look()
        assert refused.value.kind == Kind.NOT_FOUND
    Feed(gw.db).send(build(msh("A04", "REG-2"), "EVN|A04|20240301090000",
                           f"PID|1||{UNKNOWN_NHS}^^^NHS^NH||NGUYEN^AN||20150607|F", "PV1|1|O"))
    assert patient_views.by_id(gw, ctx, placeholder, "test").family_name == "NGUYEN"
