"""Build a DICOM VL Photographic Image (PS3.3 A.32.4) Part 10 file from plain inputs.

Knows DICOM, not our database: the pipeline hands in dataclasses. Pixel Data is
always encapsulated: a baseline JPEG as it came (minus metadata), or decoded pixels
of a lossless source as one JPEG-LS lossless codestream. A JPEG is streamed into
Pixel Data from byte ranges of its source plus a few literal segments (never joined
into one big bytes object), so a 200 MiB photo costs no more memory than a small one.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGLSLossless

from gateway.core.objects import jpegls
from gateway.core.objects import text as dtext
from gateway.core.objects.uids import IMPLEMENTATION_VERSION_NAME, implementation_class_uid

VL_PHOTOGRAPHIC_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.4"
DERMOSCOPIC_PHOTOGRAPHY_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.7"
SECONDARY_CAPTURE_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
SCT = "SCT"
# SNOMED CT laterality qualifiers used as Anatomic Region Modifiers
LATERALITY_CODES = {
    "right": ("24028007", "Right"),
    "left": ("7771000", "Left"),
    "both": ("51440002", "Right and left"),
}
_DICOM_LATERALITY = {"right": "R", "left": "L"}


@dataclass
class PatientInfo:
    patient_id: str = ""
    issuer: str = ""
    family: str | None = None
    given: str | None = None
    prefix: str | None = None
    birth_date: date | None = None
    sex: str | None = None  # M F O (anything else is written empty)
    other_ids: list[tuple[str, str]] = field(default_factory=list)  # (id, issuer)


@dataclass
class StudyInfo:
    uid: str
    started: datetime | None = None
    study_id: str = ""
    accession: str = ""
    referring_physician: str = ""
    description: str = "Clinical photography"


@dataclass
class SeriesInfo:
    uid: str
    number: int | None = None
    description: str | None = None
    operator: str | None = None  # photographer


@dataclass
class BodySite:
    code: str
    meaning: str
    laterality: str | None = None  # left, right, both


@dataclass
class Equipment:
    manufacturer: str | None = None
    model: str | None = None
    software: str | None = None
    institution: str | None = None


@dataclass
class ImageInfo:
    sop_instance_uid: str
    instance_number: int | None = 1
    taken_at: datetime | None = None
    comments: str | None = None
    derived: bool = False
    derivation: str | None = None


@dataclass
class EncapsulatedJpeg:
    """One frame's codestream to wrap as it is: `pieces` in order form the stream.

    A baseline JPEG (the default transfer syntax) or a JPEG-LS lossless codestream
    (see jpeg_ls_lossless). A piece is a byte range (start, end) of `source` or
    literal bytes (the rebuilt JFIF/Adobe segments); ranges are read in chunks when
    written, never joined.
    """

    source: Any  # bytes or a FileView (anything sliceable by byte ranges)
    pieces: list[tuple[int, int] | bytes]
    width: int
    height: int
    samples: int
    photometric: str
    # the whole history of lossy steps, oldest first: [(method, ratio)]
    lossy: list[tuple[str, float]] = field(default_factory=list)
    icc_profile: bytes | None = None
    transfer_syntax: str = JPEGBaseline8Bit

    @property
    def length(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in self.pieces)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        for piece in self.pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            a, b = piece
            for at in range(a, b, size):
                yield self.source[at : min(at + size, b)]


def jpeg_ls_lossless(samples: np.ndarray, width: int, height: int, components: int, lossy: list[tuple[str, float]],
                     icc_profile: bytes | None) -> EncapsulatedJpeg:
    """Decoded 8-bit samples (grey, or RGB by pixel) as one JPEG-LS lossless codestream (PS3.5 A.4.3).

    JPEG-LS rather than RLE Lossless, measured on one core (CharLS 2 through its C API,
    pylibjpeg-rle 2.2.0): a 12 MP photographic RGB PNG (17.5 MB; 36.6 MB of samples)
    gives 16.3 MB in 740 ms with JPEG-LS and 38.9 MB (more than the samples) in 490 ms
    with RLE; a 1-bit 10000 x 10000 PNG (100 MB as 8-bit grey) gives 14 KB in 64 ms
    with JPEG-LS and 1.6 MB in 1000 ms with RLE. dcmtk (dcml2pnm, dcmdjpls), pydicom
    (with pyjpegls) and dciodvfy read it; RGB without colour transform (PS3.5 8.2.3).
    """
    codestream = jpegls.encode(samples, width, height, components)
    return EncapsulatedJpeg(
        source=codestream, pieces=[(0, len(codestream))], width=width, height=height, samples=components,
        photometric="RGB" if components == 3 else "MONOCHROME2", lossy=lossy, icc_profile=icc_profile,
        transfer_syntax=JPEGLSLossless,
    )


def _pn(family: str | None, given: str | None, prefix: str | None = None) -> str:
    return dtext.person_name(family, given, None, prefix)


_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}


def _needs_utf8(ds: Dataset) -> bool:
    """Whether any text value (nested sequences included) is not plain ASCII."""
    for elem in ds.iterall():
        if elem.VR not in _TEXT_VRS or elem.value is None:
            continue
        items = elem.value if elem.VM > 1 else [elem.value]
        if any(not str(v).isascii() for v in items):
            return True
    return False


def _da(moment: date | datetime | None) -> str:
    return moment.strftime("%Y%m%d") if moment else ""


def _tm(moment: datetime | None) -> str:
    if not moment:
        return ""
    return moment.strftime("%H%M%S") + (f".{moment.microsecond:06d}" if moment.microsecond else "")


def _dt(moment: datetime | None) -> str:
    if not moment:
        return ""
    text = moment.strftime("%Y%m%d%H%M%S") + (f".{moment.microsecond:06d}" if moment.microsecond else "")
    if moment.tzinfo is not None:
        text += moment.strftime("%z")
    return text


def _ds(value: float) -> str:
    text = f"{value:.2f}"
    return text[:16]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    value = dtext.string(value, 64)
    if len(value) > dtext.SH:
        item.LongCodeValue = value  # e.g. 17-18 digit SNOMED CT extension ids (PS3.3 8.8.1)
    else:
        item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = dtext.string(meaning, dtext.LO)
    return item


def _lo(text: str | None, limit: int = dtext.LO) -> str:
    return dtext.string(text, limit)


def patient_module(ds: Dataset, patient: PatientInfo) -> None:
    """Set the Patient Module attributes clinphoto owns (name, ids and issuers, birth date, sex) from the index.

    Used when an object is built and whenever one is served (gateway/core/objects/coerce.py), so both
    carry the same values; an attribute with no value in the index is written empty (Type 2) or left out."""
    ds.PatientName = _pn(patient.family, patient.given, patient.prefix)
    ds.PatientID = _lo(patient.patient_id)
    if patient.issuer:
        ds.IssuerOfPatientID = _lo(patient.issuer)
    elif "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    ds.PatientBirthDate = _da(patient.birth_date)
    ds.PatientSex = patient.sex if patient.sex in ("M", "F", "O") else ""
    others = []
    for value, issuer in patient.other_ids:
        item = Dataset()
        item.PatientID = _lo(value)
        item.IssuerOfPatientID = _lo(issuer)
        item.TypeOfPatientID = "TEXT"
        others.append(item)
    if others:
        ds.OtherPatientIDsSequence = others
    elif "OtherPatientIDsSequence" in ds:
        del ds.OtherPatientIDsSequence


def patient_values_ascii(patient: PatientInfo) -> bool:
    """Whether every Patient Module value is plain ASCII (fits any character set an object may declare)."""
    texts = [patient.patient_id, patient.issuer, patient.family, patient.given, patient.prefix]
    texts += [text for pair in patient.other_ids for text in pair]
    return all(text is None or str(text).isascii() for text in texts)


def build_dataset(
    *,
    pixels: EncapsulatedJpeg,
    patient: PatientInfo,
    study: StudyInfo,
    series: SeriesInfo,
    image: ImageInfo,
    equipment: Equipment | None = None,
    body_site: BodySite | None = None,
    uid_root: str = "2.25",
    now: datetime | None = None,
) -> Dataset:
    """Every attribute but Pixel Data (added by write_part10)."""
    now = now or datetime.now(timezone.utc).astimezone()
    equipment = equipment or Equipment()
    ds = Dataset()

    # SOP Common
    ds.SOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    ds.SOPInstanceUID = image.sop_instance_uid
    ds.InstanceCreationDate = _da(now)
    ds.InstanceCreationTime = _tm(now)
    ds.InstanceCreatorUID = implementation_class_uid(uid_root)

    patient_module(ds, patient)

    # General Study
    started = study.started or image.taken_at or now
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = _da(started)
    ds.StudyTime = _tm(started)
    # free text (not a structured name): one family-name component
    ds.ReferringPhysicianName = dtext.person_name(study.referring_physician)
    ds.StudyID = _lo(study.study_id, dtext.SH)
    ds.AccessionNumber = _lo(study.accession, dtext.SH)
    if _lo(study.description):
        ds.StudyDescription = _lo(study.description)

    # General Series
    ds.Modality = "XC"
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number if series.number is not None else ""
    # Type 2C: present (empty when not one side), since photographed parts are often paired
    ds.Laterality = _DICOM_LATERALITY.get(body_site.laterality or "", "") if body_site else ""
    if _lo(series.description):
        ds.SeriesDescription = _lo(series.description)
    operator = dtext.person_name(series.operator)  # free text: one family-name component
    if operator:
        ds.OperatorsName = operator

    # General Equipment (manufacturer and model from EXIF; never serial numbers)
    ds.Manufacturer = _lo(equipment.manufacturer)
    if _lo(equipment.model):
        ds.ManufacturerModelName = _lo(equipment.model)
    if _lo(equipment.software):
        ds.SoftwareVersions = _lo(equipment.software)
    if _lo(equipment.institution):
        ds.InstitutionName = _lo(equipment.institution)

    # General Acquisition
    if image.taken_at:
        ds.AcquisitionDateTime = _dt(image.taken_at)

    # General Image + VL Image
    content = image.taken_at or now
    ds.InstanceNumber = image.instance_number if image.instance_number is not None else ""
    ds.PatientOrientation = ""
    ds.ContentDate = _da(content)
    ds.ContentTime = _tm(content)
    ds.ImageType = ["DERIVED" if image.derived else "ORIGINAL", "PRIMARY"]
    if dtext.long_text(image.derivation, dtext.ST):
        ds.DerivationDescription = dtext.long_text(image.derivation, dtext.ST)
    if dtext.long_text(image.comments, dtext.LT):
        ds.ImageComments = dtext.long_text(image.comments, dtext.LT)
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "YES"
    if pixels.lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [_ds(r) for _, r in pixels.lossy]
        ds.LossyImageCompressionMethod = [m for m, _ in pixels.lossy]
    else:
        ds.LossyImageCompression = "00"

    # Acquisition Context (Type 2: nothing structured to say)
    ds.AcquisitionContextSequence = []

    if body_site:
        region = _code(body_site.code, SCT, body_site.meaning)
        if body_site.laterality in LATERALITY_CODES:
            code, meaning = LATERALITY_CODES[body_site.laterality]
            region.AnatomicRegionModifierSequence = [_code(code, SCT, meaning)]
        ds.AnatomicRegionSequence = [region]

    # Image Pixel
    samples, photometric, rows, cols = pixels.samples, pixels.photometric, pixels.height, pixels.width
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if pixels.icc_profile:
        ds.ICCProfile = pixels.icc_profile
    # decided on the values as written (after cleaning), so no non-ASCII byte goes out undeclared
    if _needs_utf8(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _file_meta(ds: Dataset, transfer_syntax: str, uid_root: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(implementation_class_uid(uid_root))
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _encapsulated_pixel_data(chunks: Iterable[bytes], length: int) -> Iterator[bytes]:
    # (7FE0,0010) OB, undefined length; empty Basic Offset Table; one fragment (padded even); delimiter
    padded = length + (length & 1)
    yield struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    yield struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    yield struct.pack("<HHI", 0xFFFE, 0xE000, padded)
    written = 0
    for chunk in chunks:
        written += len(chunk)
        yield chunk
    if written != length:
        raise ValueError(f"pixel codestream length changed while writing ({written} != {length})")
    if padded != length:
        yield b"\x00"
    yield struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def part10_chunks(ds: Dataset, pixels: EncapsulatedJpeg, uid_root: str = "2.25") -> tuple[str, Iterator[bytes]]:
    """The Part 10 file as a stream of chunks (for a blob store's put_stream) and its transfer syntax UID."""
    ts = pixels.transfer_syntax
    ds.file_meta = _file_meta(ds, ts, uid_root)
    head = io.BytesIO()
    dcmwrite(head, ds, enforce_file_format=True)

    def chunks() -> Iterator[bytes]:
        yield head.getvalue()
        # Pixel Data is the last element (7FE0 sorts after every attribute we set)
        yield from _encapsulated_pixel_data(pixels.chunks(), pixels.length)

    return ts, chunks()


def write_part10(out: BinaryIO, ds: Dataset, pixels: EncapsulatedJpeg, uid_root: str = "2.25") -> str:
    """Write the Part 10 file; returns its transfer syntax UID."""
    ts, chunks = part10_chunks(ds, pixels, uid_root)
    for chunk in chunks:
        out.write(chunk)
    return ts
