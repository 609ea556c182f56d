"""VL Photographic Image objects: conformant (dciodvfy, dcmdump, dcmj2pnm), truthful, upright, private."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from gateway.core.ingest.config import IngestSettings
from gateway.core.ingest.prepare import prepare
from gateway.core.objects import text as dtext
from gateway.core.objects import vlphoto
from gateway.core.objects.uids import is_valid_uid, new_uid, stable_uid
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient, dicom_tools_check, photo_fixtures

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
            study=kw.get("study") or vlphoto.StudyInfo(new_uid(), study_id="V100"),
            series=kw.get("series") or vlphoto.SeriesInfo(new_uid(), 1, operator="Jones^Amy"),
            image=vlphoto.ImageInfo(kw.get("sop") or new_uid(), 1, p.facts.taken_at, comments=kw.get("comments"),
                                    derived=p.derived, derivation=p.derivation),
            equipment=kw.get("equipment") or vlphoto.Equipment(p.facts.make, p.facts.model, p.facts.software),
            body_site=kw.get("body_site") or vlphoto.BodySite("368209003", "Right upper arm", "right"),
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
        ("baseline_444.jpg", "1.2.840.10008.1.2.4.80", "RGB", "01"),
        ("rgb_coded.jpg", "1.2.840.10008.1.2.4.80", "RGB", "01"),
        ("rgb.png", "1.2.840.10008.1.2.4.80", "RGB", "00"),
        ("gray.png", "1.2.840.10008.1.2.4.80", "MONOCHROME2", "00"),
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
        exiftool = subprocess.run([require_tool("exiftool", "libimage-exiftool-perl"), "-a", "-G1", "-s",
                                   str(tmp_path / (name + ".dcm"))], capture_output=True, check=True)
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


# --- hostile text: names and free text from HL7 (escapes decoded) and from uploads ---------------------------

HOSTILE_FAMILY = "O\\BRIEN-" + "X" * 80  # HL7 \E\ decoded into a plain backslash
HOSTILE_GIVEN = "ANN^MARIE=Z"  # \S\ decoded into ^, plus a group delimiter


def pn_groups_ok(value) -> None:
    """One value, one component group, at most five components, the group within 64 bytes."""
    text = str(value)
    assert "\\" not in text and "=" not in text
    assert len(text.split("^")) <= 5
    assert len(text.encode("utf-8")) <= 64
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


@pytest.mark.parametrize(
    "family, given, prefix, ascii_only",
    [
        (HOSTILE_FAMILY, HOSTILE_GIVEN, None, True),
        ("Ó\\Súilleabháin=" + "á" * 70, "Siobhán^Máire\x00\x1b", "Dr^", False),  # 2-byte UTF-8: bytes, not chars
        ("\u5c71\u7530" * 30, "\u592a\u90ce\r\n", None, False),  # 3-byte UTF-8
        ("^^^", "===", "\\", True),  # nothing but delimiters
    ],
    ids=["reviewer-example", "utf8-2-byte", "utf8-3-byte", "only-delimiters"],
)
def test_hostile_patient_names_and_photographer_pass_dciodvfy(fx, tmp_path, family, given, prefix, ascii_only):
    patient = vlphoto.PatientInfo("9449305552", "NHS", family, given, prefix, None, "F")
    series = vlphoto.SeriesInfo(new_uid(), 1, operator="Smith\\Jones^Bob=\tX" + "y" * 100)
    dcm = build(fx["baseline_420.jpg"], tmp_path, patient=patient, series=series)
    dicom_tools_check(dcm)
    ds = pydicom.dcmread(dcm)
    assert ds["PatientName"].VM == 1 and ds["OperatorsName"].VM == 1
    pn_groups_ok(ds.PatientName)
    pn_groups_ok(ds.OperatorsName)
    # a free-text photographer is one family-name component
    assert "^" not in str(ds.OperatorsName) and str(ds.OperatorsName).startswith("Smith/Jones Bob X")
    assert ("SpecificCharacterSet" not in ds) == ascii_only
    if family is HOSTILE_FAMILY:
        name = ds.PatientName
        assert name.family_name.startswith("O/BRIEN-XXXX") and name.given_name == "ANN MARIE Z"


def test_reviewer_example_name_is_cleaned_exactly():
    assert dtext.person_name(HOSTILE_FAMILY, HOSTILE_GIVEN) == "O/BRIEN-" + "X" * 44 + "^ANN MARIE Z"
    assert dtext.person_name("Smith\\Jones^Bob") == "Smith/Jones Bob"
    assert dtext.person_name(None, None) == "" and dtext.person_name("Smith", None, None, "Dr") == "Smith^^^Dr"
    # never splits a character, never over 64 bytes
    name = dtext.person_name("Ó" * 40, "é" * 40)
    assert len(name.encode("utf-8")) <= 64 and name.encode("utf-8").decode("utf-8") == name


def test_hostile_free_text_attributes_are_cleaned_and_pass_dciodvfy(fx, tmp_path):
    nasty = "a\\b^c=d\x00\x07\x1b\r\n\tend\ud800 "
    dcm = build(
        fx["baseline_420.jpg"], tmp_path,
        patient=vlphoto.PatientInfo("94493\\05552\x00" + "9" * 70, "NHS\\X" + "I" * 70, "Smith", "Jo", None, None, "F",
                                    [("M\\100" * 20, "R\\XX" * 30)]),
        study=vlphoto.StudyInfo(new_uid(), study_id="V\\100-" + "1" * 30, accession="A\\1" * 10,
                                referring_physician="Dr\\Who^Is=This " + "z" * 80,
                                description="Photos\\" + nasty + "d" * 100),
        series=vlphoto.SeriesInfo(new_uid(), 1, description="Series\\" + nasty + "s" * 100, operator="\x00\x01"),
        equipment=vlphoto.Equipment("Can\\on\n" + "m" * 80, "EOS\\R6\x00" + "M" * 80, "1.0\\2.0" + "v" * 80,
                                    "St\\Elsewhere\x1b" + "i" * 80),
        body_site=vlphoto.BodySite("123456789012345678", "Upper\\arm\x00\n" + "b" * 80, "left"),
        comments="View: ant\x00erior\x07; " + nasty + "c" * 20000,
    )
    dicom_tools_check(dcm)
    ds = pydicom.dcmread(dcm)
    assert "SpecificCharacterSet" not in ds  # every value written is ASCII
    for keyword, limit in (("PatientID", 64), ("IssuerOfPatientID", 64), ("StudyID", 16), ("AccessionNumber", 16),
                           ("StudyDescription", 64), ("SeriesDescription", 64), ("Manufacturer", 64),
                           ("ManufacturerModelName", 64), ("SoftwareVersions", 64), ("InstitutionName", 64)):
        elem = ds[keyword]
        assert elem.VM == 1, keyword
        text = str(elem.value)
        assert len(text.encode("utf-8")) <= limit and "\\" not in text, keyword
        assert not any(ord(ch) < 32 for ch in text), keyword
    assert ds.StudyDescription.startswith("Photos/a/b^c=d end")
    pn_groups_ok(ds.ReferringPhysicianName)
    assert ds.ReferringPhysicianName == "Dr/Who Is This " + "z" * 49
    assert "OperatorsName" not in ds  # nothing left of a photographer made of control characters
    region = ds.AnatomicRegionSequence[0]
    assert region.LongCodeValue == "123456789012345678" and "CodeValue" not in region  # SH holds only 16
    assert region.CodeMeaning.startswith("Upper/arm") and len(region.CodeMeaning) <= 64
    comments = ds.ImageComments
    assert len(comments.encode("utf-8")) <= 10240 and "\x00" not in comments and "\x07" not in comments
    assert "\x1b" not in comments and comments.startswith("View: anterior; a\\b^c=d")
    other = ds.OtherPatientIDsSequence[0]
    assert len(other.PatientID) <= 64 and "\\" not in other.PatientID


def test_non_ascii_anywhere_declares_utf8(fx, tmp_path):
    # software was not part of the old character-set check
    dcm = build(fx["baseline_420.jpg"], tmp_path, patient=vlphoto.PatientInfo("1", "NHS", "Smith", "Jo"),
                equipment=vlphoto.Equipment("Canon", "EOS", "Vérsion 2"))
    dicom_tools_check(dcm)
    ds = pydicom.dcmread(dcm)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.SoftwareVersions == "Vérsion 2"


@pytest.mark.usefixtures("validate_stored_dicom")
def test_upload_with_hostile_hl7_names_and_photographer_stores_valid_dicom(gw, fx, tmp_path):
    from gateway.core.ingest.metadata import parse_metadata
    from gateway.core.ingest.pipeline import ingest
    from gateway.core.ingest.request import ImageFile
    from tests.ingest_helpers import UPLOADER, capture

    patient = add_patient(gw, family=HOSTILE_FAMILY, given=HOSTILE_GIVEN)
    meta = parse_metadata({
        "patient": f"nhs|{patient['nhs']}", "encounter": "V100", "specialty": "330",
        "bodySite": {"code": "368209003", "laterality": "right", "display": "Upper\\arm^left=\x01" + "é" * 45},  # 61 chars, 106 bytes
        "photographer": "Smith\\Jones^Bob", "device": "Phone\\X^Y\x02" + "d" * 150,  # (NUL is refused upstream)
        "view": "ant\\erior\x07\x1b", "description": "Wound\\ check\x07\r\n" + "w" * 9000,
    })
    result = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"], "arm.jpg")], meta, UPLOADER))
    from store.models import Asset

    with gw.db.read() as session:
        sha = session.get(Asset, result.photos[0].asset_id).dicom_sha256
    dcm = tmp_path / "stored.dcm"
    dcm.write_bytes(gw.blobs.read_bytes(sha))
    dicom_tools_check(dcm)
    ds = pydicom.dcmread(dcm)
    assert str(ds.PatientName) == "O/BRIEN-" + "X" * 44 + "^ANN MARIE Z"
    assert str(ds.OperatorsName) == "Smith/Jones Bob"
    assert ds["PatientName"].VM == 1 and ds["OperatorsName"].VM == 1
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    meaning = ds.AnatomicRegionSequence[0].CodeMeaning
    assert meaning.startswith("Upper/arm^left=") and len(meaning.encode("utf-8")) <= 64
    assert len(ds.ManufacturerModelName) <= 64 and "\\" not in ds.ManufacturerModelName


def test_a_reason_too_long_for_an_lo_is_cut_at_a_word_and_says_so():
    reason = "the identifier matches no study, series or instance: give a value or UID list, not a wildcard"
    cut = dtext.words(reason)
    assert cut == "the identifier matches no study, series or instance: give a..." and len(cut) <= 64
    assert dtext.words("short\\reason\n") == "short/reason"  # one LO value: no separator, no control
    accented = dtext.words("é" * 40)  # 80 bytes of UTF-8, one word: cut on a character, never inside one
    assert accented.endswith("...") and len(accented.encode("utf-8")) <= 64
    assert dtext.words(None) == ""
