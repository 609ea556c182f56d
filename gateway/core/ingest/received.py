"""Received DICOM objects: checked, described and rendered, but kept exactly as they came.

The file-door counterpart of prepare.py for an object a DICOM door received (C-STORE,
STOW-RS): no database, no protocol.

What "original" means here: the received Part 10 file, byte for byte (preamble, file
meta and data set as the door wrote them), stored once as sealed evidence under its
SHA-256. It is also the stored DICOM object: nothing is rebuilt, so the sender's
Study, Series and SOP Instance UIDs, its pixel data and every attribute stay as sent
(whatever ingest.keep_originals says, since it is the only copy of the pixels). What is
served is that object with the patient module of the patient index at the time of
serving (gateway/core/objects/coerce.py); the original itself only to the roles
allowed originals.

Accepted (anything else is refused with a code saying which rule, before anything is stored):
- SOP classes: VL Photographic Image, Dermoscopic Photography Image, Secondary Capture Image;
- transfer syntaxes the store can keep and serve as they are: JPEG Baseline (the
  camera's own JPEG), JPEG-LS Lossless, RLE Lossless, Explicit and Implicit VR Little Endian;
- pixels: one frame, 8 bits per sample (allocated and stored, high bit 7, unsigned),
  1 sample (MONOCHROME2, MONOCHROME1) or 3 (RGB, YBR_FULL, YBR_FULL_422), Rows and
  Columns present and agreeing with the pixel data (its length, or the JPEG, JPEG-LS
  or RLE frame header), within ingest.max_bytes and ingest.max_pixels; a VL
  Photographic or Dermoscopic object also as the VL Image module narrows them
  (MONOCHROME2, RGB or YBR_FULL_422, colour by pixel), so what is served is valid.

Renditions come from one decode of the pixels at the smallest scale that still gives
the preview: JPEG by DCT scaling in the strict decoder that also proves the data
complete (as for uploads), native pixels read in place and box-reduced a band at a
time; JPEG-LS and RLE (no reduced decode exists) by pydicom with pyjpegls and its own
RLE decoder.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageOps
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.valuerep import DA, DT, TM

from gateway.core.ingest import limits
from gateway.core.ingest.dicom_values import check_values, sender_uid
from gateway.core.ingest.errors import (
    BAD_METADATA,
    CORRUPT,
    INVALID_OBJECT,
    NOT_FAITHFUL,
    SOP_CLASS_NOT_SUPPORTED,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    IngestRejected,
)
from gateway.core.ingest.prepare import JOIN_LIMIT, preview_source
from gateway.core.ingest.renditions import Renditions, decode_target, from_image
from gateway.core.ingest.request import BodySite, Governance, PatientRef, governance, is_sctid
from gateway.core.ingest_settings import IngestSettings
from gateway.core.objects import jpeg, part10
from gateway.core.objects.vlphoto import (
    DERMOSCOPIC_PHOTOGRAPHY_IMAGE,
    SECONDARY_CAPTURE_IMAGE,
    VL_PHOTOGRAPHIC_IMAGE,
    EncapsulatedJpeg,
)

MEDIA_TYPE = "application/dicom"
SOP_CLASSES: dict[str, str] = {
    VL_PHOTOGRAPHIC_IMAGE: "VL Photographic Image",
    DERMOSCOPIC_PHOTOGRAPHY_IMAGE: "Dermoscopic Photography Image",
    SECONDARY_CAPTURE_IMAGE: "Secondary Capture Image",
}
TRANSFER_SYNTAXES: dict[str, str] = {
    JPEGBaseline8Bit: "JPEG Baseline",
    JPEGLSLossless: "JPEG-LS Lossless",
    RLELossless: "RLE Lossless",
    ExplicitVRLittleEndian: "Explicit VR Little Endian",
    ImplicitVRLittleEndian: "Implicit VR Little Endian",
}
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
VL_IMAGE_CLASSES = (VL_PHOTOGRAPHIC_IMAGE, DERMOSCOPIC_PHOTOGRAPHY_IMAGE)
VL_PHOTOMETRIC = ("MONOCHROME2", "RGB", "YBR_FULL_422")  # of the VL Image module's, those our transfer syntaxes carry
MONOCHROME = ("MONOCHROME2", "MONOCHROME1")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")
T = TypeVar("T")
_BAND_BYTES = 4 << 20  # native pixels are read and box-reduced about this many bytes at a time


@dataclass(frozen=True)
class Received:
    """A received object that passed every check, and what the pipeline needs to store it."""

    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    patient: PatientRef
    rows: int
    columns: int
    samples: int
    photometric: str
    planar: int
    pixels: part10.PixelElement
    instance_number: int | None = None
    taken_at: dt.datetime | None = None
    body_site: tuple[str, str] | None = None  # (SNOMED CT code, meaning)
    laterality: str | None = None  # left, right, both
    device: str | None = None
    operator: str | None = None


def _invalid(message: str, attribute: str | None = None) -> IngestRejected:
    return IngestRejected(INVALID_OBJECT, message, field=attribute)


def _text(ds: Dataset, keyword: str) -> str | None:
    """An attribute's value as text, None when absent, empty or unreadable (a malformed value is not fatal)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError, OverflowError):
        return None
    except Exception:
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    return sender_uid(_text(ds, keyword) or "", keyword)


