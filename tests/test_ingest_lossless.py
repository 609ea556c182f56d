"""Issue 8 (4): lossless sources are stored compressed (JPEG-LS lossless), exactly, and a request has a pixel budget.

A 12 KB 1-bit 10000 x 10000 PNG used to become a 100 MB uncompressed DICOM object;
five of them in one request cost half a gigabyte of memory.
"""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from sqlalchemy import func, select

from gateway.app import create_app
from gateway.core.ingest import errors
from gateway.core.ingest import pipeline as pipeline_module
from gateway.core.ingest.metadata import parse_metadata
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import ImageFile
from store.models import Asset, AuditEvent
from tests.auth_helpers import auth_headers
from tests.conftest import require_tool
from tests.ingest_helpers import UPLOADER, add_patient, capture, photo_fixtures

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")

ACTOR = UPLOADER
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def one_bit_png(path, size: int = 10000):
    """A drawing saved as a 1-bit PNG: a few KB on disk, 100 MP when decoded."""
    image = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(image)
    draw.rectangle([size // 5, size // 5, size // 3, size // 2], fill=0)
    image.save(path, "PNG", optimize=True)
    return path


def stored(gw, asset_id: str) -> Asset:
    with gw.db.read() as s:
        row = s.get(Asset, asset_id)
        s.expunge(row)
        return row


def source_pixels(path) -> np.ndarray:
    image = Image.open(path)
    return np.asarray(image.convert("L" if image.mode in ("1", "L") else "RGB"))


def rendered_by_dcmtk(dcm_path) -> np.ndarray:
    require_tool("dcml2pnm", "dcmtk")
    out = dcm_path.with_suffix(".png")
    subprocess.run(["dcml2pnm", "+on", str(dcm_path), str(out)], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out))


def store_one(gw, path):
    patient = add_patient(gw)
    result = ingest(gw, capture([ImageFile(path, path.name)], parse_metadata({"patient": f"nhs|{patient['nhs']}"}), ACTOR))
    return stored(gw, result.photos[0].asset_id)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the test's own 100 MP reads
def test_one_bit_10000_square_png_is_a_small_exact_object(gw, tmp_path):
    png = one_bit_png(tmp_path / "scan.png")
    assert png.stat().st_size < 32_000
    asset = store_one(gw, png)
    assert asset.dicom_transfer_syntax == JPEG_LS_LOSSLESS
    assert asset.dicom_size < 2_000_000, f"{asset.dicom_size} bytes: not compressed"  # was 100,001,030
    dcm = tmp_path / "scan.dcm"
    dcm.write_bytes(gw.blobs.read_bytes(asset.dicom_sha256))
    ds = pydicom.dcmread(dcm)
    assert ds.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS and ds.LossyImageCompression == "00"
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (10000, 10000, 1, "MONOCHROME2")
    items = list(pydicom.encaps.generate_fragments(ds.PixelData))
    assert len(items) == 2 and items[0] == b""  # an empty Basic Offset Table, then one fragment: the codestream
    expect = source_pixels(png)
    assert set(np.unique(expect)) == {0, 255}
    assert np.array_equal(ds.pixel_array, expect)
    assert np.array_equal(rendered_by_dcmtk(dcm), expect)


@pytest.mark.parametrize("name", ["rgb.png", "gray.png", "palette.png", "rgb.tif", "orient_6.png", "baseline_444.jpg", "rgb_coded.jpg"])
def test_lossless_sources_decode_to_exactly_the_stored_pixels(gw, fx, tmp_path, name):
    asset = store_one(gw, fx[name])
    assert asset.dicom_transfer_syntax == JPEG_LS_LOSSLESS
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(gw.blobs.read_bytes(asset.dicom_sha256))
    ds = pydicom.dcmread(dcm)
    if name.endswith(".jpg"):  # the decoded JPEG: the pixels every decoder agrees on, kept without further loss
        expect = np.asarray(Image.open(fx[name]).convert("RGB"))
        assert ds.LossyImageCompression == "01"
    elif name == "orient_6.png":
        expect = np.asarray(Image.open(fx[name]).convert("RGB").transpose(Image.Transpose.ROTATE_270))
    else:
        expect = source_pixels(fx[name])
    assert np.array_equal(ds.pixel_array, expect)
    assert np.array_equal(rendered_by_dcmtk(dcm), expect)
    assert asset.dicom_size < expect.nbytes  # smaller than the raw pixels


def test_a_png_of_noise_that_codes_longer_than_its_pixels_is_stored_exactly(gw, tmp_path):
    """JPEG-LS codes incompressible pixels longer than they are: CharLS's destination estimate (the raw size) was too
    small, and the whole `clinphoto import` stopped at such a file ("CharLS error 3")."""
    png = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (400, 600, 3), dtype=np.uint8)).save(png)
    asset = store_one(gw, png)
    assert asset.dicom_transfer_syntax == JPEG_LS_LOSSLESS
    assert asset.dicom_size > 400 * 600 * 3  # longer than the raw pixels, as noise codes
    ds = pydicom.dcmread(io.BytesIO(gw.blobs.read_bytes(asset.dicom_sha256)))
    assert np.array_equal(ds.pixel_array, source_pixels(png))


