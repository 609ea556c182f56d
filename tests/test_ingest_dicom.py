"""Received DICOM objects through the one pipeline: kept as received, served with the patient index's patient module.

Objects come from dcmtk's img2dcm (as a modality's export would) and from pydicom (JPEG baseline, native,
JPEG-LS, RLE), on both backends. What is checked: the original blob is the sent file byte for byte; the
served object carries the index's patient module of the moment (after a rename, after a merge) with the
pixel data unchanged and, for VL Photographic objects, no dciodvfy errors; renditions exist; every refusal
names its rule and stores nothing.
"""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGLSLossless, RLELossless
from sqlalchemy import func, select

from gateway.core import access
from gateway.core.identity import Subject
from gateway.core.ingest import deferred, errors
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.renditions import DUE
from gateway.core.ingest.request import CaptureRequest, Governance, ImageFile, PatientRef, ReceivedObject, Source, governance
from gateway.core.patients import Actor as IndexActor
from gateway.core.patients import IdentifierData, PatientData, PatientIndex
from gateway.core.refusals import Kind, Refused
from store import audit
from store.models import Asset, AuditEvent, Patient, PatientIdentifier
from tests import dicom_objects as objects
from tests.conftest import require_tool
from tests.ingest_helpers import NHS, UPLOADER, add_patient, capture, dicom_tools_check

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")  # every stored object, as served, after each test

PEER = Source.dicom_peer("MODALITY1", "10.1.2.3")
ILLUSTRATOR = Subject(sub="mi.jones", role="medical-illustration", scopes=("user/*.cruds",))
OTHER_NHS = "9434765919"


def receive(gw, *paths, gov: Governance | None = None, source: Source = PEER, **kw):
    return ingest(gw, CaptureRequest(source=source, items=[ReceivedObject(p, filename=p.name) for p in paths],
                                     governance=gov or Governance(), **kw))


def load(gw, asset_id: str) -> Asset:
    with gw.db.read() as s:
        row = s.get(Asset, asset_id)
        s.expunge(row)
        return row


def asset_count(gw) -> int:
    with gw.db.read() as s:
        return s.scalar(select(func.count()).select_from(Asset))


def blob_names(gw) -> set[str]:
    return {b.sha256 for b in gw.blobs.iter_blobs()}


def served(gw, asset_id: str, subject: Subject = ILLUSTRATOR) -> bytes:
    ctx = access.photo_request(gw, subject, "read", "test")
    return access.dicom_object(gw, ctx, asset_id).served.read()


def as_dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def pixel_bytes(data: bytes) -> bytes:
    return as_dataset(data).PixelData


def validate(tmp_path, data: bytes, name: str = "served.dcm") -> str:
    """dciodvfy without errors, dcmdump and a render (tests/ingest_helpers.dicom_tools_check) on a served object."""
    for tool, package in (("dciodvfy", "dicom3tools"), ("dcmdump", "dcmtk"), ("dcmj2pnm", "dcmtk")):
        require_tool(tool, package)
    path = tmp_path / name
    path.write_bytes(data)
    return dicom_tools_check(path)


def rendered(gw, asset: Asset) -> Asset:
    """The row once its renditions are made: what `serve`'s renderer does for an object answered before them."""
    if asset.rendition_state == DUE:
        assert deferred.make(gw, asset.id).state is None
    return load(gw, asset.id)


def preview_of(gw, asset: Asset) -> Image.Image:
    image = Image.open(io.BytesIO(gw.blobs.read_bytes(rendered(gw, asset).preview_sha256)))
    image.load()
    return image


# --- img2dcm objects: kept, filed, served with the index's patient module ----------------------------------