def read(path: Path, settings: IngestSettings, *, check_limits: bool = True, head: part10.Head | None = None) -> Received:
    """Every check of the header that needs no decoding; raises IngestRejected naming the rule broken.
    `check_limits=False` reads an object already stored (the size limits of today do not apply to it); `head`: the
    file's header as part10.read_head gave it to the caller already."""
    size = path.stat().st_size
    if check_limits:
        limits.check_size(size, settings.max_bytes)
    try:
        head = head or part10.read_head(path)
    except part10.Part10Error as exc:
        raise _invalid(f"{exc}: send the object as a DICOM Part 10 file (preamble, DICM, file meta, data set)") from None
    ds = head.dataset
    sop_class = _text(ds, "SOPClassUID") or ""
    if sop_class not in SOP_CLASSES:
        raise IngestRejected(
            SOP_CLASS_NOT_SUPPORTED,
            f"SOP class {sop_class or '(none)'} is not supported: clinphoto keeps photographs "
            f"({', '.join(f'{name} {uid}' for uid, name in SOP_CLASSES.items())})",
            field="SOPClassUID",
        )
    ts = head.transfer_syntax
    if ts not in TRANSFER_SYNTAXES:
        raise IngestRejected(
            TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"transfer syntax {ts} is not supported: send the object as "
            f"{', '.join(f'{name} ({uid})' for uid, name in TRANSFER_SYNTAXES.items())}",
            field="TransferSyntaxUID",
        )
    sop_uid = _uid(ds, "SOPInstanceUID")
    media_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    if media_uid and media_uid != sop_uid:
        raise _invalid(f"the file meta names instance {media_uid} but the data set is {sop_uid}", "MediaStorageSOPInstanceUID")
    rows, columns, samples, photometric, planar = _pixel_description(ds, ts)
    if check_limits:
        limits.check_pixels(columns, rows, settings.max_pixels)
    try:
        with open(path, "rb") as f:
            element = part10.pixel_element(f, head)
    except part10.Part10Error as exc:
        raise _invalid(str(exc), "PixelData") from None
    _check_pixel_data(element, ts, rows, columns, samples)
    if check_limits:  # an object already stored is read as it lies (the renderer, `store check`)
        _check_after_pixels(path, element.element_end, size, head.implicit_vr)
    facts = described(ds)
    return Received(
        path=path, size=size, sop_class_uid=sop_class, sop_instance_uid=sop_uid, study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"), transfer_syntax=ts, patient=_patient(ds), rows=rows, columns=columns,
        samples=samples, photometric=photometric, planar=planar, pixels=element,
        instance_number=_int(ds, "InstanceNumber"), taken_at=facts.taken_at, body_site=facts.body_site,
        laterality=facts.laterality, device=facts.device, operator=facts.operator,
    )


