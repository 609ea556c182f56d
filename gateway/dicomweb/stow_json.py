"""STOW-RS of `application/dicom+json` metadata with `image/jpeg` or `image/png` bulk data (IHE Web-based Image
Capture): each data set names its PixelData part by BulkDataURI, exactly the part's Content-Location or `cid:` and
its Content-ID (PS3.18 10.5.1, RFC 2392). The image goes in as an image file with the sender's Study, Series and SOP
Instance UIDs (checked by the core as a Part 10 object's are), its patient (PatientID + IssuerOfPatientID) and what
the data set says about the photo (body site, laterality, when taken, device, operator, descriptions: the core's
mapping of DICOM attributes, received.governance_of; a bad coded value, date or over-long value fails the instance
with 0xC000 naming it); the pixel description (size, samples, colour) comes from the image itself as for any upload,
never from the JSON, and a progressive JPEG is made baseline by the ingest.

What the request as a whole must be (each metadata part JSON of at most MAX_JSON_PART, a data set or an array of
them, MAX_INSTANCES in all, no two bulk data parts of one name) is read() before anything is stored: refused whole,
it has stored nothing. A data set that is not DICOM JSON (PS3.18 F.2) fails on its own, 0xC000, naming the element."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from pydicom import Dataset
from pydicom.valuerep import VR

from gateway.core.context import Gateway
from gateway.core.ingest import received
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.request import CaptureRequest, ImageFile, PatientRef, Source
from gateway.core.objects.vlphoto import VL_PHOTOGRAPHIC_IMAGE
from gateway.dicomweb.common import DicomwebError
from gateway.dicomweb.multipart_in import MAX_PARTS, ReceivedPart
from gateway.dicomweb.stow_outcome import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    REASON,
    SOP_CLASS_NOT_SUPPORTED,
    Outcome,
    ingest_one,
)
from gateway.http.json_body import TooComplex, loads_bounded

IMAGE_TYPES = ("image/jpeg", "image/png")
REQUIRED = {"0020000D": "StudyInstanceUID", "0020000E": "SeriesInstanceUID", "00080018": "SOPInstanceUID",
            "00100020": "PatientID"}
# a DICOM JSON metadata part is read whole and parsed: some kB an instance (MAX_INSTANCES of them fit), where the
# request's own limit would let one part be 800 MB of JSON
MAX_JSON_PART = 8 * 1024 * 1024
# instances one request may hold, Part 10 parts and data sets together, as it may hold MAX_PARTS parts: one 3.7 MB
# metadata part held 10,000 data sets, 28.6 s of the gateway's time for a single request
MAX_INSTANCES = MAX_PARTS
MAX_DEPTH = 8  # sequences within sequences: a photo's metadata nests two or three
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_VRS = frozenset(vr.value for vr in VR if " or " not in vr.value)  # the VRs an element may have (not a table's "US or SS")
_NUMBERS = frozenset({"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def read(json_parts: list[ReceivedPart], bulk: list[ReceivedPart]) -> tuple[list[dict[str, Any]], dict[str, ReceivedPart]]:
    """The request's data sets and its bulk data parts by name, or DicomwebError (400, 413) for the whole request."""
    data_sets: list[dict[str, Any]] = []
    for part in json_parts:
        if part.size > MAX_JSON_PART:
            raise DicomwebError(413, f"an application/dicom+json part is over {MAX_JSON_PART // (1024 * 1024)} MiB: "
                                     "send fewer instances per request")
        try:
            data = loads_bounded(part.path.read_bytes())
        except TooComplex as exc:
            raise DicomwebError(413, f"an application/dicom+json part: {exc}: send fewer instances per request") from None
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise DicomwebError(400, "an application/dicom+json part is not JSON") from None
        items = data if isinstance(data, list) else [data]
        if not all(isinstance(item, dict) for item in items):
            raise DicomwebError(400, "an application/dicom+json part must hold a DICOM JSON data set or an array of them")
        data_sets += items
        if len(data_sets) > MAX_INSTANCES:  # counted as parsed: the request is refused before a data set is read
            raise DicomwebError(413, f"the request holds over {MAX_INSTANCES} instances: send fewer per request")
    return data_sets, _named(bulk)


def _named(bulk: list[ReceivedPart]) -> dict[str, ReceivedPart]:
    """Each bulk data part by the names a BulkDataURI may give it: `cid:` + its Content-ID, its Content-Location."""
    named: dict[str, ReceivedPart] = {}
    for part in bulk:
        content_id = part.headers.get("content-id", "").strip().removeprefix("<").removesuffix(">")
        location = part.headers.get("content-location", "").strip()
        for name in (f"cid:{content_id}" if content_id else "", location):
            if not name:
                continue
            if name in named:  # which of the two a data set meant cannot be known: storing either could be wrong
                raise DicomwebError(400, f"two parts of the request are named {name[:100]!r} (Content-Location or "
                                         "Content-ID): a BulkDataURI must name one part")
            named[name] = part
    return named


def _first(data: dict[str, Any], tag: str) -> str | None:
    """An element's first value as text, None when absent, empty or not a string (read before the data set is checked,
    so a failure can still name its instance)."""
    element = data.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    value = values[0] if isinstance(values, list) and values else None
    return value.strip() or None if isinstance(value, str) else None