def test_img2dcm_object_is_kept_as_received_and_served_with_the_patient_index_of_the_moment(gw, fx, tmp_path):
    patient = add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "vlp.dcm", PatientID=patient["nhs"], IssuerOfPatientID="NHS",
                           PatientName="SENDER^AS^TYPED")
    result = receive(gw, sent, gov=governance(specialty="330", sensitivity="R", view="lateral",
                                              body_site={"code": "368209003", "laterality": "right"}))
    photo = result.photos[0]
    asset = load(gw, photo.asset_id)
    sent_ds = pydicom.dcmread(sent)

    # filed under the index's patient, as the sender's own object: UIDs kept, bytes untouched
    assert result.patient_id == patient["id"] and photo.status == "created"
    assert (asset.study_uid, asset.series_uid, asset.sop_instance_uid) == (
        sent_ds.StudyInstanceUID, sent_ds.SeriesInstanceUID, sent_ds.SOPInstanceUID)
    assert asset.sop_class_uid == objects.VL_PHOTO and asset.dicom_transfer_syntax == "1.2.840.10008.1.2.4.50"
    assert gw.blobs.read_bytes(asset.sha256) == sent.read_bytes()
    assert asset.dicom_sha256 == asset.sha256 and asset.original_kept and asset.media_type == "application/dicom"
    assert (asset.width, asset.height) == (640, 480)
    # governance from the capture request, the source from the door
    assert (asset.specialty, asset.sensitivity, asset.view, asset.laterality) == ("330", "R", "lateral", "right")
    assert (asset.source, asset.uploaded_by) == ("dimse", "ae:MODALITY1")
    preview = preview_of(gw, asset)
    assert preview.format == "JPEG" and max(preview.size) <= gw.settings.ingest.preview_size
    assert gw.blobs.exists(load(gw, asset.id).thumbnail_sha256)
    with gw.db.read() as s:
        stored = s.execute(select(AuditEvent).where(AuditEvent.type_code == audit.IMPORT)).scalars().one()
        assert (stored.agent_who, stored.agent_network, stored.subtype) == ("ae:MODALITY1", "10.1.2.3", "dimse")

    # served: the index's patient module, the sender's pixel data byte for byte, a valid VL Photographic object
    first = served(gw, asset.id)
    ds = as_dataset(first)
    assert str(ds.PatientName) == "Ó Súilleabháin^Siobhán" and ds.PatientID == patient["nhs"] and ds.IssuerOfPatientID == "NHS"
    assert ds.PatientBirthDate == "19800203" and ds.PatientSex == "F"
    assert [(i.PatientID, i.IssuerOfPatientID) for i in ds.OtherPatientIDsSequence] == [("M100", "RXX")]
    assert ds.SOPInstanceUID == sent_ds.SOPInstanceUID and ds.Laterality == "R"
    assert pixel_bytes(first) == sent_ds.PixelData
    assert "SENDER" not in validate(tmp_path, first)
    # the original stays as sent
    assert b"SENDER^AS^TYPED" in gw.blobs.read_bytes(asset.sha256)

    # a demographics update reaches the object at the next retrieve
    with gw.db.write() as s:
        s.get(Patient, patient["id"]).family_name = "Okonkwo-Smith"
    renamed = as_dataset(served(gw, asset.id))
    assert str(renamed.PatientName) == "Okonkwo-Smith^Siobhán" and renamed.PixelData == sent_ds.PixelData

    # a merge (A40) files it under the survivor: the survivor's ids, the merged record's NHS number as another id
    survivor = add_patient(gw, nhs=OTHER_NHS, mrn="M200", family="Adeyemi", given="Tola", visit=None)["id"]
    with gw.db.write() as s:
        index = PatientIndex(s, IndexActor(who="test-pas"))
        outcome = index.merge(PatientData(identifiers=[IdentifierData(NHS, OTHER_NHS)]), [IdentifierData(NHS, patient["nhs"])], None)
        audit.append_many(s, outcome.audit)
    assert load(gw, asset.id).patient_id == survivor
    merged = served(gw, asset.id)
    after = as_dataset(merged)
    assert str(after.PatientName) == "Adeyemi^Tola" and after.PatientID == OTHER_NHS
    assert (patient["nhs"], "NHS") in [(i.PatientID, i.IssuerOfPatientID) for i in after.OtherPatientIDsSequence]
    assert after.PixelData == sent_ds.PixelData
    validate(tmp_path, merged, "merged.dcm")
    with gw.db.read() as s:
        reads = s.execute(select(AuditEvent).where(AuditEvent.subtype == "retrieve")).scalars().all()
        assert len(reads) == 3 and {r.detail["rendition"] for r in reads} == {"dicom"}