def _pixel_description(ds: Dataset, ts: str) -> tuple[int, int, int, str, int]:
    """(rows, columns, samples, photometric, planar configuration), each present and consistent."""
    values: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        value = _int(ds, keyword)
        if value is None:
            raise _invalid(f"{keyword} is missing: the Image Pixel module must describe the pixels", keyword)
        values[keyword] = value
    rows, columns, samples = values["Rows"], values["Columns"], values["SamplesPerPixel"]
    if rows <= 0 or columns <= 0:
        raise _invalid(f"Rows and Columns must be positive (they are {rows} and {columns})", "Rows")
    bits = (values["BitsAllocated"], values["BitsStored"], values["HighBit"], values["PixelRepresentation"])
    if bits != (8, 8, 7, 0):
        raise IngestRejected(
            NOT_FAITHFUL,
            f"pixels of {bits[1]} bits stored in {bits[0]} (high bit {bits[2]}, pixel representation {bits[3]}): clinphoto "
            "keeps photographs of 8 unsigned bits per sample, as VL Photographic Image holds them",
            field="BitsAllocated",
        )
    frames = _int(ds, "NumberOfFrames")
    if frames not in (None, 1):
        raise _invalid(f"NumberOfFrames is {frames}: a photograph of these SOP classes is a single frame", "NumberOfFrames")
    photometric = _text(ds, "PhotometricInterpretation") or ""
    if photometric == "PALETTE COLOR":
        raise IngestRejected(NOT_FAITHFUL, "PALETTE COLOR pixels are refused: a photograph is RGB or grey; send it as RGB",
                             field="PhotometricInterpretation")
    allowed = MONOCHROME if samples == 1 else COLOUR if samples == 3 else ()
    if not allowed:
        raise _invalid(f"SamplesPerPixel is {samples}: a photograph has 1 (grey) or 3 (colour)", "SamplesPerPixel")
    if photometric not in allowed:
        raise _invalid(f"PhotometricInterpretation {photometric or '(none)'} does not fit SamplesPerPixel {samples} "
                       f"(use {' or '.join(allowed)})", "PhotometricInterpretation")
    if photometric == "YBR_FULL_422" and ts in (JPEGLSLossless, RLELossless):
        raise _invalid(f"PhotometricInterpretation YBR_FULL_422 is not allowed with {TRANSFER_SYNTAXES[ts]} (PS3.5 8.2)",
                       "PhotometricInterpretation")
    planar = 0
    if samples == 3:
        value = _int(ds, "PlanarConfiguration")
        if value not in (0, 1):
            raise _invalid(f"PlanarConfiguration is {'missing' if value is None else value}: a colour image needs 0 or 1",
                           "PlanarConfiguration")
        planar = value
    sop_class = _text(ds, "SOPClassUID")
    if sop_class in VL_IMAGE_CLASSES:
        # the VL Image module (PS3.3 C.8.12.1) narrows the pixels: a served object of this class must be valid
        if photometric not in VL_PHOTOMETRIC:
            raise _invalid(f"PhotometricInterpretation {photometric} is not allowed in a {SOP_CLASSES[sop_class]} (use "
                           f"{', '.join(VL_PHOTOMETRIC)}; or send it as a Secondary Capture Image)", "PhotometricInterpretation")
        if planar != 0:
            raise _invalid(f"PlanarConfiguration {planar} is not allowed in a {SOP_CLASSES[sop_class]} (it must be 0, "
                           "colour by pixel; or send it as a Secondary Capture Image)", "PlanarConfiguration")
    return rows, columns, samples, photometric, planar


def _check_after_pixels(path: Path, start: int, size: int, implicit: bool) -> None:
    """Elements after Pixel Data (a digital signature, Data Set Trailing Padding) are kept and served byte for byte,
    so each must be whole and of even length (PS3.5 7.1.1): an odd one would go out malformed to every peer."""
    if start >= size:
        return
    with open(path, "rb") as f:
        f.seek(start)
        try:
            for raw in data_element_generator(f, is_implicit_VR=implicit, is_little_endian=True, defer_size=1024):
                length = getattr(raw, "length", 0)
                if length != part10.UNDEFINED and length % 2:
                    raise _invalid(f"the element {raw.tag} after Pixel Data has an odd value length ({length}): every "
                                   "value length is even (PS3.5 7.1.1)", "PixelData")
                value = getattr(raw, "value", None)
                if length != part10.UNDEFINED and isinstance(value, bytes) and len(value) != length:
                    raise _invalid(f"the element {raw.tag} after Pixel Data is cut short", "PixelData")
        except IngestRejected:
            raise
        except Exception as exc:  # pydicom raises many kinds on garbage
            raise _invalid(f"what follows Pixel Data is not a sequence of data elements ({type(exc).__name__})",
                           "PixelData") from None
        if f.tell() != size:
            raise _invalid("what follows Pixel Data ends inside a data element", "PixelData")


