"""Preview and thumbnail: upright whatever the EXIF orientation, sized, metadata-free, draft-decoded."""

from __future__ import annotations

import io
import subprocess

import pytest
from PIL import Image

from gateway.core.ingest.config import IngestSettings
from gateway.core.ingest.prepare import prepare
from gateway.core.ingest.renditions import decode_target, fit, from_image
from tests.conftest import require_tool
from tests.ingest_helpers import photo_fixtures


def near(a, b, tol=45) -> bool:
    return all(abs(x - y) < tol for x, y in zip(a, b))


@pytest.mark.parametrize("name", [f"orient_{n}.jpg" for n in range(1, 9)] + ["orient_6.png", "orient_6_odd.jpg"])
def test_renditions_are_upright(fx, name):
    p = prepare(fx[name], IngestSettings(preview_size=64, thumbnail_size=32))
    try:
        for data in (p.renditions.preview, p.renditions.thumbnail):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            assert image.width > image.height  # the upright picture is landscape
            w, h = image.size
            q = photo_fixtures.QUADRANTS
            assert near(image.getpixel((w // 6, h // 6)), q["top_left"]), name
            assert near(image.getpixel((w - 1 - w // 6, h - 1 - h // 6)), q["bottom_right"]), name
    finally:
        p.close()


def test_sizes_and_no_metadata(fx, tmp_path):
    p = prepare(fx["gps.jpg"], IngestSettings(preview_size=320, thumbnail_size=100, preview_min_fraction=1.0))
    try:
        preview = Image.open(io.BytesIO(p.renditions.preview))
        thumb = Image.open(io.BytesIO(p.renditions.thumbnail))
        assert preview.size == (320, 240) and thumb.size == (100, 75)
        for data in (p.renditions.preview, p.renditions.thumbnail):
            assert b"Exif" not in data and b"GPS" not in data and b"ICC_PROFILE" not in data
            f = tmp_path / "r.jpg"
            f.write_bytes(data)
            tags = subprocess.run([require_tool("exiftool", "libimage-exiftool-perl"), "-a", "-G1", str(f)], capture_output=True).stdout
            assert b"GPS" not in tags and b"Canon" not in tags
    finally:
        p.close()


def test_jpeg_renditions_come_from_a_reduced_decode(fx):
    # 640 x 480 with a 160 px preview: the decoder may stop at 152 x 114, so its 1/4 scale (160 x 120) will do
    assert decode_target(640, 480, 160, 0.95) == (152, 114)
    p = prepare(fx["baseline_420.jpg"], IngestSettings(preview_size=160, thumbnail_size=40))
    try:
        assert p.renditions.preview_size == (160, 120) and p.renditions.thumbnail_size == (40, 30)
    finally:
        p.close()


def test_from_image_turns_and_shrinks():
    image = photo_fixtures.quadrant_image(96, 64).transpose(Image.Transpose.ROTATE_90)
    r = from_image(image, 6, preview=48, thumbnail=24, quality=80)
    assert r.preview_size == (48, 32) and r.thumbnail_size == (24, 16)


def test_fit_never_enlarges():
    assert fit(100, 50, 2048) == (100, 50)
    assert fit(4000, 3000, 2048) == (2048, 1536)
    assert fit(3000, 4000, 256) == (192, 256)
