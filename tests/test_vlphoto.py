"""VL Photographic Image objects: conformant (dciodvfy, dcmdump, dcmj2pnm), truthful, upright, private."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from gateway.dicom import vlphoto
from gateway.dicom.uids import is_valid_uid, new_uid, stable_uid
from gateway.ingest.config import IngestSettings
from gateway.ingest.prepare import prepare
from tests.conftest import require_tool
from tests.ingest_helpers import dicom_tools_check, photo_fixtures

ACCEPTED = [
    "baseline_420.jpg", "baseline_422.jpg", "baseline_444.jpg", "rgb_coded.jpg", "progressive.jpg", "gray.jpg",
    "gps.jpg", "orient_6_odd.jpg", "rgb.png", "gray.png", "palette.png", "orient_6.png", "rgb.tif", "photo.heic",
] + [f"orient_{n}.jpg" for n in range(1, 9)]



@pytest.fixture(autouse=True)
def _tools():
    require_tool("dciodvfy", "dicom3tools")
    require_tool("dcmdump", "dcmtk")
    require_tool("dcmj2pnm", "dcmtk")
    require_tool("jpegtran", "libjpeg-turbo-progs")


def build(path: Path, out_dir: Path, settings: IngestSettings | None = None, **kw) -> Path:
    p = prepare(path, settings or IngestSettings())
    try:
        ds = vlphoto.build_dataset(
            pixels=p.pixels,
            patient=kw.get("patient") or vlphoto.PatientInfo("9449305552", "NHS", "Ó Súilleabháin", "Siobhán", None, None, "F", [("M100", "RXX")]),
            study=vlphoto.StudyInfo(new_uid(), study_id="V100"),
            series=vlphoto.SeriesInfo(new_uid(), 1, operator="Jones^Amy"),
            image=vlphoto.ImageInfo(kw.get("sop") or new_uid(), 1, p.facts.taken_at, derived=p.derived, derivation=p.derivation),
            equipment=vlphoto.Equipment(p.facts.make, p.facts.model, p.facts.software),
            body_site=vlphoto.BodySite("368209003", "Right upper arm", "right"),
        )
        out = out_dir / (path.name + ".dcm")
        with open(out, "wb") as f:
            vlphoto.write_part10(f, ds, p.pixels)
        return out
    finally:
        p.close()


def values(v) -> list:
    return [v] if isinstance(v, (str, float, int)) or not hasattr(v, "__iter__") else list(v)


def render(dcm: Path) -> Image.Image:
    png = dcm.with_suffix(".render.png")
    subprocess.run(["dcmj2pnm", "+on", str(dcm), str(png)], check=True, capture_output=True)
    return Image.open(png).convert("RGB")


@pytest.mark.parametrize("name", ACCEPTED)
def test_every_object_passes_dciodvfy_dcmdump_and_dcmj2pnm(fx, tmp_path, name):
    dcm = build(fx[name], tmp_path)
    dump = dicom_tools_check(dcm)
    assert "VLPhotographicImageStorage" in dump
    ds = pydicom.dcmread(dcm)
    assert ds.Modality == "XC" and ds.SOPClassUID == vlphoto.VL_PHOTOGRAPHIC_IMAGE
    assert ds.BitsAllocated == 8 and ds.BitsStored == 8 and ds.HighBit == 7


@pytest.mark.parametrize(
    "name, ts, photometric, lossy",
    [
        ("baseline_420.jpg", "1.2.840.10008.1.2.4.50", "YBR_FULL_422", "01"),
        ("baseline_422.jpg", "1.2.840.10008.1.2.4.50", "YBR_FULL_422", "01"),
        ("gray.jpg", "1.2.840.10008.1.2.4.50", "MONOCHROME2", "01"),
        ("progressive.jpg", "1.2.840.10008.1.2.4.50", "YBR_FULL_422", "01"),
        # 4:4:4 and RGB-coded: the IOD allows only YBR_FULL_422 with JPEG, so the decoded pixels are kept losslessly
        ("baseline_444.jpg", "1.2.840.10008.1.2.1", "RGB", "01"),
        ("rgb_coded.jpg", "1.2.840.10008.1.2.1", "RGB", "01"),
        ("rgb.png", "1.2.840.10008.1.2.1", "RGB", "00"),
        ("gray.png", "1.2.840.10008.1.2.1", "MONOCHROME2", "00"),
        ("photo.heic", "1.2.840.10008.1.2.4.50", "YBR_FULL_422", "01"),
    ],
)
def test_transfer_syntax_and_photometric_are_truthful(fx, tmp_path, name, ts, photometric, lossy):
    ds = pydicom.dcmread(build(fx[name], tmp_path))
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.PhotometricInterpretation == photometric
    assert ds.LossyImageCompression == lossy
    if lossy == "01":
        assert "ISO_10918_1" in values(ds.LossyImageCompressionMethod)
        assert len(values(ds.LossyImageCompressionRatio)) == len(values(ds.LossyImageCompressionMethod))


def test_wrap_policy_labels_444_as_ybr_full(fx, tmp_path):
    ds = pydicom.dcmread(build(fx["baseline_444.jpg"], tmp_path, IngestSettings(jpeg_444="wrap")))
    assert ds.PhotometricInterpretation == "YBR_FULL"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"


def test_baseline_jpeg_is_encapsulated_byte_for_byte_minus_metadata(fx, tmp_path):
    source = fx["gps.jpg"].read_bytes()
    ds = pydicom.dcmread(build(fx["gps.jpg"], tmp_path))
    frame = b"".join(pydicom.encaps.generate_fragments(ds.PixelData)).rstrip(b"\x00")
    assert frame.startswith(b"\xff\xd8") and frame.endswith(b"\xff\xd9")
    # the entropy-coded data is the source's, unchanged
    sos = source.index(b"\xff\xda")
    eoi = source.index(b"\xff\xd9", sos) + 2
    assert frame.endswith(source[sos:eoi])
    for secret in (b"Exif", b"GPS", b"SERIAL", b"Leeds", b"MAKERNOTE", b"ward 7", b"MPF-TRAILER", b"Owner", b"xap/1.0"):
        assert secret not in frame
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"


def test_no_private_metadata_in_the_dicom_file(fx, tmp_path):
    for name in ("gps.jpg", "photo.heic", "orient_6.png"):
        data = build(fx[name], tmp_path).read_bytes()
        for secret in (b"51.50", b"SERIAL-0123456789", b"LENS-SN", b"MAKERNOTE", b"Dr Owner", b"Artist Person", b"Leeds", b"Exif\x00\x00"):
            assert secret not in data, (name, secret)
        exiftool = subprocess.run(["exiftool", "-a", "-G1", "-s", str(tmp_path / (name + ".dcm"))], capture_output=True)
        assert b"GPS" not in exiftool.stdout


@pytest.mark.parametrize("n", range(1, 9))
def test_each_exif_orientation_displays_upright(fx, tmp_path, n):
    dcm = build(fx[f"orient_{n}.jpg"], tmp_path)
    ds = pydicom.dcmread(dcm)
    assert (ds.Columns, ds.Rows) == (96, 64)
    image = render(dcm)
    expect = photo_fixtures.QUADRANTS
    for (x, y), key in {(10, 8): "top_left", (86, 8): "top_right", (10, 56): "bottom_left", (86, 56): "bottom_right"}.items():
        got = image.getpixel((x, y))
        assert all(abs(a - b) < 40 for a, b in zip(got, expect[key])), (n, key, got)
    if n != 1:
        assert "jpegtran" in ds.DerivationDescription and ds.ImageType[0] == "ORIGINAL"


def test_rotation_that_cannot_be_lossless_is_encoded_once_and_marked_derived(fx, tmp_path):
    ds = pydicom.dcmread(build(fx["orient_6_odd.jpg"], tmp_path))
    assert (ds.Columns, ds.Rows) == (100, 75)
    assert ds.ImageType[0] == "DERIVED"
    assert values(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]


def test_patient_study_and_body_site_attributes(fx, tmp_path):
    ds = pydicom.dcmread(build(fx["baseline_420.jpg"], tmp_path))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Ó Súilleabháin^Siobhán"
    assert ds.PatientID == "9449305552" and ds.IssuerOfPatientID == "NHS"
    assert ds.OtherPatientIDsSequence[0].PatientID == "M100"
    region = ds.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("368209003", "SCT")
    assert region.AnatomicRegionModifierSequence[0].CodeValue == "24028007"
    assert ds.Laterality == "R"
    assert ds.Manufacturer == "Canon" and ds.ManufacturerModelName == "Canon EOS R6"
    assert (ds.ContentDate, ds.ContentTime) == ("20240305", "142231")
    assert "AcquisitionContextSequence" in ds


def test_ascii_names_have_no_specific_character_set(fx, tmp_path):
    ds = pydicom.dcmread(build(fx["baseline_420.jpg"], tmp_path, patient=vlphoto.PatientInfo("1", "NHS", "Smith", "Jo")))
    assert "SpecificCharacterSet" not in ds


def test_uids_under_configured_root():
    assert new_uid().startswith("2.25.") and is_valid_uid(new_uid())
    uid = new_uid("1.2.826.0.1.3680043.10.999")
    assert uid.startswith("1.2.826.0.1.3680043.10.999.") and is_valid_uid(uid) and len(uid) <= 64
    assert stable_uid("2.25", "study", "x") == stable_uid("2.25", "study", "x") != stable_uid("2.25", "study", "y")


def test_icc_profile_travels_into_dicom_even_through_jpegtran(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    upright = photo_fixtures.quadrant_image(96, 64)
    for name, kw in (("icc.jpg", {}), ("icc_prog.jpg", {"progressive": True})):
        src = tmp_path / name
        upright.save(src, "JPEG", quality=90, icc_profile=srgb, **kw)
        dcm = build(src, tmp_path)
        dicom_tools_check(dcm)
        ds = pydicom.dcmread(dcm)
        assert ds.ICCProfile == srgb
        frame = b"".join(pydicom.encaps.generate_fragments(ds.PixelData))
        assert b"ICC_PROFILE" not in frame
