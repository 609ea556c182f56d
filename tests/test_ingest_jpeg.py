"""Marker-level JPEG handling: subsampling, colour model, metadata removal, end of image."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, ImageCms

from gateway.core.objects import jpeg
from tests.ingest_helpers import photo_fixtures


def encode(**kw) -> bytes:
    return photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(64, 48), **kw)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


@pytest.mark.parametrize(
    "kw, label, photometric",
    [({"subsampling": 2}, "4:2:0", "YBR_FULL_422"), ({"subsampling": 1}, "4:2:2", "YBR_FULL_422"),
     ({"subsampling": 0}, "4:4:4", "YBR_FULL"), ({"keep_rgb": True}, "4:4:4", "RGB")],
)
def test_subsampling_and_photometric(kw, label, photometric):
    info = jpeg.parse(encode(quality=90, **kw))
    assert info.subsampling_label == label and info.photometric == photometric and info.baseline


def test_progressive_and_cmyk_are_recognised():
    assert jpeg.parse(encode(progressive=True)).progressive
    cmyk = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(32, 32).convert("CMYK"))
    assert jpeg.parse(cmyk).colour_model in ("CMYK", "YCCK")
    with pytest.raises(jpeg.JpegError):
        _ = jpeg.parse(cmyk).photometric


def joined(data: bytes, pieces) -> bytes:
    return b"".join(p if isinstance(p, bytes) else data[p[0] : p[1]] for p in pieces)


def test_clean_pieces_rebuild_jfif_and_adobe_drop_everything_else():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    base = encode(quality=90, icc_profile=srgb)
    extra = [segment(0xE0, b"AVI1\x00vendor"), segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<gps/>"),
             segment(0xED, b"Photoshop 3.0\x00IPTC city"), segment(0xEF, b"vendor serial 1234"), segment(0xFE, b"comment")]
    data = base[:2] + b"".join(extra) + base[2:] + b"TRAILER-AFTER-EOI"
    info = jpeg.parse(data)
    assert info.icc_profile == srgb
    clean = joined(data, jpeg.clean_pieces(data, info))
    for secret in (b"AVI1", b"xap/1.0", b"IPTC", b"serial", b"comment", b"ICC_PROFILE", b"TRAILER"):
        assert secret not in clean
    assert b"JFIF\x00" in clean
    assert clean.endswith(b"\xff\xd9")
    assert Image.open(io.BytesIO(clean)).size == (64, 48)
    adobe = photo_fixtures.jpeg_bytes(photo_fixtures.photo_like(32, 32), keep_rgb=True)
    info = jpeg.parse(adobe)
    assert b"Adobe" in joined(adobe, jpeg.clean_pieces(adobe, info))


def test_file_view_matches_bytes(tmp_path):
    data = encode(quality=80) + b"\x00" * 10
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    view = jpeg.FileView(path)
    try:
        a, b = jpeg.parse(view), jpeg.parse(data)
        assert (a.width, a.height, a.eoi_end, a.scan_start) == (b.width, b.height, b.eoi_end, b.scan_start)
        assert view[5:50] == data[5:50] and view[len(data) - 1] == data[-1]
        assert view.find(b"\xff\xd9", 0, chunk=7) == data.find(b"\xff\xd9")
    finally:
        view.close()


@pytest.mark.parametrize("keep", [-1, -3, -200, 3, 30, 300])
def test_truncation_anywhere_is_an_error(keep):
    data = encode(quality=80)
    with pytest.raises(jpeg.JpegError, match="truncated|corrupt"):
        jpeg.parse(data[:keep])
