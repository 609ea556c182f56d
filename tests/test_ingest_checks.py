"""Content sniffing, limits and safe decoding: every adversarial fixture is refused with a specific reason."""

from __future__ import annotations

import time

import pytest
from PIL import Image, ImageFile

from gateway.core.ingest import errors
from gateway.core.ingest.config import IngestSettings
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.prepare import prepare
from gateway.core.ingest.sniff import sniff


def refused(path, settings=None) -> IngestRejected:
    with pytest.raises(IngestRejected) as info:
        prepare(path, settings or IngestSettings())
    return info.value


@pytest.mark.parametrize(
    "name, found",
    [("html.jpg", "HTML"), ("svg.jpg", "SVG"), ("pdf.jpg", "PDF"), ("zip.jpg", "ZIP"), ("empty.jpg", "empty")],
)
def test_disguised_files_are_refused_by_content_not_name(fx, name, found):
    exc = refused(fx[name])
    assert exc.code == errors.UNSUPPORTED_TYPE
    assert found in exc.message


def test_sniff_accepts_by_content_only():
    assert sniff(b"\xff\xd8\xff\xe0" + b"\x00" * 20).kind == "jpeg"
    assert sniff(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20).kind == "png"
    assert sniff(b"II*\x00" + b"\x00" * 20).kind == "tiff"
    assert sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic").kind == "heif"
    with pytest.raises(IngestRejected, match="GIF"):
        sniff(b"GIF89a" + b"\x00" * 20)


@pytest.mark.parametrize("name", ["truncated.jpg", "truncated.png"])
def test_truncated_images_are_refused_as_corrupt(fx, name):
    exc = refused(fx[name])
    assert exc.code == errors.CORRUPT
    assert "truncated" in exc.message


@pytest.mark.parametrize("name", ["bomb.jpg", "bomb.png"])
def test_decompression_bomb_is_refused_from_the_header_without_decoding(fx, name, monkeypatch):
    # Any decode attempt would be a failure of the check: make Pillow's loader explode if reached.
    def no_decode(self, *a, **k):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    started = time.perf_counter()
    exc = refused(fx[name])
    assert exc.code == errors.TOO_MANY_PIXELS
    assert "refused without decoding" in exc.message and "megapixels" in exc.message
    assert time.perf_counter() - started < 2


def test_pixel_limit_is_configurable(fx):
    exc = refused(fx["baseline_420.jpg"], IngestSettings(max_pixels=640 * 480 - 1))
    assert exc.code == errors.TOO_MANY_PIXELS and "640 x 480" in exc.message
    assert prepare(fx["baseline_420.jpg"], IngestSettings(max_pixels=640 * 480)).width == 640


def test_size_limit(fx):
    size = fx["baseline_420.jpg"].stat().st_size
    exc = refused(fx["baseline_420.jpg"], IngestSettings(max_bytes=size - 1))
    assert exc.code == errors.TOO_LARGE


@pytest.mark.parametrize(
    "name, words",
    [("cmyk.jpg", "CMYK"), ("cmyk.tif", "CMYK"), ("gray16.png", "16-bit"), ("rgb16.tif", "16-bit"), ("transparent.png", "transparent")],
)
def test_unfaithful_images_are_refused_with_the_reason(fx, name, words):
    exc = refused(fx[name])
    assert exc.code == errors.NOT_FAITHFUL
    assert words in exc.message


def test_heic_is_accepted_and_encoded_once_with_its_history(fx):
    p = prepare(fx["photo.heic"], IngestSettings())
    try:
        assert p.kind == "heif" and p.media_type == "image/heic"
        assert p.derived
        assert [m for m, _ in p.pixels.lossy] == ["ISO_23008_2", "ISO_10918_1"]
        assert all(r > 1 for _, r in p.pixels.lossy)
        assert p.pixels.photometric == "YBR_FULL_422"
    finally:
        p.close()


def test_exif_facts_are_read(fx):
    p = prepare(fx["gps.jpg"], IngestSettings())
    try:
        assert p.facts.make == "Canon" and p.facts.model == "Canon EOS R6"
        assert p.facts.has_gps
        assert p.facts.taken_at.isoformat() == "2024-03-05T14:22:31+01:00"
    finally:
        p.close()


def test_without_jpegtran_a_progressive_jpeg_is_encoded_once_and_says_so(fx, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # jpegtran cannot be found
    p = prepare(fx["progressive.jpg"], IngestSettings())
    try:
        assert p.derived and "jpegtran (libjpeg-turbo-progs) is not installed" in p.derivation
        assert [m for m, _ in p.pixels.lossy] == ["ISO_10918_1", "ISO_10918_1"]
    finally:
        p.close()
