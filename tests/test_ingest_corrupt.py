"""Issue 8 (2): truncated or lying JPEGs are refused as corrupt, with nothing stored and the refusal audited.

Pillow decodes these with grey where data is missing and ignores libjpeg's
"premature end of data segment" warning; the strict decode must not.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import simplejpeg
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from gateway.app import create_app
from gateway.core.ingest import errors
from gateway.core.ingest import prepare as prepare_module
from gateway.core.ingest.config import IngestSettings
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.prepare import prepare
from store.models import Asset, AuditEvent
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import add_patient, photo_fixtures

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")


def photo(**kw) -> bytes:
    return photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(640, 480, seed=11), quality=90, **kw)


def sos_end(data: bytes) -> int:
    at = data.index(b"\xff\xda")
    return at + 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]


def lying_frame_header(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    at = out.index(b"\xff\xc0")
    out[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def attack(name: str) -> bytes:
    base = photo()
    if name == "cut-short-eoi-appended":
        return base[: len(base) * 2 // 3] + b"\xff\xd9"
    if name == "cut-after-scan-header-eoi-appended":
        return base[: sos_end(base)] + b"\xff\xd9"
    if name == "frame-header-claims-more-pixels":
        return lying_frame_header(base, 1280, 960)
    if name == "frame-header-claims-more-rows":
        return lying_frame_header(base, 640, 496)
    if name == "progressive-cut-eoi-appended":  # re-coded by jpegtran before wrapping
        data = photo(progressive=True)
        return data[: len(data) // 2] + b"\xff\xd9"
    if name == "rotated-cut-eoi-appended":  # EXIF orientation 6: jpegtran turns it
        data = photo(exif=photo_fixtures.camera_exif(orientation=6).tobytes())
        return data[: len(data) * 2 // 3] + b"\xff\xd9"
    if name == "444-cut-eoi-appended":  # decoded and kept losslessly
        data = photo(subsampling=0)
        return data[: len(data) * 2 // 3] + b"\xff\xd9"
    raise AssertionError(name)


ATTACKS = [
    "cut-short-eoi-appended", "cut-after-scan-header-eoi-appended", "frame-header-claims-more-pixels",
    "frame-header-claims-more-rows", "progressive-cut-eoi-appended", "rotated-cut-eoi-appended", "444-cut-eoi-appended",
]


@pytest.fixture
def client(gw):
    with TestClient(create_app(gw)) as c:
        yield c


@pytest.mark.parametrize("name", ATTACKS)
def test_truncated_or_lying_jpeg_upload_is_refused_and_nothing_is_stored(client, gw, tmp_path, name):
    patient = add_patient(gw)
    before = {b.sha256 for b in gw.blobs.iter_blobs()}
    data = attack(name)
    files = [("files", (f"{name}.jpg", data, "image/jpeg")),
             ("metadata", (None, json.dumps({"patient": f"nhs|{patient['nhs']}"}), "application/json"))]
    r = client.post("/api/v1/photos", files=files, headers=auth_headers(gw, role="clinician"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == errors.CORRUPT and body["item"] == 0
    assert "corrupt" in body["message"] or "truncated" in body["message"]
    with gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 0
        refusals = s.execute(select(AuditEvent).where(AuditEvent.outcome == "4")).scalars().all()
        assert [e.detail["code"] for e in refusals] == [errors.CORRUPT]
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == before


def test_refusal_names_the_decoder_warning(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(attack("cut-short-eoi-appended"))
    with pytest.raises(IngestRejected) as info:
        prepare(path, IngestSettings())
    assert info.value.code == errors.CORRUPT
    assert "premature end of data segment" in info.value.message
    assert "send the original file again" in info.value.message


def test_jpeg_is_decoded_once_at_reduced_scale_for_check_and_renditions(tmp_path, monkeypatch):
    calls = []
    real = simplejpeg.decode_jpeg

    def counting(data, *args, **kw):
        out = real(data, *args, **kw)
        calls.append((kw.get("strict"), out.shape))
        return out

    monkeypatch.setattr(prepare_module.simplejpeg, "decode_jpeg", counting)
    path = tmp_path / "ok.jpg"
    path.write_bytes(photo())
    p = prepare(path, IngestSettings(preview_size=160, thumbnail_size=40))
    try:
        assert calls == [(True, (120, 160, 4))]  # one strict decode (RGBX), at 1/4 scale, feeds both renditions
        assert p.renditions.preview_size == (160, 120) and p.renditions.thumbnail_size == (40, 30)
    finally:
        p.close()


def test_renditions_match_the_photo(tmp_path):
    path = tmp_path / "ok.jpg"
    data = photo()
    path.write_bytes(data)
    p = prepare(path, IngestSettings(preview_size=320, thumbnail_size=80, preview_min_fraction=1.0))
    try:
        preview = np.asarray(Image.open(io.BytesIO(p.renditions.preview)).convert("RGB"), dtype=np.int16)
        expect = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((320, 240)), dtype=np.int16)
        assert np.abs(preview - expect).mean() < 6
    finally:
        p.close()


@pytest.mark.parametrize("name", ["cut-short-eoi-appended", "cut-after-scan-header-eoi-appended",
                                  "frame-header-claims-more-pixels", "444-cut-eoi-appended"])
def test_large_streams_are_checked_as_strictly_by_djpeg(tmp_path, monkeypatch, name):
    monkeypatch.setattr(prepare_module, "JOIN_LIMIT", 1024)  # every stream counts as large: FileView walk, djpeg decode
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(attack(name))
    with pytest.raises(IngestRejected) as info:
        prepare(bad, IngestSettings(), tmp_dir=tmp_path)
    assert info.value.code == errors.CORRUPT and "send the original file again" in info.value.message
    assert [x.name for x in tmp_path.iterdir()] == ["bad.jpg"]  # no temp file left behind


@pytest.mark.parametrize("kw", [{}, {"subsampling": 0}, {"progressive": True}])
def test_large_streams_decode_like_small_ones(tmp_path, monkeypatch, kw):
    path = tmp_path / "good.jpg"
    path.write_bytes(photo(**kw))
    small = prepare(path, IngestSettings(), tmp_dir=tmp_path)
    monkeypatch.setattr(prepare_module, "JOIN_LIMIT", 1024)
    large = prepare(path, IngestSettings(), tmp_dir=tmp_path)
    try:
        assert large.pixels.transfer_syntax == small.pixels.transfer_syntax
        assert b"".join(large.pixels.chunks()) == b"".join(small.pixels.chunks())  # same frame, JPEG or JPEG-LS
        for a, b in ((large.renditions.preview, small.renditions.preview), (large.renditions.thumbnail, small.renditions.thumbnail)):
            a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16) for x in (a, b))
            assert a.shape == b.shape and np.abs(a - b).mean() < 1
    finally:
        small.close()
        large.close()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.jpg"]


def test_chroma_subsampling_the_strict_decoder_cannot_check_is_refused_with_the_reason(tmp_path):
    data = bytearray(photo())  # 4:2:0: Y 2x2, Cb 1x1, Cr 1x1
    sof = data.index(b"\xff\xc0")
    assert data[sof + 14] == 0x11
    data[sof + 14] = 0x12  # Cb 1x2: no camera writes this, and libjpeg-turbo's strict decoder refuses it
    path = tmp_path / "odd.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(IngestRejected) as info:
        prepare(path, IngestSettings())
    assert info.value.code == errors.UNSUPPORTED_TYPE
    assert "2x2,1x2,1x1" in info.value.message and "4:2:0" in info.value.message
