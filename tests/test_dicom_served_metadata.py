"""A photo wrapped into DICOM as it came off a phone keeps its EXIF (GPS, serial numbers), XMP, comments and appended
previews inside the Pixel Data: dcmtk's img2dcm copies the JPEG whole. The stored original keeps them byte for byte,
for the roles allowed originals; every object served (WADO-RS, its frames, the C-GET/C-MOVE/routing encoding) leaves
them out, as an upload's served photo does, and decodes to the same pixels."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from gateway.app import create_app
from gateway.core.ingest.dicom_patients import patient_info
from gateway.core.objects import coerce, part10, transcode
from gateway.core.objects.served_pixels import served_frame, served_tail
from store.models import Asset, Patient
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient, dicom_tools_check, photo_fixtures
from tests.test_dicomweb import mi, parts, stow
from tests.test_photos_api import serving

EXIF = photo_fixtures.camera_exif(gps=True, private=True).tobytes()  # b"Exif\0\0..." with GPS and serial numbers
XMP = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description photoshop:City='PLANTED-Leeds'/></x:xmpmeta>"
SECRETS = (b"Exif", b"SERIAL-0123456789", b"PLANTED-Leeds", b"xmpmeta", b"PLANTED-COMMENT")
ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def phone_jpeg(fx) -> bytes:
    """The fixture photo as a phone leaves it: EXIF with GPS and serial numbers, XMP and a comment after its
    start-of-image marker."""
    base = fx["baseline_420.jpg"].read_bytes()
    assert base[:2] == b"\xff\xd8" and base.endswith(b"\xff\xd9")
    return base[:2] + segment(0xE1, EXIF) + segment(0xE1, XMP) + segment(0xFE, b"PLANTED-COMMENT ward 7 bed 3") + base[2:]


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@pytest.fixture
def web(gw):
    with serving(create_app(gw)) as client:
        yield client


def stored_object(gw, sop: str) -> tuple[Asset, bytes]:
    with gw.db.read() as s:
        asset = s.scalars(select(Asset).where(Asset.sop_instance_uid == sop)).one()
        s.expunge(asset)
    return asset, gw.blobs.path(asset.dicom_sha256).read_bytes()


def wrapped(sender: str, jpeg: bytes, tmp_path) -> Path:
    """The phone's JPEG in a DICOM object as a sender wraps it: dcmtk's img2dcm told to keep APPn segments (it keeps
    comments anyway), or the file as it is, encapsulated with pydicom."""
    (tmp_path / "phone.jpg").write_bytes(jpeg)
    if sender == "img2dcm --keep-appn":
        return objects.img2dcm(tmp_path / "phone.jpg", tmp_path / "phone.dcm", "--keep-appn", PatientID=objects.NHS_NUMBER,
                               IssuerOfPatientID="NHS")
    width, height = Image.open(io.BytesIO(jpeg)).size
    return objects.jpeg_wrapped(tmp_path / "phone.dcm", jpeg, width, height)


@pytest.mark.parametrize("sender", ["img2dcm --keep-appn", "pydicom, the file as it is"])
def test_a_phones_metadata_in_a_received_frame_is_left_out_of_every_served_object(gw, fx, web, tmp_path, sender):
    add_patient(gw)
    jpeg = phone_jpeg(fx)
    sent = wrapped(sender, jpeg, tmp_path)
    assert all(secret in sent.read_bytes() for secret in SECRETS)  # the sender kept them: the case this is for
    ds = pydicom.dcmread(sent)
    answer = stow(web, gw, [("application/dicom", sent.read_bytes(), {})])
    assert answer.status_code == 200, answer.text
    asset, original = stored_object(gw, ds.SOPInstanceUID)
    assert original == sent.read_bytes()  # the original, byte for byte: evidence, for the roles allowed originals
    base = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"

    # WADO-RS, as stored: the frame without the metadata, the same pixels, a valid object
    [(_head, body)] = parts(web.get(base, headers={**mi(gw), "Accept": ANY}))
    assert not [s for s in SECRETS if s in body], [s for s in SECRETS if s in body]
    served = pydicom.dcmread(io.BytesIO(body))
    [served_frame] = list(pydicom.encaps.generate_frames(served.PixelData))
    assert np.array_equal(pixels(served_frame), pixels(jpeg))
    (tmp_path / "served.dcm").write_bytes(body)
    dicom_tools_check(tmp_path / "served.dcm")
    # its frame as a JPEG, and as octet-stream as stored
    [(_head, frame)] = parts(web.get(f"{base}/frames/1", headers={**mi(gw), "Accept": 'multipart/related; type="image/jpeg"'}))
    assert frame == served_frame
    [(_head, raw)] = parts(web.get(f"{base}/frames/1", headers={
        **mi(gw), "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}))
    assert raw == served_frame

    # what C-GET, C-MOVE and routing send: the same bytes after the file meta, and the parsed form the same pixels
    with gw.db.read() as s:
        info = patient_info(s, s.get(Patient, asset.patient_id))
    obj = coerce.coerce(gw.blobs.path(asset.dicom_sha256), info)
    assert not obj.as_stored
    encoded = transcode.encoded_as_stored(obj)
    assert encoded is not None
    sent_bytes = b"".join(bytes(p) for p in encoded.pieces)
    assert not [s for s in SECRETS if s in sent_bytes] and body.endswith(sent_bytes)
    parsed = transcode.as_stored(obj)
    assert not [s for s in SECRETS if s in parsed.PixelData]
    assert len(body) == obj.size


def test_a_frame_without_metadata_is_served_as_stored(gw, fx, web, tmp_path):
    add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "plain.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    ds = pydicom.dcmread(sent)
    assert stow(web, gw, [("application/dicom", sent.read_bytes(), {})]).status_code == 200
    asset, original = stored_object(gw, ds.SOPInstanceUID)
    with gw.db.read() as s:
        info = patient_info(s, s.get(Patient, asset.patient_id))
    obj = coerce.coerce(gw.blobs.path(asset.dicom_sha256), info)
    assert obj.as_stored  # nothing read beyond the frame's head and end, nothing copied
    base = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    [(_head, body)] = parts(web.get(base, headers={**mi(gw), "Accept": ANY}))
    assert body[len(obj.header):] == original[obj.offset:]


def test_a_preview_appended_after_end_of_image_is_left_out_too(fx, tmp_path):
    """Ingest refuses such a frame (it must end with its end-of-image marker); an object stored before it did, or
    written into the store some other way, is served without what follows the marker."""
    jpeg = phone_jpeg(fx) + b"PLANTED-TRAILER GPS 53.80N" * 10
    width, height = Image.open(io.BytesIO(jpeg)).size
    path = objects.jpeg_wrapped(tmp_path / "trailer.dcm", jpeg, width, height)
    head = part10.read_head(path)
    with open(path, "rb") as f:
        tail = b"".join(p if isinstance(p, bytes) else part10.read_range(f, *p) for p in served_tail(path, head))
    assert b"PLANTED" not in tail and b"Exif" not in tail
    served = pydicom.dcmread(io.BytesIO(path.read_bytes()[: head.pixel_offset] + tail))
    [frame] = list(pydicom.encaps.generate_frames(served.PixelData))
    assert np.array_equal(pixels(frame), pixels(jpeg)) and served_frame(path, head) == frame


def second_jpeg_after_eoi(base: bytes) -> bytes:
    """A phone's appended preview: a whole second JPEG, its own EXIF with it, after the first one's end-of-image (the
    frame still ends with FFD9)."""
    preview = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(32, 24), exif=EXIF)
    return base + preview[:2] + segment(0xFE, b"PLANTED-PREVIEW-COMMENT") + preview[2:]


BYPASSES = {
    # the four ways a re-attack got metadata past a check of the frame's head and last bytes
    "second-jpeg-after-eoi": second_jpeg_after_eoi,
    "adobe-segment-padded-with-text": lambda base: base[:2] + segment(
        0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 1) + b"PLANTED-ADOBE " * 300) + base[2:],
    "comment-between-scan-and-eoi": lambda base: base[:-2] + segment(0xFE, b"PLANTED-COMMENT after the scan") + base[-2:],
}


def clean_jpeg() -> bytes:
    """A 640 x 480 photo with a JFIF header and nothing else: what is planted is then all there is to find."""
    base = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(640, 480), quality=90)
    assert b"Exif" not in base and base[2:4] == b"\xff\xe0"
    return base


@pytest.mark.parametrize("name", list(BYPASSES))
def test_metadata_anywhere_in_a_received_frame_is_left_out(gw, web, tmp_path, name):
    add_patient(gw)
    base = clean_jpeg()
    jpeg = BYPASSES[name](base)
    sent = objects.jpeg_wrapped(tmp_path / f"{name}.dcm", jpeg, 640, 480)
    assert b"PLANTED" in sent.read_bytes()
    ds = pydicom.dcmread(sent)
    answer = stow(web, gw, [("application/dicom", sent.read_bytes(), {})])
    assert answer.status_code == 200, answer.text
    url = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    [(_head, body)] = parts(web.get(url, headers={**mi(gw), "Accept": ANY}))
    [(_head, frame)] = parts(web.get(f"{url}/frames/1", headers={**mi(gw), "Accept": 'multipart/related; type="image/jpeg"'}))
    for served in (body, frame):
        assert b"PLANTED" not in served and b"Exif" not in served
    assert np.array_equal(pixels(frame), pixels(base))


def test_a_frame_with_a_marker_the_walk_cannot_read_is_not_served(gw, web, tmp_path):
    """A JPGn (FFF0) segment between the scan and end-of-image: ingest reads the frame's header and last bytes only,
    so it is stored (its renditions then fail); its frame is not sent at all rather than sent with what the walk could
    not judge."""
    add_patient(gw)
    base = clean_jpeg()
    end = base.rindex(b"\xff\xd9")
    sent = objects.jpeg_wrapped(tmp_path / "jpg0.dcm", base[:end] + segment(0xF0, b"PLANTED-JPG0") + base[end:], 640, 480)
    ds = pydicom.dcmread(sent)
    assert stow(web, gw, [("application/dicom", sent.read_bytes(), {})]).status_code == 200  # (ingest reads no further)
    url = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    for path, accept in ((url, ANY), (f"{url}/frames/1", 'multipart/related; type="image/jpeg"')):
        r = web.get(path, headers={**mi(gw), "Accept": accept})
        assert r.status_code == 404 and b"PLANTED" not in r.content, (path, r.status_code)  # as an unreadable file is


def test_a_frame_whose_header_holds_a_marker_no_decoder_reads_is_refused_at_ingest(gw, web, tmp_path):
    """A JPGn (FFF0) segment before the frame header: libjpeg-turbo does not decode such a stream and the walk cannot
    clean it, so it could never be shown or sent. It was stored and answered as a success all the same (found only by
    the renderer, after the answer); now the sender is told at once, and nothing is stored."""
    add_patient(gw)
    base = clean_jpeg()
    sent = objects.jpeg_wrapped(tmp_path / "jpg0.dcm", base[:2] + segment(0xF0, b"PLANTED-JPG0") + base[2:], 640, 480)
    ds = pydicom.dcmread(sent)
    r = stow(web, gw, [("application/dicom", sent.read_bytes(), {})])
    assert r.status_code == 409, r.text  # PS3.18: every instance failed
    failed = r.json()["00081198"]["Value"]  # FailedSOPSequence
    assert [f["00081155"]["Value"][0] for f in failed] == [ds.SOPInstanceUID]
    assert failed[0]["00081197"]["Value"] == [0xC000]  # FailureReason: cannot understand
    with gw.db.read() as s:
        assert s.scalars(select(Asset).where(Asset.sop_instance_uid == ds.SOPInstanceUID)).first() is None
