"""C-STORE from DICOM peers through the one ingest pipeline: dcmtk's storescu and pynetdicom as the senders, on a
real socket, both backends. A photo is answered Success only once it is committed, filed under the patient its
PatientID + IssuerOfPatientID name, served back valid; every refusal is a failure status with an ErrorComment and
stores nothing."""

from __future__ import annotations

import subprocess

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import VLPhotographicImageStorage
from sqlalchemy import func, select

from gateway.core.policy.settings import DicomPeer
from store.models import Asset, AuditEvent
from tests import dicom_objects as objects
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient
from tests.test_dicom_association import RunningListener

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")  # every stored object, as served, passes dciodvfy
OTHER_NHS = "9434765919"


@pytest.fixture
def store_gw(gw):
    gw.settings.auth.dicom_peers = [
        DicomPeer(ae_title="MODALITY1", hosts=["127.0.0.1"], name="Clinic camera", allow=["echo", "store"], specialties=["330"]),
        DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "find"]),
    ]
    return gw


def assets(gw) -> list[Asset]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(Asset)))
        s.expunge_all()
        return rows


def storescu(port: int, calling: str, *files) -> subprocess.CompletedProcess:
    tool = require_tool("storescu", "dcmtk")
    # -xy: propose JPEG Baseline (storescu otherwise offers only uncompressed syntaxes and cannot convert a JPEG object)
    return subprocess.run([tool, "-xy", "-aet", calling, "-aec", "CLINPHOTO", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def send(port: int, calling: str, path, sop_class=VLPhotographicImageStorage):
    ae = AE(ae_title=calling)
    ds = pydicom.dcmread(path)
    ae.add_requested_context(sop_class, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_storescu_stores_an_img2dcm_photo_under_its_patient(store_gw, fx, tmp_path):
    patient = add_patient(store_gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "vlp.dcm", PatientID=patient["nhs"], IssuerOfPatientID="NHS")
    with RunningListener(store_gw) as port:
        first = storescu(port, "MODALITY1", sent)
        assert first.returncode == 0, first.stderr
        again = storescu(port, "MODALITY1", sent)  # the same object again: success, stored once
        assert again.returncode == 0, again.stderr
    rows = assets(store_gw)
    sent_ds = pydicom.dcmread(sent)
    assert len(rows) == 1
    asset = rows[0]
    assert (asset.patient_id, asset.sop_instance_uid, asset.source, asset.uploaded_by) == (
        patient["id"], sent_ds.SOPInstanceUID, "dimse", "ae:MODALITY1")
    kept = pydicom.dcmread(store_gw.blobs.path(asset.sha256))
    assert kept.PixelData == sent_ds.PixelData and kept.SOPInstanceUID == sent_ds.SOPInstanceUID
    with store_gw.db.read() as s:
        stored = s.scalars(select(AuditEvent).where(AuditEvent.type_code == "110107")).all()
        assert [(e.agent_who, e.agent_network) for e in stored][:1] == [("ae:MODALITY1", "127.0.0.1")]


def test_refusals_are_failure_statuses_with_a_comment_and_store_nothing(store_gw, fx, tmp_path):
    add_patient(store_gw)
    unknown = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "unknown.dcm", PatientID=OTHER_NHS, IssuerOfPatientID="NHS")
    known = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "known.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    no_pixels = pydicom.dcmread(known)
    del no_pixels.PixelData
    broken = tmp_path / "broken.dcm"
    no_pixels.save_as(broken, enforce_file_format=True)
    with RunningListener(store_gw) as port:
        answer = send(port, "MODALITY1", unknown)
        assert answer.Status == 0xC000 and "patient" in answer.ErrorComment.lower()
        answer = send(port, "MODALITY1", broken)
        assert answer.Status == 0xA900 and answer.ErrorComment
        # the attribute at fault is named, in the comment and as OffendingElement (it was only in the audit record)
        no_photometric = pydicom.dcmread(known)
        del no_photometric.PhotometricInterpretation
        no_photometric.save_as(tmp_path / "no-pi.dcm", enforce_file_format=True)
        answer = send(port, "MODALITY1", tmp_path / "no-pi.dcm")
        assert answer.Status == 0xA900 and "PhotometricInterpretation" in answer.ErrorComment, answer
        assert answer.OffendingElement == 0x00280004
        answer = send(port, "VIEWER", known)  # a peer not allowed to store
        assert answer.Status == 0x0124
        # a SOP class the archive does not keep is not even negotiated
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(objects.CT_IMAGE)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert not assoc.is_established  # every context rejected: pynetdicom drops the association itself
    with store_gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 0
    assert not list(store_gw.spool.path.iterdir())  # no spooled object left behind


def test_unknown_patients_are_quarantined_when_configured(store_gw, fx, tmp_path):
    store_gw.settings.ingest.quarantine_unknown_patients = True
    unknown = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "unknown.dcm", PatientID=OTHER_NHS, IssuerOfPatientID="NHS")
    with RunningListener(store_gw) as port:
        assert send(port, "MODALITY1", unknown).Status == 0x0000
    [asset] = assets(store_gw)
    assert asset.status == "quarantined"


def test_a_refusal_says_why_in_whole_words_and_is_logged_without_patient_data(store_gw, fx, tmp_path, caplog):
    """The core's reason for refusing a known SOP Instance UID with other content is longer than ErrorComment's 64
    characters: the comment is a short whole sentence instead of a cut one, and the gateway's log names the refusal
    (at WARNING: a PACS administrator looks there first) without the object's patient."""
    import logging

    add_patient(store_gw)
    first = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "first.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    other = pydicom.dcmread(first)
    other.ImageComments = "the same instance UID, other content"
    changed = tmp_path / "changed.dcm"
    other.save_as(changed, enforce_file_format=True)
    with RunningListener(store_gw) as port, caplog.at_level(logging.INFO):
        assert send(port, "MODALITY1", first).Status == 0x0000
        answer = send(port, "MODALITY1", changed)
    assert answer.Status == 0xC000
    assert answer.ErrorComment == "SOP Instance UID already stored here with other content"
    refused = [r for r in caplog.records if r.levelno >= logging.WARNING and "refused" in r.getMessage()]
    assert refused and "duplicate-instance" in refused[0].getMessage() and "MODALITY1" in refused[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and objects.NHS_NUMBER in r.getMessage()]


def test_an_intact_resend_of_a_photo_whose_pixels_did_not_decode_is_stored_over_c_store(store_gw, fx, tmp_path):
    """The damaged copy was answered Success (its frame is whole in form); once its pixels are found not to decode,
    the sender's resend under the same SOP Instance UID is answered Success too and replaces it in place."""
    from gateway.core.ingest import deferred
    from gateway.core.ingest.renditions import FAILED
    from tests.test_ingest_deferred_attacks import damaged_inside, resend_of

    add_patient(store_gw)
    damaged = damaged_inside(tmp_path, fx)
    intact = resend_of(damaged, tmp_path, fx)
    with RunningListener(store_gw) as port:
        assert send(port, "MODALITY1", damaged).Status == 0x0000
        [asset] = assets(store_gw)
        assert deferred.make(store_gw, asset.id).state == FAILED
        answer = send(port, "MODALITY1", intact)
        assert answer.Status == 0x0000, answer
    [after] = assets(store_gw)
    assert (after.id, after.sop_instance_uid) == (asset.id, asset.sop_instance_uid) and after.sha256 != asset.sha256
    assert pydicom.dcmread(store_gw.blobs.path(after.dicom_sha256)).PixelData == pydicom.dcmread(intact).PixelData
    assert not store_gw.blobs.exists(asset.sha256)
    assert deferred.make(store_gw, asset.id).state is None
    with store_gw.db.read() as s:
        replaced = s.scalars(select(AuditEvent).where(AuditEvent.type_code == "110107", AuditEvent.action == "U",
                                                      AuditEvent.outcome == "0")).all()
        assert [(e.agent_who, e.detail["replaced_sha256"]) for e in replaced] == [("ae:MODALITY1", asset.sha256)]