@pytest.fixture
def client(gw):
    with TestClient(create_app(gw)) as c:
        yield c


def test_request_over_the_pixel_budget_is_refused_from_the_headers_with_nothing_stored(client, gw, fx, monkeypatch):
    def no_decode(*args, **kw):
        raise AssertionError("a file was decoded before the request's pixel budget was checked")

    monkeypatch.setattr(pipeline_module, "prepare", no_decode)
    gw.settings.ingest.max_request_pixels = 640 * 480 * 2 - 1  # two 640 x 480 photos are one pixel too many
    patient = add_patient(gw)
    before = {b.sha256 for b in gw.blobs.iter_blobs()}
    files = [("files", (n, fx[n].read_bytes(), "image/jpeg")) for n in ("baseline_420.jpg", "rgb.png")]
    files.append(("metadata", (None, json.dumps({"patient": f"nhs|{patient['nhs']}"}), "application/json")))
    r = client.post("/api/v1/photos", files=files, headers=auth_headers(gw, role="clinician"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == errors.TOO_MANY_PIXELS
    assert "0.6 megapixels" in body["message"] and "max_request_pixels" in body["message"]
    with gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 0
        refusals = s.execute(select(AuditEvent).where(AuditEvent.outcome == "4")).scalars().all()
        assert [e.detail["code"] for e in refusals] == [errors.TOO_MANY_PIXELS]
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == before


def test_default_budget_takes_fifty_24_mp_photos():
    from gateway.core.ingest.config import IngestSettings

    assert IngestSettings().max_request_pixels >= 50 * 24_000_000


def test_request_within_the_budget_is_stored(gw, fx):
    gw.settings.ingest.max_request_pixels = 640 * 480 * 2
    patient = add_patient(gw)
    result = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"]), ImageFile(fx["rgb.png"])],
                    parse_metadata({"patient": f"nhs|{patient['nhs']}"}), ACTOR))
    assert len(result.photos) == 2


def test_jpeg_ls_codestream_is_what_pydicom_reads_back(tmp_path):
    from gateway.core.objects import vlphoto

    image = photo_fixtures.photo_like(33, 17)  # odd sizes: padding to an even length
    pixels = vlphoto.jpeg_ls_lossless(np.asarray(image), 33, 17, 3, [], None)
    assert pixels.transfer_syntax == JPEG_LS_LOSSLESS and pixels.photometric == "RGB"
    out = io.BytesIO()
    ds = vlphoto.build_dataset(pixels=pixels, patient=vlphoto.PatientInfo("1", "NHS"), study=vlphoto.StudyInfo("2.25.1"),
                               series=vlphoto.SeriesInfo("2.25.2", 1), image=vlphoto.ImageInfo("2.25.3", 1))
    vlphoto.write_part10(out, ds, pixels)
    back = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert np.array_equal(back.pixel_array, np.asarray(image))


def test_charls_c_api_and_pyjpegls_give_the_same_codestream(monkeypatch):
    import jpeg_ls

    from gateway.core.objects import jpegls

    rng = np.random.default_rng(4)
    for shape, components in (((17, 33, 3), 3), ((40, 21), 1)):
        samples = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = jpegls.encode(samples, shape[1], shape[0], components)
        interleave = 2 if components == 3 else None
        assert ours == bytes(jpeg_ls.encode_buffer(samples.tobytes(), shape[0], shape[1], components, 8, interleave_mode=interleave))
        monkeypatch.setattr(jpegls, "_charls", lambda: None)  # a pyjpegls build without the C API: same bytes
        assert jpegls.encode(samples, shape[1], shape[0], components) == ours
        monkeypatch.undo()
        assert np.array_equal(jpeg_ls.decode(np.frombuffer(ours, np.uint8)), samples)


@pytest.mark.parametrize("mode", ["1", "L", "RGB"])
def test_samples_are_filled_band_by_band_like_tobytes(mode, monkeypatch):
    from gateway.core.ingest import prepare
    from gateway.core.ingest.prepare import _samples

    monkeypatch.setattr(prepare, "_BAND_BYTES", 5000)  # many bands, the last one short
    image = photo_fixtures.photo_like(301, 257).convert(mode)
    expect = image.tobytes("raw", "L") if mode == "1" else image.tobytes()
    assert _samples(image).tobytes() == expect
