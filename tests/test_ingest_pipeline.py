"""The ingest pipeline on both backends: asset + audit in one transaction, blobs first, all or nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from gateway.core.ingest import errors
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.metadata import parse_metadata
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import ImageFile, Source
from store import audit
from store.models import Asset, AuditEvent, Consent, Patient
from tests.ingest_helpers import NHS, UPLOADER, add_patient, capture, dicom_tools_check

ACTOR = UPLOADER
PEER = Source.dicom_peer("MODALITY1", "10.0.0.7")



pytestmark = pytest.mark.usefixtures("validate_stored_dicom")



def meta(patient, **extra):
    data = {"patient": f"nhs|{patient['nhs']}", "bodySite": {"code": "368209003", "laterality": "right"}, "specialty": "330"}
    data.update(extra)
    return parse_metadata(data)


def counts(gw):
    with gw.db.read() as s:
        return (
            s.scalar(select(func.count()).select_from(Asset)),
            s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.outcome == "0")),
        )


def load(gw, model, key):
    with gw.db.read() as s:
        row = s.get(model, key)
        s.expunge(row)
        return row


def blob_names(gw):
    return {b.sha256 for b in gw.blobs.iter_blobs()}


def test_ingest_stores_original_dicom_renditions_and_audit(gw, fx, tmp_path):
    patient = add_patient(gw)
    result = ingest(gw, capture([ImageFile(fx["gps.jpg"], "arm.jpg")], meta(patient, encounter="V100", view="anterior"), ACTOR))
    assert result.created and len(result.photos) == 1
    photo = result.photos[0]
    asset = load(gw, Asset, photo.asset_id)
    with gw.db.read() as s:
        events = s.execute(select(AuditEvent).where(AuditEvent.type_code == audit.IMPORT)).scalars().all()
        for e in events:
            s.expunge(e)
        assert audit.verify(s).ok
    assert asset.patient_id == patient["id"] and asset.encounter_id == patient["encounter_id"]
    assert asset.original_kept and asset.source == "upload" and asset.uploaded_by == "dr.jones"
    assert asset.specialty == "330" and asset.laterality == "right" and asset.view == "anterior"
    for sha in (asset.sha256, asset.dicom_sha256, asset.preview_sha256, asset.thumbnail_sha256):
        assert gw.blobs.exists(sha)
    # the original is sealed evidence, untouched (GPS and all)
    assert b"GPS" in gw.blobs.read_bytes(asset.sha256) or gw.blobs.read_bytes(asset.sha256) == fx["gps.jpg"].read_bytes()
    assert gw.blobs.read_bytes(asset.sha256) == fx["gps.jpg"].read_bytes()
    # derived objects carry none of it
    for sha in (asset.dicom_sha256, asset.preview_sha256, asset.thumbnail_sha256):
        data = gw.blobs.read_bytes(sha)
        assert b"Exif" not in data and b"SERIAL" not in data and b"Leeds" not in data and b"MPF-TRAILER" not in data
    assert [e.action for e in events] == ["C"] and events[0].outcome == "0"
    assert events[0].entities[0] == {
        "type": "asset", "id": asset.id, "role": "stored", "sop_instance_uid": asset.sop_instance_uid, "study_uid": asset.study_uid,
    }
    assert events[0].patient_id == patient["id"] and events[0].subtype == "upload"
    dcm = tmp_path / "stored.dcm"
    dcm.write_bytes(gw.blobs.read_bytes(asset.dicom_sha256))
    dump = dicom_tools_check(dcm)
    assert "9449305552" in dump and "[NHS]" in dump


def test_same_content_for_same_patient_returns_the_existing_asset(gw, fx):
    patient = add_patient(gw)
    first = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(patient), ACTOR))
    again = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(patient), ACTOR))
    assert not again.created and again.photos[0].status == "existing"
    assert again.photos[0].asset_id == first.photos[0].asset_id
    assert counts(gw) == (1, 1)


def test_study_per_encounter_series_per_session(gw, fx):
    patient = add_patient(gw)
    a = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"]), ImageFile(fx["gray.jpg"])], meta(patient, encounter="V100"), ACTOR))
    b = ingest(gw, capture([ImageFile(fx["rgb.png"])], meta(patient, encounter="V100"), ACTOR))
    assert a.photos[0].study_uid == a.photos[1].study_uid == b.photos[0].study_uid
    assert a.photos[0].series_uid == a.photos[1].series_uid != b.photos[0].series_uid
    with gw.db.read() as s:
        numbers = sorted(s.execute(select(Asset.instance_number).where(Asset.series_uid == a.photos[0].series_uid)).scalars())
    assert numbers == [1, 2]


@pytest.mark.parametrize("bad", ["truncated.jpg", "bomb.png", "html.jpg", "cmyk.jpg", "gray16.png"])
def test_multi_photo_upload_is_all_or_nothing(gw, fx, bad):
    patient = add_patient(gw)
    before = blob_names(gw)
    with pytest.raises(IngestRejected) as info:
        ingest(gw, capture([ImageFile(fx["baseline_420.jpg"], "good.jpg"), ImageFile(fx[bad], bad)], meta(patient), ACTOR))
    assert info.value.item == 1 and info.value.filename == bad
    assert counts(gw) == (0, 0)
    assert blob_names(gw) == before
    with gw.db.read() as s:
        refusal = s.execute(select(AuditEvent).where(AuditEvent.outcome == "4")).scalars().one()
        s.expunge(refusal)
    assert refusal.type_code == audit.IMPORT and refusal.detail["code"] == info.value.code


def test_failure_inside_the_transaction_leaves_no_row_and_removes_new_blobs(gw, fx, monkeypatch):
    patient = add_patient(gw)
    before = blob_names(gw)

    real = audit.append_many
    calls = []

    def broken(session, entries):  # fault injection: the first audit append fails mid-transaction
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return real(session, entries)

    monkeypatch.setattr(audit, "append_many", broken)
    with pytest.raises(RuntimeError):
        ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(patient, consent={"level": "teaching", "givenBy": "patient"}), ACTOR))
    monkeypatch.undo()
    with gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 0
        assert s.scalar(select(func.count()).select_from(Consent).where(Consent.scope == "photos")) == 0
        assert s.execute(select(AuditEvent.outcome)).scalars().all() == ["8"]
    assert blob_names(gw) == before


def test_unknown_patient_is_refused_naming_the_identifier(gw, fx):
    with pytest.raises(IngestRejected) as info:
        ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], parse_metadata({"patient": "nhs|9999999999"}), ACTOR))
    assert info.value.code == errors.UNKNOWN_PATIENT
    assert f"{NHS}|9999999999" in info.value.message
    assert counts(gw) == (0, 0)


def test_unknown_patient_quarantined_when_configured(gw, fx):
    gw.settings.ingest.quarantine_unknown_patients = True
    result = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], parse_metadata({"patient": "nhs|9999999999"}), ACTOR))
    asset = load(gw, Asset, result.photos[0].asset_id)
    patient = load(gw, Patient, asset.patient_id)
    assert asset.status == "quarantined" and result.photos[0].quarantined
    assert patient.family_name is None
    # a placeholder is no registered patient: the next photo naming it is held under it too, a repeat is the same photo
    second = ingest(gw, capture([ImageFile(fx["gray.jpg"])], parse_metadata({"patient": "nhs|9999999999"}), ACTOR))
    repeat = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], parse_metadata({"patient": "nhs|9999999999"}), ACTOR))
    held = load(gw, Asset, second.photos[0].asset_id)
    assert (held.status, held.patient_id, second.photos[0].quarantined) == ("quarantined", asset.patient_id, True)
    assert (repeat.photos[0].status, repeat.photos[0].asset_id) == ("existing", asset.id)
    # and with quarantine off again it is refused as the unknown patient it is
    gw.settings.ingest.quarantine_unknown_patients = False
    with pytest.raises(IngestRejected) as refused:
        ingest(gw, capture([ImageFile(fx["rgb.png"])], parse_metadata({"patient": "nhs|9999999999"}), ACTOR))
    assert refused.value.code == errors.UNKNOWN_PATIENT


def test_consent_object_creates_a_photos_consent_and_consent_id_links(gw, fx):
    patient = add_patient(gw)
    made = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])],
                  meta(patient, consent={"level": "teaching", "givenBy": "parent", "capturedBy": "nurse", "date": "2024-03-05"}), ACTOR))
    linked = ingest(gw, capture([ImageFile(fx["gray.jpg"])], meta(patient, consentId=patient["consent_id"]), ACTOR))
    consent = load(gw, Consent, made.consent_id)
    a1 = load(gw, Asset, made.photos[0].asset_id)
    a2 = load(gw, Asset, linked.photos[0].asset_id)
    assert consent.scope == "photos" and consent.level == "teaching" and consent.given_by == "parent"
    assert a1.consent_id == consent.id and a2.consent_id == patient["consent_id"]


def test_consent_of_another_patient_is_refused(gw, fx):
    one = add_patient(gw)
    other = add_patient(gw, nhs="9434765919", mrn="M200", visit="V200")
    with pytest.raises(IngestRejected) as info:
        ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(one, consentId=other["consent_id"]), ACTOR))
    assert info.value.code == errors.UNKNOWN_CONSENT


def test_unknown_encounter_is_refused(gw, fx):
    patient = add_patient(gw)
    with pytest.raises(IngestRejected) as info:
        ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(patient, encounter="NOPE"), ACTOR))
    assert info.value.code == errors.UNKNOWN_ENCOUNTER and "NOPE" in info.value.message


def test_drop_originals_setting(gw, fx):
    gw.settings.ingest.keep_originals = False
    patient = add_patient(gw)
    result = ingest(gw, capture([ImageFile(fx["gps.jpg"])], meta(patient), ACTOR))
    asset = load(gw, Asset, result.photos[0].asset_id)
    assert not asset.original_kept and not gw.blobs.exists(asset.sha256)
    assert gw.blobs.exists(asset.dicom_sha256)


def test_merged_patient_identifier_resolves_to_the_survivor(gw, fx):
    survivor = add_patient(gw)
    old = add_patient(gw, nhs="9434765919", mrn="M200", visit=None)
    with gw.db.write() as s:
        s.get(Patient, old["id"]).merged_into_id = survivor["id"]
    result = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], parse_metadata({"patient": "nhs|9434765919"}), ACTOR))
    assert result.patient_id == survivor["id"]


def test_metadata_errors_name_the_key():
    with pytest.raises(IngestRejected) as info:
        parse_metadata({"patient": "nhs|1", "colour": "red", "bodySite": {"code": "123", "laterality": "up"}, "sensitivity": "X"})
    message = info.value.message
    for word in ("colour", "bodySite.code", "bodySite.laterality", "sensitivity"):
        assert word in message
    with pytest.raises(IngestRejected, match="system\\|value"):
        parse_metadata({"patient": "9449305552"})


def test_dicom_doors_keep_the_senders_uids(gw, fx):
    patient = add_patient(gw)
    study, series, sop = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2", "1.2.826.0.1.3680043.10.1.3"
    upload = ImageFile(fx["baseline_420.jpg"], sop_instance_uid=sop)
    result = ingest(gw, capture([upload], meta(patient), PEER, study_uid=study, series_uid=series))
    photo = result.photos[0]
    assert (photo.study_uid, photo.series_uid, photo.sop_instance_uid) == (study, series, sop)
    again = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"], sop_instance_uid=sop)], meta(patient), PEER))
    assert again.photos[0].status == "existing"
    with pytest.raises(IngestRejected) as info:
        ingest(gw, capture([ImageFile(fx["gray.jpg"], sop_instance_uid=sop)], meta(patient), PEER))
    assert info.value.code == errors.DUPLICATE_INSTANCE


def test_failed_ingest_never_deletes_a_blob_another_ingest_holds(gw):
    from gateway.core.ingest.blob_writer import BlobWriter as _BlobWriter

    first, second = _BlobWriter(gw), _BlobWriter(gw)
    sha = first.put_bytes(b"the same rendition bytes")  # created by the first
    second.put_bytes(b"the same rendition bytes")  # found existing by the second, still in flight
    first.remove_unreferenced()  # the first fails
    assert gw.blobs.exists(sha)
    second.release()  # the second committed a row using it (or failed: then gc finds an orphan)
    lonely = _BlobWriter(gw)
    other = lonely.put_bytes(b"only mine")
    lonely.remove_unreferenced()
    assert not gw.blobs.exists(other)


def test_uids_under_the_configured_root(gw, fx, tmp_path):
    import pydicom

    gw.settings.uid_root = "1.2.826.0.1.3680043.10.999"
    patient = add_patient(gw, visit=None)
    photo = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(patient), ACTOR)).photos[0]
    for uid in (photo.study_uid, photo.series_uid, photo.sop_instance_uid):
        assert uid.startswith("1.2.826.0.1.3680043.10.999.") and len(uid) <= 64
    asset = load(gw, Asset, photo.asset_id)
    path = tmp_path / "x.dcm"
    path.write_bytes(gw.blobs.read_bytes(asset.dicom_sha256))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.ImplementationClassUID.startswith("1.2.826.0.1.3680043.10.999.")
    assert ds.SOPInstanceUID == photo.sop_instance_uid and ds.StudyInstanceUID == photo.study_uid


def test_patient_merged_while_storing_refuses_and_a_retry_files_under_the_survivor(gw, fx, monkeypatch):
    """An A40 lands between the patient look-up and the commit: nothing is filed under the merged record."""
    from gateway.core.ingest import pipeline

    merged = add_patient(gw)
    survivor = add_patient(gw, nhs="9434765919", mrn="M200", visit=None)
    before = blob_names(gw)
    real_prepare = pipeline.prepare

    def prepare_while_a_merge_commits(*args, **kwargs):  # the merge commits during the slow part
        with gw.db.write() as s:
            s.get(Patient, merged["id"]).merged_into_id = survivor["id"]
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", prepare_while_a_merge_commits)
    with pytest.raises(IngestRejected) as refused:
        ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(merged), ACTOR))
    monkeypatch.undo()
    assert refused.value.code == errors.PATIENT_MERGED
    assert counts(gw)[0] == 0 and blob_names(gw) == before
    again = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(merged), ACTOR))
    assert again.patient_id == survivor["id"]


def test_merge_moves_every_photo_even_content_the_survivor_already_has(gw, fx):
    """The same picture filed under both records before an A40: both photos (with their own site and consent) move."""
    from gateway.core.patients import Actor as IndexActor
    from gateway.core.patients import IdentifierData, PatientData, PatientIndex

    merged = add_patient(gw)
    survivor = add_patient(gw, nhs="9434765919", mrn="M200", visit=None)
    ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], meta(merged), ACTOR))
    ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], parse_metadata(
        {"patient": "nhs|9434765919", "bodySite": {"code": "368209003", "laterality": "left"}}), ACTOR))
    with gw.db.write() as s:
        index = PatientIndex(s, IndexActor(who="test-pas"))
        outcome = index.merge(PatientData(identifiers=[IdentifierData(NHS, "9434765919")]),
                              [IdentifierData(NHS, merged["nhs"])], None)
        audit.append_many(s, outcome.audit)
    with gw.db.read() as s:
        rows = s.execute(select(Asset.patient_id, Asset.filed_patient_id, Asset.laterality).order_by(Asset.laterality)).all()
    assert rows == [(survivor["id"], survivor["id"], "left"), (survivor["id"], merged["id"], "right")]
    # the same content uploaded again for the survivor is found, not stored a third time
    again = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], parse_metadata({"patient": "nhs|9434765919"}), ACTOR))
    assert not again.created and counts(gw)[0] == 2