def _problem(data: dict[str, Any], depth: int = 0) -> str | None:
    """What makes `data` other than a DICOM JSON data set (PS3.18 F.2), naming the element; None when nothing."""
    for tag, element in data.items():
        if not _TAG.fullmatch(tag):
            return f"{tag[:16]!r} is not a tag (8 hexadecimal digits)"
        if not isinstance(element, dict):
            return f"element {tag} is not a JSON object"
        vr = element.get("vr")
        if vr not in _VRS:
            return f"element {tag}: vr {str(vr)[:8]!r} is not a DICOM VR"
        forms = [key for key in ("Value", "BulkDataURI", "InlineBinary") if key in element]
        if len(forms) > 1:
            return f"element {tag} has both {forms[0]} and {forms[1]}"
        if not forms:
            continue
        if forms[0] != "Value":
            if vr not in _BINARY:  # bulk data is only fetched for Pixel Data: a text sent so would be read as nothing
                return f"element {tag}: {forms[0]} for VR {vr}: send its Value"
            if not isinstance(element[forms[0]], str):
                return f"element {tag}: {forms[0]} is not a string"
            if forms[0] == "InlineBinary" and not _is_base64(element["InlineBinary"]):
                return f"element {tag}: InlineBinary is not base64"
            continue
        values = element["Value"]
        if not isinstance(values, list):
            return f"element {tag}: Value is not an array"
        if vr in _BINARY:
            return f"element {tag}: VR {vr} is sent as InlineBinary or BulkDataURI, not Value"
        for value in values:
            problem = _value_problem(tag, vr, value, depth)
            if problem:
                return problem
    return None


def _value_problem(tag: str, vr: str, value: Any, depth: int) -> str | None:
    if value is None:  # an empty value of a multi-valued element (F.2.5)
        return None
    if vr == "SQ":
        if not isinstance(value, dict):
            return f"element {tag}: a sequence item is not a JSON object"
        if depth >= MAX_DEPTH:
            return f"element {tag}: sequences nested over {MAX_DEPTH} deep"
        return _problem(value, depth + 1)
    if vr == "PN":
        if not isinstance(value, dict) or not all(key in ("Alphabetic", "Ideographic", "Phonetic") and isinstance(group, str)
                                                  for key, group in value.items()):
            return f"element {tag}: a PN value is an object of Alphabetic, Ideographic, Phonetic strings"
        return None
    if vr in _NUMBERS or vr in ("DS", "IS"):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number and not (vr in ("DS", "IS") and isinstance(value, str)):  # senders write DS and IS either way
            return f"element {tag}: a {vr} value is a number"
        return None
    if not isinstance(value, str):
        return f"element {tag}: a {vr} value is a string"
    return None


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def instance(gw: Gateway, source: Source, data: dict[str, Any], named: dict[str, ReceivedPart], study: str | None,
             out: Outcome) -> None:
    """One data set and its image stored, or failed in `out` with why."""
    sop_class = _first(data, "00080016") or VL_PHOTOGRAPHIC_IMAGE
    sop = _first(data, "00080018") or ""
    problem = _problem(data)
    if problem:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"not a DICOM JSON data set: {problem}", malformed=True)
        return
    # the URL's study stands for a StudyInstanceUID the metadata leaves out
    missing = [name for tag, name in REQUIRED.items() if not _first(data, tag) and not (tag == "0020000D" and study)]
    if missing:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"required attributes missing: {', '.join(missing)}", malformed=True)
        return
    if sop_class != VL_PHOTOGRAPHIC_IMAGE:
        out.fail(sop_class, sop, SOP_CLASS_NOT_SUPPORTED, f"image bulk data is stored as VL Photographic Image ({VL_PHOTOGRAPHIC_IMAGE}), "
                                                          f"not {sop_class}")
        return
    part_study = _first(data, "0020000D") or study or ""
    if study is not None and part_study != study:
        out.fail(sop_class, sop, DOES_NOT_MATCH, f"the instance is of study {part_study}, not {study} as the URL says")
        out.mismatched += 1
        return
    uri = (data.get("7FE00010") or {}).get("BulkDataURI")
    part = named.get(uri) if uri else None  # exactly: no part is named "" or "cid:"
    if part is None:
        said = "is empty" if uri in ("", "cid:") else "names no part of the request" if uri else "is missing"
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"PixelData's BulkDataURI {said}: it must be an image part's Content-Location, "
                                                    "or cid: and its Content-ID", malformed=True)
        return
    media = part.content_type.split(";")[0].strip().lower()
    if media not in IMAGE_TYPES:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"bulk data of type {media or '(none)'}: send image/jpeg or image/png")
        return
    try:
        ds = Dataset.from_json(data, bulk_data_uri_handler=lambda _tag, _vr, _uri: b"")
    except Exception as exc:  # pydicom raises many kinds on a value it cannot convert
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"a DICOM JSON value cannot be read ({type(exc).__name__})", malformed=True)
        return
    try:
        # what the capture device says about the photo (body site, laterality, when, device, operator, descriptions),
        # mapped by the core's one mapping of DICOM attributes, as for a received object; UIDs and lengths checked
        gov = received.governance_of(ds)
        patient = PatientRef.dicom(_first(data, "00100020") or "", _first(data, "00100021") or "")
    except IngestRejected as exc:  # a bad value (0xC000) or UID (0xA900, as a Part 10 object's is answered)
        out.fail(sop_class, sop, REASON.get(exc.code, CANNOT_UNDERSTAND), exc.message, malformed=True)
        return
    except Exception as exc:  # pydicom raises many kinds on a malformed DICOM JSON value
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"a DICOM JSON value cannot be read ({type(exc).__name__})", malformed=True)
        return
    # the part's own file, read by the ingest (another data set may name the same part: removed with the request)
    image = ImageFile(part.path, sha256=part.sha256 or None, sop_instance_uid=sop, received_size=None if part.kept else part.size)
    request = CaptureRequest(source=source, items=[image], patient=patient, governance=gov, study_uid=part_study,
                             series_uid=_first(data, "0020000E"))
    ingest_one(gw, out, request, sop_class, sop)
