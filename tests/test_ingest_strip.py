"""Issue 8 (1): no EXIF, GPS, comment or planted text reaches the DICOM object, wherever it sits in the JPEG.

Each variant is a real photo with metadata put where the old header-only strip did
not look: between scans, after the last scan, in a JFXX thumbnail, behind the fixed
fields of JFIF and Adobe segments, after EOI. The whole Part 10 file and both
renditions are searched byte for byte, and the stored frame must decode to the
pixels of the photo before the surgery.
"""

from __future__ import annotations

import io
import struct
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image

from gateway.core.ingest.metadata import parse_metadata
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import ImageFile
from gateway.core.objects import jpeg
from store.models import Asset
from tests.conftest import require_tool
from tests.ingest_helpers import UPLOADER, add_patient, capture, photo_fixtures

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")

ACTOR = UPLOADER
EXIF = photo_fixtures.camera_exif(gps=True, private=True).tobytes()  # b"Exif\0\0..." with GPS, serials, owner
SECRETS = (
    b"Exif", b"GPS", b"SERIAL-0123456789", b"LENS-SN", b"Dr Owner", b"Artist Person", b"MAKERNOTE", b"PLANTED", b"JFXX",
    b"Photoshop", b"ICC_PROFILE",
)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def multi_scan_baseline(tmp_path) -> bytes:
    """A baseline (SOF0) JPEG with three non-interleaved scans, DHT segments between them (jpegtran -scans)."""
    require_tool("jpegtran", "libjpeg-turbo-progs")
    src, out, script = tmp_path / "one-scan.jpg", tmp_path / "multi.jpg", tmp_path / "scans.txt"
    photo_fixtures.photo_like(256, 192, seed=5).save(src, "JPEG", quality=90)
    script.write_text("0;\n1;\n2;\n")
    subprocess.run(["jpegtran", "-scans", str(script), "-outfile", str(out), str(src)], check=True, capture_output=True)
    data = out.read_bytes()
    info = jpeg.parse(data)
    assert info.baseline and data.count(b"\xff\xda") == 3
    return data


def second_scan(data: bytes) -> int:
    first = data.index(b"\xff\xda")
    return data.index(b"\xff\xda", first + 2)  # FF DA cannot occur inside entropy-coded data


def jfif_end(data: bytes) -> int:
    assert data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\x00"
    return 4 + struct.unpack(">H", data[4:6])[0]


def jfxx_thumbnail_with_exif() -> bytes:
    thumb = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(16, 16), exif=EXIF)
    assert b"SERIAL-0123456789" in thumb
    return segment(0xE0, b"JFXX\x00\x10" + thumb)  # extension code 0x10: thumbnail coded as JPEG


def variant(name: str, base: bytes) -> bytes:
    at2 = second_scan(base)
    eoi = len(base) - 2
    after_jfif = jfif_end(base)
    if name == "exif-gps-between-scans":
        return base[:at2] + segment(0xE1, EXIF) + base[at2:]
    if name == "exif-gps-after-last-scan":
        return base[:eoi] + segment(0xE1, EXIF) + base[eoi:]
    if name == "comment-and-apps-after-scans":
        return (base[:at2] + segment(0xFE, b"PLANTED-COMMENT ward 9 bed 2") + segment(0xED, b"Photoshop 3.0\x00PLANTED-IPTC")
                + base[at2:eoi] + segment(0xEF, b"PLANTED-APP15 serial 42") + segment(0xFE, b"PLANTED-LAST-COMMENT") + base[eoi:])
    if name == "jfxx-thumbnail-with-exif":
        return base[:after_jfif] + jfxx_thumbnail_with_exif() + base[after_jfif:]
    if name == "jfif-planted-thumbnail-and-trailer":
        fixed = bytearray(base[6:after_jfif][:14])
        fixed[12:14] = bytes([4, 2])  # a 4 x 2 RGB thumbnail follows: 24 bytes of "pixels"
        app0 = segment(0xE0, bytes(fixed) + b"PLANTED-JFIF-THUMB-DATA!" + b"PLANTED-JFIF-TRAILER")
        return base[:2] + app0 + base[after_jfif:]
    if name == "adobe-planted-trailer":
        adobe = segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 1) + b"PLANTED-ADOBE-TRAILER")
        return base[:after_jfif] + adobe + base[after_jfif:]
    if name == "garbage-between-segments-and-fill-bytes":
        # bytes outside any segment after an APP segment between scans, fill bytes before the next marker and EOI
        return (base[:at2] + segment(0xE2, b"PLANTED-APP2") + b"PLANTED-GARBAGE" + b"\xff\xff" + base[at2:eoi]
                + b"\xff\xff\xff" + base[eoi:])
    if name == "junk-after-eoi":
        return base + b"PLANTED-TRAILER GPS 51.507N" * 20
    raise AssertionError(name)


VARIANTS = [
    "exif-gps-between-scans", "exif-gps-after-last-scan", "comment-and-apps-after-scans", "jfxx-thumbnail-with-exif",
    "jfif-planted-thumbnail-and-trailer", "adobe-planted-trailer", "garbage-between-segments-and-fill-bytes", "junk-after-eoi",
]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def stored(gw, asset_id: str) -> Asset:
    with gw.db.read() as s:
        row = s.get(Asset, asset_id)
        s.expunge(row)
        return row