def test_the_same_object_again_is_existing_and_other_content_under_its_uid_is_a_duplicate(gw, fx, tmp_path):
    patient = add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "a.dcm", PatientID=patient["nhs"], IssuerOfPatientID="NHS")
    first = receive(gw, sent).photos[0]
    assert receive(gw, sent).photos[0].status == "existing"
    # relayed by another sender: only the file meta differs, so it is the same object
    relayed = objects.with_file_meta(sent, tmp_path / "relayed.dcm", SourceApplicationEntityTitle="ROUTER")
    assert relayed.read_bytes() != sent.read_bytes()
    again = receive(gw, relayed).photos[0]
    assert (again.status, again.asset_id) == ("existing", first.asset_id)
    # another picture under the same SOP Instance UID
    other = objects.img2dcm(fx["gray.jpg"], tmp_path / "b.dcm", PatientID=patient["nhs"], IssuerOfPatientID="NHS",
                            SOPInstanceUID=first.sop_instance_uid)
    before = blob_names(gw)
    with pytest.raises(IngestRejected) as refused:
        receive(gw, other)
    assert refused.value.code == errors.DUPLICATE_INSTANCE and first.sop_instance_uid in refused.value.message
    assert asset_count(gw) == 1 and blob_names(gw) == before


def test_an_object_of_an_unknown_patient_is_refused_or_quarantined(gw, fx, tmp_path):
    add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "u.dcm", PatientID="RX99999", IssuerOfPatientID="RXX",
                           PatientName="UNKNOWN^PERSON")
    before = blob_names(gw)
    with pytest.raises(IngestRejected) as refused:
        receive(gw, sent)
    assert refused.value.code == errors.UNKNOWN_PATIENT and "RX99999" in refused.value.message
    assert asset_count(gw) == 0 and blob_names(gw) == before

    gw.settings.ingest.quarantine_unknown_patients = True
    held = receive(gw, sent).photos[0]
    asset = load(gw, held.asset_id)
    assert held.quarantined and asset.status == "quarantined"
    with gw.db.read() as s:
        idents = s.execute(select(PatientIdentifier).where(PatientIdentifier.patient_id == asset.patient_id)).scalars().all()
        assert [(i.value, i.assigner) for i in idents] == [("RX99999", "RXX")]
    second = objects.img2dcm(fx["gray.jpg"], tmp_path / "u2.dcm", PatientID="RX99999", IssuerOfPatientID="RXX")
    again = load(gw, receive(gw, second).photos[0].asset_id)
    assert again.patient_id == asset.patient_id  # one placeholder
    assert again.status == "quarantined"  # not registered by its first photo: the second is held too
    # hidden from every exit until a records officer reconciles it
    with pytest.raises(Refused) as hidden:
        served(gw, held.asset_id)
    assert hidden.value.kind == Kind.NOT_FOUND


def test_an_object_without_issuer_is_not_matched(gw, fx, tmp_path):
    patient = add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "n.dcm", PatientID=patient["nhs"])
    with pytest.raises(IngestRejected) as refused:
        receive(gw, sent)
    assert refused.value.code == errors.UNKNOWN_PATIENT and refused.value.field == "IssuerOfPatientID"
    assert "IssuerOfPatientID" in refused.value.message


def test_a_mistyped_nhs_number_is_refused_even_when_unknown_patients_are_quarantined(gw, tmp_path):
    gw.settings.ingest.quarantine_unknown_patients = True
    sent = objects.native(tmp_path / "typo.dcm", objects.gradient(60, 80), patient_id="9449305553")
    with pytest.raises(IngestRejected) as refused:
        receive(gw, sent)
    assert refused.value.code == errors.UNKNOWN_PATIENT and "not a valid NHS number" in refused.value.message
    assert asset_count(gw) == 0


def test_a_hospital_number_matches_by_its_assigning_authority(gw, fx, tmp_path):
    patient = add_patient(gw)  # MRN M100 assigned by RXX
    sent = objects.native(tmp_path / "mrn.dcm", objects.gradient(60, 80), patient_id="M100", issuer="RXX")
    assert receive(gw, sent).patient_id == patient["id"]


def test_request_and_object_must_name_the_same_patient(gw, tmp_path):
    add_patient(gw)
    other = add_patient(gw, nhs=OTHER_NHS, mrn="M200", visit=None)
    sent = objects.native(tmp_path / "o.dcm", objects.gradient(60, 80))
    with pytest.raises(IngestRejected) as refused:
        receive(gw, sent, patient=PatientRef.identifier("nhs", other["nhs"]))
    assert refused.value.code == errors.PATIENT_MISMATCH
    same = receive(gw, sent, patient=PatientRef.identifier("nhs", objects.NHS_NUMBER))
    assert same.photos[0].status == "created"


# --- objects made by pydicom: accepted encodings ----------------------------------------------------------