def _check_pixel_data(element: part10.PixelElement, ts: str, rows: int, columns: int, samples: int) -> None:
    if ts in NATIVE:
        if element.encapsulated:
            raise _invalid(f"Pixel Data is encapsulated, but the transfer syntax {TRANSFER_SYNTAXES[ts]} is native", "PixelData")
        expected = rows * columns * samples
        if element.length not in (expected, expected + (expected & 1)):
            raise _invalid(f"Pixel Data holds {element.length} bytes, but Rows x Columns x SamplesPerPixel "
                           f"({rows} x {columns} x {samples}) needs {expected}", "PixelData")
        return
    if not element.encapsulated:
        raise _invalid(f"Pixel Data must be encapsulated for {TRANSFER_SYNTAXES[ts]}", "PixelData")
    table = element.offset_table
    if table is not None and table[1] - table[0] > 4:
        raise _invalid("the Basic Offset Table lists several frames: a photograph of these SOP classes is a single frame",
                       "PixelData")
    if not element.fragments or element.fragment_bytes == 0:
        raise _invalid("encapsulated Pixel Data holds no frame", "PixelData")


def _patient(ds: Dataset) -> PatientRef:
    issuer_uid = None
    try:
        qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
        if qualifiers:
            issuer_uid = _text(qualifiers[0], "UniversalEntityID")
    except Exception:
        issuer_uid = None
    return PatientRef.dicom(_text(ds, "PatientID") or "", _text(ds, "IssuerOfPatientID") or "", issuer_uid)


# --- what the object says about the photo ------------------------------------------------------------------
# One mapping of a sender's DICOM attributes to the photo's record, for every door that gets DICOM attributes: a
# received object (C-STORE, STOW-RS Part 10; lenient, as the object is kept as sent whatever a value says) and a
# STOW-RS DICOM JSON data set with image bulk data (strict: its values become the governance the object is built from,
# so a bad coded value or date is refused, naming it, rather than dropped).


@dataclass(frozen=True)
class Described:
    """What a data set says about the photo, in the photo record's terms."""

    taken_at: dt.datetime | None = None
    body_site: tuple[str, str] | None = None  # (SNOMED CT code, meaning)
    laterality: str | None = None  # left, right, both
    device: str | None = None
    operator: str | None = None
    view: str | None = None
    description: str | None = None


class _Bad(ValueError):
    """A value that does not say what its attribute means (strict mapping: refused with this message)."""