@pytest.mark.parametrize("name", VARIANTS)
def test_metadata_anywhere_in_the_stream_never_reaches_dicom(gw, tmp_path, name):
    base = multi_scan_baseline(tmp_path)
    attacked = variant(name, base)
    source = tmp_path / f"{name}.jpg"
    source.write_bytes(attacked)
    patient = add_patient(gw)
    result = ingest(gw, capture([ImageFile(source, source.name)], parse_metadata({"patient": f"nhs|{patient['nhs']}"}), ACTOR))
    asset = stored(gw, result.photos[0].asset_id)
    part10 = gw.blobs.read_bytes(asset.dicom_sha256)
    for blob in (part10, gw.blobs.read_bytes(asset.preview_sha256), gw.blobs.read_bytes(asset.thumbnail_sha256)):
        for secret in SECRETS:
            assert secret not in blob, (name, secret)
    ds = pydicom.dcmread(io.BytesIO(part10))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    frame = b"".join(pydicom.encaps.generate_fragments(ds.PixelData))
    frame = frame[: frame.rindex(b"\xff\xd9") + 2]
    # a minimal JFIF APP0 right after SOI: identifier, version, units, densities, no thumbnail
    assert frame[2:4] == b"\xff\xe0" and struct.unpack(">H", frame[4:6])[0] == 16 and frame[6:11] == b"JFIF\x00"
    assert frame[18:20] == b"\x00\x00"
    if name == "adobe-planted-trailer":
        at = frame.index(b"\xff\xee")
        assert struct.unpack(">H", frame[at + 2 : at + 4])[0] == 14 and frame[at + 4 : at + 9] == b"Adobe"
    assert np.array_equal(pixels(frame), pixels(base)), "stripping changed the pixels"
    assert (ds.Columns, ds.Rows) == (256, 192)


def test_single_scan_phone_photo_with_exif_after_the_scan(gw, fx, tmp_path):
    base = fx["baseline_420.jpg"].read_bytes()
    attacked = base[:-2] + segment(0xE1, EXIF) + segment(0xFE, b"PLANTED owner Dr Owner") + base[-2:]
    source = tmp_path / "late-exif.jpg"
    source.write_bytes(attacked)
    patient = add_patient(gw)
    result = ingest(gw, capture([ImageFile(source)], parse_metadata({"patient": f"nhs|{patient['nhs']}"}), ACTOR))
    asset = stored(gw, result.photos[0].asset_id)
    part10 = gw.blobs.read_bytes(asset.dicom_sha256)
    for secret in SECRETS:
        assert secret not in part10, secret
    frame = b"".join(pydicom.encaps.generate_fragments(pydicom.dcmread(io.BytesIO(part10)).PixelData))
    assert np.array_equal(pixels(frame.rstrip(b"\x00")), pixels(base))


# --- the marker walk itself ---------------------------------------------------------------


def clean(data) -> bytes:
    info = jpeg.parse(data, find_end=False)
    return b"".join(p if isinstance(p, bytes) else bytes(data[p[0] : p[1]]) for p in jpeg.clean_pieces(data, info))


def test_walk_keeps_restart_markers_and_stuffed_bytes(tmp_path):
    image = photo_fixtures.photo_like(200, 120, seed=9)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, restart_marker_blocks=3)
    data = out.getvalue()
    assert any(bytes([0xFF, m]) in data for m in range(0xD0, 0xD8)) and b"\xff\x00" in data
    attacked = data[:-2] + segment(0xE1, EXIF) + data[-2:]
    cleaned = clean(attacked)
    sos = data.index(b"\xff\xda")
    assert cleaned.endswith(data[sos:])  # scan data (RSTn, FF00 stuffing) copied byte for byte, the APP1 is gone
    assert b"Exif" not in cleaned
    path = tmp_path / "rst.jpg"
    path.write_bytes(attacked)
    view = jpeg.FileView(path)
    try:
        assert clean(view) == cleaned  # the chunked file walk agrees with the in-memory one
    finally:
        view.close()


def test_walk_over_a_file_crosses_chunk_boundaries(tmp_path):
    data = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(300, 200, seed=3), quality=92)
    attacked = data[:-2] + segment(0xFE, b"PLANTED") + data[-2:]
    path = tmp_path / "x.jpg"
    path.write_bytes(attacked)
    view = jpeg.FileView(path)
    try:
        info = jpeg.parse(view, find_end=False)
        for chunk in (2, 3, 7, 1000):
            pieces = jpeg.clean_pieces(view, info, chunk=chunk)
            assert b"".join(p if isinstance(p, bytes) else view[p[0] : p[1]] for p in pieces) == clean(attacked)
    finally:
        view.close()


@pytest.mark.parametrize("tail", [b"", b"\xff", b"\xff\xe1\x00\x40Exif"])
def test_no_end_of_image_is_truncated(tail):
    data = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(64, 48), quality=80)
    with pytest.raises(jpeg.JpegError, match="truncated"):
        clean(data[:-2] + tail)


def test_unknown_marker_after_the_scan_is_corrupt():
    data = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(64, 48), quality=80)
    with pytest.raises(jpeg.JpegError, match="unexpected marker 0xF0"):
        clean(data[:-2] + segment(0xF0, b"JPG0") + data[-2:])