def _native_planar(path, pixels, sop_class=objects.SECONDARY_CAPTURE):
    ds = objects.dataset(sop_class, rows=pixels.shape[0], columns=pixels.shape[1])
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    ds["PixelData"].VR = "OB"
    return objects.write(ds, path)


def _secondary_capture(path, pixels):
    ds = objects.dataset(objects.SECONDARY_CAPTURE, rows=pixels.shape[0], columns=pixels.shape[1])
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return objects.write(ds, path)


def _dermoscopy_jpeg(path, fx):
    return objects.jpeg_wrapped(path, fx["baseline_420.jpg"].read_bytes(), 640, 480, sop_class=objects.DERMOSCOPY)


MAKERS = {
    "vl-jpeg-baseline": lambda p, fx: objects.jpeg_wrapped(p, fx["baseline_420.jpg"].read_bytes(), 640, 480),
    "dermoscopy-jpeg-baseline": _dermoscopy_jpeg,
    "sc-native-rgb": lambda p, fx: _secondary_capture(p, objects.gradient(2400, 3000)),
    "sc-native-rgb-by-plane": lambda p, fx: _native_planar(p, objects.gradient(300, 400)),
    "vl-implicit-grey": lambda p, fx: objects.native(p, objects.gradient(300, 400, 1), objects.ImplicitVRLittleEndian),
    "vl-jpeg-ls": lambda p, fx: objects.compressed(p, objects.gradient(300, 400), JPEGLSLossless),
    "vl-rle": lambda p, fx: objects.compressed(p, objects.gradient(300, 400), RLELossless),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_accepted_objects_are_kept_byte_for_byte_rendered_and_served(gw, fx, tmp_path, kind):
    patient = add_patient(gw)
    sent = MAKERS[kind](tmp_path / f"{kind}.dcm", fx)
    sent_ds = pydicom.dcmread(sent)
    photo = receive(gw, sent, gov=governance(specialty="330")).photos[0]
    asset = load(gw, photo.asset_id)
    assert gw.blobs.read_bytes(asset.sha256) == sent.read_bytes()
    assert (asset.sop_class_uid, asset.dicom_transfer_syntax) == (sent_ds.SOPClassUID, sent_ds.file_meta.TransferSyntaxUID)
    assert (asset.width, asset.height, asset.instance_number) == (sent_ds.Columns, sent_ds.Rows, 3)
    assert asset.device == "Acme DermCam 2" and asset.taken_at is not None and asset.patient_id == patient["id"]
    preview = preview_of(gw, asset)
    longest = gw.settings.ingest.preview_size
    assert max(preview.size) <= longest and max(preview.size) >= min(max(sent_ds.Rows, sent_ds.Columns), longest) * 0.5
    if sent_ds.SamplesPerPixel == 3 and "jpeg" not in kind:
        # the red square in the middle stays red: the samples were read in their order and colour model
        r, g, b = preview.convert("RGB").getpixel((preview.width // 2, preview.height // 2))
        assert r > 200 and g < 60 and b < 60
    data = served(gw, asset.id)
    out = as_dataset(data)
    assert str(out.PatientName) == "Ó Súilleabháin^Siobhán"
    if "jpeg-baseline" in kind:
        # the camera's EXIF in the frame is left out of what is served (served_pixels.py): the same pixels
        assert b"Exif" in sent_ds.PixelData and b"Exif" not in out.PixelData
        assert np.array_equal(np.asarray(out.pixel_array), np.asarray(sent_ds.pixel_array))
    else:
        assert out.PixelData == sent_ds.PixelData
    assert out.file_meta.TransferSyntaxUID == sent_ds.file_meta.TransferSyntaxUID
    if sent_ds.SOPClassUID == objects.VL_PHOTO:
        validate(tmp_path, data)


def test_a_large_native_object_is_reduced_in_place_for_its_preview(gw, tmp_path):
    add_patient(gw)
    sent = objects.native(tmp_path / "big.dcm", objects.gradient(4000, 6000))  # 72 MB of samples
    asset = load(gw, receive(gw, sent).photos[0].asset_id)
    preview = preview_of(gw, asset)
    assert max(preview.size) <= gw.settings.ingest.preview_size and preview.size[0] > preview.size[1]
    assert preview.convert("RGB").getpixel((preview.width // 2, preview.height // 2))[0] > 200


# --- refused objects: the rule named, nothing stored ------------------------------------------------------


def _ct(path, fx):
    ds = objects.dataset(objects.CT_IMAGE, rows=60, columns=80, samples=1, photometric="MONOCHROME2")
    ds.PixelData = objects.gradient(60, 80, 1).tobytes()
    return objects.write(ds, path)


def _jpeg_2000(path, fx):
    ds = objects.dataset(rows=60, columns=80)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    return objects.write(ds, path, objects.JPEG_2000)


def _short_pixels(path, fx):
    ds = objects.dataset(rows=300, columns=400)
    ds.PixelData = objects.gradient(200, 400).tobytes()  # Rows says 300
    return objects.write(ds, path)


def _jpeg_size_mismatch(path, fx):
    return objects.jpeg_wrapped(path, fx["baseline_420.jpg"].read_bytes(), 800, 480)  # the JPEG is 640 wide


def _jpeg_ls_size_mismatch(path, fx):
    sent = objects.compressed(path, objects.gradient(300, 400), JPEGLSLossless)
    ds = pydicom.dcmread(sent)
    ds.Rows = 320
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _multi_frame(path, fx):
    ds = objects.dataset(objects.SECONDARY_CAPTURE, rows=60, columns=80)
    ds.NumberOfFrames = 2
    ds.PixelData = objects.gradient(120, 80).tobytes()
    return objects.write(ds, path)


def _sixteen_bit(path, fx):
    ds = objects.dataset(objects.SECONDARY_CAPTURE, rows=60, columns=80, samples=1, photometric="MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = np.zeros((60, 80), np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return objects.write(ds, path)


def _no_planar_configuration(path, fx):
    ds = objects.dataset(rows=60, columns=80)
    del ds.PlanarConfiguration
    ds.PixelData = objects.gradient(60, 80).tobytes()
    return objects.write(ds, path)


def _photometric_mismatch(path, fx):
    ds = objects.dataset(rows=60, columns=80, samples=3, photometric="MONOCHROME2")
    ds.PixelData = objects.gradient(60, 80).tobytes()
    return objects.write(ds, path)


def _not_part10(path, fx):
    path.write_bytes(b"\x08\x00\x16\x00" + b"\x00" * 300)
    return path


def _truncated_jpeg(path, fx):
    """Cut short, as a transfer or a card can leave it: seen without decoding (no end-of-image), refused at once.
    A frame damaged inside but whole in form is tests/test_ingest_deferred.py's."""
    jpeg = fx["baseline_420.jpg"].read_bytes()
    return objects.jpeg_wrapped(path, jpeg[: len(jpeg) // 2] + b"\x00" * (len(jpeg) // 2 % 2), 640, 480)


REFUSED = {
    "ct-sop-class": (_ct, errors.SOP_CLASS_NOT_SUPPORTED, "SOPClassUID"),
    "jpeg-2000": (_jpeg_2000, errors.TRANSFER_SYNTAX_NOT_SUPPORTED, "TransferSyntaxUID"),
    "pixel-data-shorter-than-rows": (_short_pixels, errors.INVALID_OBJECT, "PixelData"),
    "jpeg-frame-not-columns": (_jpeg_size_mismatch, errors.INVALID_OBJECT, "PixelData"),
    "jpeg-ls-frame-not-rows": (_jpeg_ls_size_mismatch, errors.INVALID_OBJECT, "PixelData"),
    "multi-frame": (_multi_frame, errors.INVALID_OBJECT, "NumberOfFrames"),
    "sixteen-bit": (_sixteen_bit, errors.NOT_FAITHFUL, "BitsAllocated"),
    "no-planar-configuration": (_no_planar_configuration, errors.INVALID_OBJECT, "PlanarConfiguration"),
    "photometric-not-samples": (_photometric_mismatch, errors.INVALID_OBJECT, "PhotometricInterpretation"),
    "vl-colour-by-plane": (lambda p, fx: _native_planar(p, objects.gradient(60, 80), objects.VL_PHOTO), errors.INVALID_OBJECT,
                           "PlanarConfiguration"),
    "not-part-10": (_not_part10, errors.INVALID_OBJECT, None),
    "truncated-jpeg": (_truncated_jpeg, errors.CORRUPT, None),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_objects_that_break_a_rule_are_refused_naming_it_and_nothing_is_stored(gw, fx, tmp_path, kind):
    add_patient(gw)
    make, code, attribute = REFUSED[kind]
    good = objects.native(tmp_path / "good.dcm", objects.gradient(60, 80))
    bad = make(tmp_path / f"{kind}.dcm", fx)
    before = blob_names(gw)
    with pytest.raises(IngestRejected) as refused:
        receive(gw, good, bad)  # all or nothing: the good one is not stored either
    assert refused.value.code == code, refused.value.message
    assert refused.value.item == 1 and refused.value.filename == bad.name
    if attribute:
        assert refused.value.field == attribute
    assert asset_count(gw) == 0 and blob_names(gw) == before
    with gw.db.read() as s:
        failed = s.execute(select(AuditEvent).where(AuditEvent.outcome == audit.MINOR_FAILURE)).scalars().one()
        assert failed.detail["code"] == code and failed.subtype == "dimse"


def test_size_limits_and_the_request_pixel_budget_hold_for_objects(gw, fx, tmp_path):
    add_patient(gw)
    sent = objects.native(tmp_path / "n.dcm", objects.gradient(300, 400))
    gw.settings.ingest.max_bytes = 100_000
    with pytest.raises(IngestRejected) as refused:
        receive(gw, sent)
    assert refused.value.code == errors.TOO_LARGE
    gw.settings.ingest.max_bytes = 10_000_000
    gw.settings.ingest.max_pixels = 100_000
    with pytest.raises(IngestRejected) as refused:
        receive(gw, sent)
    assert refused.value.code == errors.TOO_MANY_PIXELS
    gw.settings.ingest.max_pixels = 200_000
    gw.settings.ingest.max_request_pixels = 200_000
    other = objects.native(tmp_path / "m.dcm", objects.gradient(300, 400))
    with pytest.raises(IngestRejected) as refused:
        receive(gw, sent, other)
    assert refused.value.code == errors.TOO_MANY_PIXELS and "request" in refused.value.message
    assert asset_count(gw) == 0


# --- objects clinphoto built go stale too: served with today's patient module --------------------------------


def test_an_uploaded_photo_is_served_with_the_patient_module_of_today(gw, fx, tmp_path):
    patient = add_patient(gw)
    photo = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], {"patient": f"nhs|{patient['nhs']}", "specialty": "330"},
                               UPLOADER)).photos[0]
    asset = load(gw, photo.asset_id)
    built = gw.blobs.read_bytes(asset.dicom_sha256)
    with gw.db.write() as s:
        s.get(Patient, patient["id"]).given_names = "Niamh"
    data = served(gw, asset.id)
    assert str(as_dataset(data).PatientName) == "Ó Súilleabháin^Niamh"
    assert "Siobh" in str(as_dataset(built).PatientName)  # the stored object itself is not rewritten
    assert pixel_bytes(data) == pixel_bytes(built)
    validate(tmp_path, data)


def test_a_hidden_photo_is_not_found_and_the_denial_audited(gw, fx):
    patient = add_patient(gw)
    photo = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], {"patient": f"nhs|{patient['nhs']}", "sensitivity": "V"},
                               UPLOADER)).photos[0]
    with pytest.raises(Refused) as hidden:
        served(gw, photo.asset_id)
    assert hidden.value.kind == Kind.NOT_FOUND
    with pytest.raises(Refused):
        served(gw, "0" * 32)
    with gw.db.read() as s:
        denials = s.execute(select(AuditEvent).where(AuditEvent.outcome == "4", AuditEvent.action == "R")).scalars().all()
        assert [d.entities[0]["id"] for d in denials] == [photo.asset_id, "0" * 32]
    # its uploader sees it (V: the uploader and the access list)
    assert as_dataset(served(gw, photo.asset_id, Subject(sub="dr.jones", role="clinician", scopes=("user/*.cruds",),
                                                           specialties=("330",)))).PatientID == patient["nhs"]


def test_dciodvfy_reports_no_error_on_served_img2dcm_objects(gw, fx, tmp_path):
    """dcmtk's own export lacks Laterality (Type 2C); the served object supplies it."""
    patient = add_patient(gw)
    sent = objects.img2dcm(fx["gray.jpg"], tmp_path / "g.dcm", PatientID=patient["mrn"], IssuerOfPatientID="RXX")
    report = subprocess.run([require_tool("dciodvfy", "dicom3tools"), str(sent)], capture_output=True, text=True)
    assert "Laterality" in report.stdout + report.stderr
    photo = receive(gw, sent).photos[0]
    validate(tmp_path, served(gw, photo.asset_id))