def described(ds: Dataset, *, strict: bool = False) -> Described:
    """The photo's facts from its attributes: when taken (AcquisitionDateTime, else Content or Acquisition Date and
    Time), body site (Anatomic Region Sequence in SNOMED CT, else Body Part Examined as a CID 4031 concept),
    laterality (Laterality, ImageLaterality, or the region's laterality modifier), device (Manufacturer and model),
    photographer (OperatorsName), view (View Code Sequence), description (Study and Series Description, Image
    Comments). Lenient: a value that cannot be read is left out. Strict: it is refused (IngestRejected BAD_METADATA,
    the message short enough for a DICOM ErrorComment and naming the attribute)."""

    def attempt(read: Callable[[Dataset], T]) -> T | None:
        try:
            return read(ds)
        except _Bad as exc:
            if strict:
                # every message begins with the attribute's keyword: it is the field at fault
                raise IngestRejected(BAD_METADATA, str(exc)[:64], field=str(exc).replace(":", " ").split()[0]) from None
            return None
        except Exception:  # a malformed value is the sender's problem, not a reason to refuse a received object
            if strict:
                raise IngestRejected(BAD_METADATA, "an attribute about the photo cannot be read", field="metadata") from None
            return None

    site = attempt(_body_site)
    region_side = site[2] if site else None
    side = attempt(_laterality)
    if strict and side and region_side and side != region_side:
        raise IngestRejected(BAD_METADATA, f"Laterality {side} contradicts AnatomicRegionModifier {region_side}"[:64],
                             field="Laterality")
    comments = [_text(ds, k) for k in ("StudyDescription", "SeriesDescription", "ImageComments")]
    return Described(
        taken_at=attempt(lambda d: _taken_at(d, strict=strict)), body_site=(site[0], site[1]) if site else None,
        laterality=side or region_side,
        device=" ".join(x for x in (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")) if x)[:200] or None,
        operator=attempt(_operator), view=attempt(_view),
        description="; ".join(dict.fromkeys(c for c in comments if c))[:10000] or None,
    )


def governance_of(ds: Dataset) -> Governance:
    """The governance a DICOM data set gives the photo an image is stored as (STOW-RS: DICOM JSON metadata with JPEG
    or PNG bulk data, IHE Web-based Image Capture): described() strictly, so the object built from the image says what
    the sender said, or the instance is refused naming the attribute at fault (an invalid UID or a value over its VR's length too). A
    laterality with no body site has nowhere to go in the record (it qualifies a site) and is left out."""
    check_values(ds)
    facts = described(ds, strict=True)
    site = None
    if facts.body_site is not None:
        code, meaning = facts.body_site
        site = BodySite(code=code, display=meaning[:64], laterality=facts.laterality)
    return governance(body_site=site, photographer=facts.operator, device=facts.device, taken_at=facts.taken_at,
                      view=facts.view, description=facts.description)


def _taken_at(ds: Dataset, *, strict: bool = False) -> dt.datetime | None:
    """When the photo was taken. Without an offset in the value or a TimezoneOffsetFromUTC (one that cannot be
    read: refused when `strict`), the gateway host's local time (a modality on site)."""
    moment: dt.datetime | None = None
    text = _text(ds, "AcquisitionDateTime")
    if text:
        moment = _parsed(DT, text, "AcquisitionDateTime", "YYYYMMDDHHMMSS")
    else:
        for day, time in (("ContentDate", "ContentTime"), ("AcquisitionDate", "AcquisitionTime")):
            day_text, time_text = _text(ds, day), _text(ds, time)
            if day_text and time_text:
                moment = dt.datetime.combine(_parsed(DA, day_text, day, "YYYYMMDD"), _parsed(TM, time_text, time, "HHMMSS"))
                break
    if moment is None:
        return None
    moment = dt.datetime(moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
                         moment.microsecond, tzinfo=moment.tzinfo)
    if moment.tzinfo is None:
        offset = _text(ds, "TimezoneOffsetFromUTC")
        if offset and len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
            minutes = int(offset[1:3]) * 60 + int(offset[3:])
            moment = moment.replace(tzinfo=dt.timezone(dt.timedelta(minutes=minutes if offset[0] == "+" else -minutes)))
        elif offset and strict:
            raise _Bad(f"TimezoneOffsetFromUTC {offset[:10]!r} is not &ZZXX (e.g. +0100)")
        else:
            moment = moment.astimezone()
    return moment.astimezone(dt.timezone.utc)


def _parsed(kind: Callable[[str], Any], text: str, keyword: str, form: str) -> Any:
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        value = None
    if value is None or not isinstance(value, (dt.date, dt.time)):
        raise _Bad(f"{keyword} {text[:16]!r} is not a DICOM value ({form})")
    return value


# SNOMED CT laterality qualifiers as Anatomic Region Modifiers (as gateway/core/objects/vlphoto.py writes them)
_MODIFIER_SIDES = {"24028007": "right", "7771000": "left", "51440002": "both"}


def _body_site(ds: Dataset) -> tuple[str, str, str | None] | None:
    """(SNOMED CT code, meaning, laterality modifier): the object's own Anatomic Region, else its Body Part Examined."""
    regions = ds.get("AnatomicRegionSequence")
    if not regions:
        return _body_part(_text(ds, "BodyPartExamined"))
    region = regions[0]
    code = _text(region, "CodeValue") or _text(region, "LongCodeValue") or ""
    scheme = _text(region, "CodingSchemeDesignator") or ""
    if scheme != "SCT":
        raise _Bad(f"AnatomicRegionSequence: scheme {scheme[:8] or '(none)'!r}, not SCT")
    if not is_sctid(code):
        raise _Bad(f"AnatomicRegionSequence: {code[:18]!r} is not a SNOMED CT id")
    side = None
    for modifier in region.get("AnatomicRegionModifierSequence") or []:
        side = _MODIFIER_SIDES.get(_text(modifier, "CodeValue") or "") or side
    return code, (_text(region, "CodeMeaning") or f"SNOMED CT {code}")[:200], side


_BODY_PARTS: dict[str, tuple[str, str]] = {}


def _body_part(value: str | None) -> tuple[str, str, None] | None:
    """Body Part Examined (a CS defined term, e.g. HAND) as the CID 4031 Common Anatomic Region concept of that name
    (PS3.16; pydicom's table of it), so a sender that names the site only this way still gets one."""
    if not value:
        return None
    if not _BODY_PARTS:
        from pydicom.sr.codedict import codes

        for concept in codes.cid4031.concepts.values():
            if concept.scheme_designator == "SCT":
                _BODY_PARTS.setdefault(concept.meaning.upper().replace(" ", ""), (concept.value, concept.meaning))
    found = _BODY_PARTS.get(value.upper().replace(" ", "").replace("_", ""))
    if found is None:
        raise _Bad(f"BodyPartExamined {value[:16]!r}: no SNOMED CT concept known")
    return found[0], found[1], None


def _laterality(ds: Dataset) -> str | None:
    """Laterality (of the series) or ImageLaterality: R, L, B (both); U (unpaired) says nothing; they must agree."""
    sides = {"R": "right", "L": "left", "B": "both", "U": None}
    found = []
    for keyword in ("Laterality", "ImageLaterality"):
        text = _text(ds, keyword)
        if text is None:
            continue
        if text.upper() not in sides:
            raise _Bad(f"{keyword} {text[:8]!r} is not one of R, L, B, U")
        found.append(sides[text.upper()])
    given = {s for s in found if s}
    if len(given) > 1:
        raise _Bad("Laterality and ImageLaterality disagree")
    return given.pop() if given else None


def _operator(ds: Dataset) -> str | None:
    """OperatorsName as the record's free-text photographer: the first name, read as a person writes it
    (Family^Given^Middle^Prefix^Suffix -> Prefix Given Middle Family Suffix)."""
    value = ds.get("OperatorsName")
    if isinstance(value, MultiValue):
        value = value[0] if value else None
    text = str(value or "").split("=")[0]  # the alphabetic group
    parts = (text.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return " ".join(x for x in (prefix, given, middle, family, suffix) if x)[:200] or None


def _view(ds: Dataset) -> str | None:
    views = ds.get("ViewCodeSequence")
    return (_text(views[0], "CodeMeaning") or "")[:100] or None if views else None


# --- renditions ------------------------------------------------------------------------------------------


def renditions(obj: Received, settings: IngestSettings, tmp_dir: Path | None = None) -> Renditions:
    """Preview and thumbnail from one decode of the pixels; a frame that does not decode, or disagrees with
    Rows/Columns/SamplesPerPixel, is refused (CORRUPT or INVALID_OBJECT)."""
    if obj.transfer_syntax == JPEGBaseline8Bit:
        image = _jpeg_image(obj, settings, tmp_dir)
    elif obj.transfer_syntax in NATIVE and obj.photometric != "YBR_FULL_422":
        image = Image.fromarray(_native_reduced(obj, settings))
    else:
        if obj.transfer_syntax not in NATIVE:
            _check_frame_header(obj)
        image = Image.fromarray(_decoded(obj))
    if obj.photometric == "MONOCHROME1":  # 0 is white: shown the way a viewer would
        image = ImageOps.invert(image)
    return from_image(image, 1, preview=settings.preview_size, thumbnail=settings.thumbnail_size,
                      quality=settings.rendition_quality)


def check_frame(obj: Received, tmp_dir: Path | None = None) -> None:
    """What can be proved without decoding: the frame's own header agrees with the object and, for JPEG, the
    stream is whole (its header parses and it ends with end-of-image). Raises IngestRejected naming the rule.
    Damage inside the entropy-coded data shows only when the frame is decoded (renditions())."""
    if obj.transfer_syntax == JPEGBaseline8Bit:
        with _jpeg_frame(obj, tmp_dir):
            pass
    elif obj.transfer_syntax not in NATIVE:
        _check_frame_header(obj)


@contextmanager
def _jpeg_frame(obj: Received, tmp_dir: Path | None) -> Iterator[tuple[EncapsulatedJpeg, jpeg.JpegInfo]]:
    """The frame's JPEG stream (joined, or spooled when large), checked against the pixel description."""
    spooled: Path | None = None
    view: jpeg.FileView | None = None
    try:
        with open(obj.path, "rb") as f:
            if obj.pixels.fragment_bytes <= JOIN_LIMIT:
                buf: bytes | jpeg.FileView = b"".join(part10.read_range(f, a, b) for a, b in obj.pixels.fragments)
            else:
                fd, name = tempfile.mkstemp(prefix="frame-", suffix=".jpg", dir=tmp_dir)
                spooled = Path(name)
                with os.fdopen(fd, "wb") as out:
                    for a, b in obj.pixels.fragments:
                        part10.copy_range(f, a, b, out)
                buf = view = jpeg.FileView(spooled)
        length = len(buf)
        if length >= 3 and buf[length - 1] == 0 and buf[length - 3 : length - 1] == jpeg.EOI:
            length -= 1  # the fragment's padding to even length
        try:
            info = jpeg.parse(buf, find_end=False)
        except jpeg.JpegError as exc:
            raise IngestRejected(CORRUPT, f"the JPEG frame is damaged: {exc}", field="PixelData") from None
        if jpeg.EOI not in buf[max(0, length - 8) : length]:
            # a file cut short in transfer or on the camera's card: the commonest damage, seen without decoding
            # (a few bytes after EOI are let through, as decoders ignore them)
            raise IngestRejected(CORRUPT, "the JPEG frame does not end with end-of-image (FFD9): cut short, or with "
                                 "data after it (a phone's appended previews: wrap the JPEG without them)", field="PixelData")
        if (odd := jpeg.unexpected_in_header(info)) is not None:
            # stored, it was answered as a success but never decoded (its renditions failed after the answer) nor served
            raise IngestRejected(CORRUPT, f"the JPEG frame holds a marker segment FF{odd.marker:02X} (at byte {odd.start}) "
                                 "that is not part of a baseline JPEG: it cannot be decoded or sent on", field="PixelData")
        if not info.baseline:
            raise _invalid(f"the frame is {info.process} JPEG, but the transfer syntax says JPEG Baseline", "PixelData")
        if (info.width, info.height, len(info.components)) != (obj.columns, obj.rows, obj.samples):
            raise _invalid(
                f"the JPEG frame is {info.width} x {info.height} with {len(info.components)} component(s), but the object "
                f"says Columns {obj.columns}, Rows {obj.rows}, SamplesPerPixel {obj.samples}", "PixelData")
        yield EncapsulatedJpeg(source=buf, pieces=[(0, length)], width=info.width, height=info.height,
                               samples=len(info.components), photometric=obj.photometric), info
    finally:
        if view is not None:
            view.close()
        if spooled is not None:
            spooled.unlink(missing_ok=True)


def _jpeg_image(obj: Received, settings: IngestSettings, tmp_dir: Path | None) -> Image.Image:
    """The frame checked as check_frame() does, then decoded strictly at the preview's scale."""
    with _jpeg_frame(obj, tmp_dir) as (stream, info):
        return preview_source(stream, info, settings, tmp_dir)


def _native_reduced(obj: Received, settings: IngestSettings) -> np.ndarray:
    """Native pixels box-reduced by the largest whole factor that still leaves the preview's size, read from
    the file a band of rows at a time (about 4 MiB), so a 100 MP object is never in memory whole."""
    rows, columns, samples = obj.rows, obj.columns, obj.samples
    target_w, target_h = decode_target(columns, rows, settings.preview_size, settings.preview_min_fraction)
    factor = max(1, min(columns // max(target_w, 1), rows // max(target_h, 1)))
    out_rows, out_cols = rows // factor, columns // factor
    band = max(1, _BAND_BYTES // (factor * columns * samples))  # output rows per read
    base = obj.pixels.value_offset
    reduced = np.empty((out_rows, out_cols, samples), np.uint8)
    with open(obj.path, "rb") as f:
        for top in range(0, out_rows, band):
            bottom = min(top + band, out_rows)
            first, count = top * factor, (bottom - top) * factor
            if samples == 1 or obj.planar == 0:
                raw = _rows(f, base + first * columns * samples, count, columns * samples).reshape(count, columns, samples)
            else:  # colour by plane: all R, then all G, then all B
                raw = np.stack([_rows(f, base + plane * rows * columns + first * columns, count, columns)
                                for plane in range(3)], axis=2)
            blocks = raw[:, : out_cols * factor].astype(np.uint32).reshape(bottom - top, factor, out_cols, factor, samples)
            reduced[top:bottom] = (blocks.sum(axis=(1, 3)) + factor * factor // 2) // (factor * factor)
    if obj.photometric == "YBR_FULL":
        reduced = np.asarray(convert_color_space(reduced, "YBR_FULL", "RGB"), dtype=np.uint8)
    return reduced[:, :, 0] if samples == 1 else reduced


def _rows(f: BinaryIO, offset: int, count: int, row_bytes: int) -> np.ndarray:
    return np.frombuffer(part10.read_range(f, offset, offset + count * row_bytes), np.uint8).reshape(count, row_bytes)


def _check_frame_header(obj: Received) -> None:
    """JPEG-LS and RLE frames describe themselves: they must agree with the object before anything is decoded."""
    with open(obj.path, "rb") as f:
        start, end = obj.pixels.fragments[0]
        head = part10.read_range(f, start, min(end, start + 65536))
    if obj.transfer_syntax == RLELossless:
        segments = int.from_bytes(head[:4], "little") if len(head) >= 64 else -1
        if segments != obj.samples:
            raise _invalid(f"the RLE frame has {segments} segment(s), but SamplesPerPixel {obj.samples} of 8 bits needs "
                           f"{obj.samples}", "PixelData")
        return
    frame = _jpegls_frame(head)
    if frame is None:
        raise IngestRejected(CORRUPT, "the JPEG-LS frame is damaged: no frame header (SOF55) in its first fragment",
                             field="PixelData")
    precision, height, width, components = frame
    if (precision, width, height, components) != (8, obj.columns, obj.rows, obj.samples):
        raise _invalid(
            f"the JPEG-LS frame is {width} x {height} with {components} component(s) of {precision} bits, but the object "
            f"says Columns {obj.columns}, Rows {obj.rows}, SamplesPerPixel {obj.samples} of 8 bits", "PixelData")


def _jpegls_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from a JPEG-LS start-of-frame (SOF55), or None."""
    if data[:2] != jpeg.SOI:
        return None
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xF7 and pos + 10 <= len(data):
            return data[pos + 4], int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big"), data[pos + 9]
        if marker == 0xDA:
            return None
        pos += 2 + length
    return None


def _decoded(obj: Received) -> np.ndarray:
    """The whole frame decoded by pydicom (RGB for YBR): RLE, JPEG-LS and native YBR_FULL_422."""
    try:
        pixels = pixel_array(str(obj.path), index=0)
    except Exception as exc:  # decoders raise many kinds for damaged data
        raise IngestRejected(CORRUPT, f"the pixel data does not decode ({TRANSFER_SYNTAXES[obj.transfer_syntax]}): "
                             f"{' '.join(str(exc).split())[:200]}", field="PixelData") from None
    expected = (obj.rows, obj.columns) if obj.samples == 1 else (obj.rows, obj.columns, obj.samples)
    if pixels.shape != expected or pixels.dtype != np.uint8:
        raise _invalid(f"the pixel data decodes to {pixels.shape} {pixels.dtype}, not Rows x Columns x SamplesPerPixel "
                       f"{expected} of 8 bits", "PixelData")
    return np.ascontiguousarray(pixels)
