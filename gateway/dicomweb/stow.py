"""STOW-RS (PS3.18 10.5): instances in, through the one core ingest, answered only after each is committed.

Two forms of request body (multipart/related, chunked or not; each part to a spool file of its own as it arrives,
hashed on the way: multipart_in.py):
- `application/dicom` parts: each a Part 10 object, ingested as a received object (kept byte for byte);
- `application/dicom+json` metadata with `image/jpeg` or `image/png` bulk data parts (IHE Web-based Image
  Capture): each data set names its PixelData part by BulkDataURI (the part's Content-Location or cid:
  Content-ID). The image goes in as an image file with the sender's Study, Series and SOP Instance UIDs, its
  patient (PatientID + IssuerOfPatientID) and what the data set says about the photo (body site, laterality, when
  taken, device, operator, descriptions: the core's mapping of DICOM attributes, received.governance_of; a bad
  coded value or date fails the instance with 0xC000 naming it); the pixel description (size, samples, colour)
  comes from the image itself as for any upload, never from the JSON, and a progressive JPEG is made baseline by
  the ingest.

Each instance is stored or refused on its own. The answer is DICOM JSON: ReferencedSOPSequence (with RetrieveURLs)
and FailedSOPSequence with FailureReason codes from the core's refusal codes. 200 all stored, 202 some (or stored with a
warning: an image already stored as another instance is answered by that instance, WarningReason 0xB000), 409 none
(400 when none could be read or a required attribute was missing; 409 as well for a study mismatch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom import Dataset
from starlette.concurrency import run_in_threadpool

from gateway.core.context import Gateway
from gateway.core.ingest import errors, received
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import ingest, uploader
from gateway.core.ingest.request import CaptureRequest, Channel, ImageFile, PatientRef, ReceivedObject, Source
from gateway.core.objects import part10
from gateway.core.objects.text import words
from gateway.core.objects.vlphoto import VL_PHOTOGRAPHIC_IMAGE
from gateway.dicomweb.common import Caller, DicomwebError, base_url, dicom_json, gw_of
from gateway.dicomweb.media import DICOM, DICOM_JSON, MULTIPART, content_type_params, parse_accept
from gateway.dicomweb.multipart_in import BadMultipart, PartsReceiver, ReceivedPart, TooManyParts
from gateway.http.json_body import TooComplex, loads_bounded

log = logging.getLogger("clinphoto.dicomweb")
router = APIRouter()

# FailureReason (0008,1197): PS3.18 10.5.3 and the storage statuses of PS3.4 B.2.3
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # also: an instance of another study than the URL names
CANNOT_UNDERSTAND = 0xC000
COERCED = 0xB000  # WarningReason: Coercion of Data Elements
REASON = {
    errors.SOP_CLASS_NOT_SUPPORTED: SOP_CLASS_NOT_SUPPORTED,
    errors.INVALID_OBJECT: DOES_NOT_MATCH,
    errors.NOT_FAITHFUL: DOES_NOT_MATCH,
    errors.TRANSFER_SYNTAX_NOT_SUPPORTED: CANNOT_UNDERSTAND,
    errors.UNSUPPORTED_TYPE: CANNOT_UNDERSTAND,
    errors.CORRUPT: CANNOT_UNDERSTAND,
    errors.BAD_METADATA: CANNOT_UNDERSTAND,
    errors.TOO_LARGE: OUT_OF_RESOURCES,
    errors.TOO_MANY_PIXELS: OUT_OF_RESOURCES,
    errors.PATIENT_MERGED: OUT_OF_RESOURCES,  # the patient changed while storing: the same request again will file right
    errors.DUPLICATE_INSTANCE: DUPLICATE_SOP_INSTANCE,
    errors.FORBIDDEN: NOT_AUTHORIZED,
    errors.INSUFFICIENT_SCOPE: NOT_AUTHORIZED,
    errors.UNKNOWN_PATIENT: PROCESSING_FAILURE,
}
IMAGE_TYPES = ("image/jpeg", "image/png")
REQUIRED_JSON = {"0020000D": "StudyInstanceUID", "0020000E": "SeriesInstanceUID", "00080018": "SOPInstanceUID",
                 "00100020": "PatientID"}
MAX_BODY_FACTOR = 4  # a request may carry several photos: up to this many times ingest.max_bytes
# a DICOM JSON metadata part is read whole and parsed: some kB an instance (MAX_PARTS of them fit), where the request's
# own limit would let one part be 800 MB of JSON
MAX_JSON_PART = 8 * 1024 * 1024


@dataclass
class Outcome:
    stored: list[tuple[str, str, str, str]] = field(default_factory=list)  # class, instance, study, series
    warnings: dict[str, str] = field(default_factory=dict)  # stored instance -> why it differs from what was sent
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # class, instance, reason, why
    malformed: int = 0  # failures the request itself caused (unreadable, required attributes missing)
    mismatched: int = 0  # instances of another study than the URL names

    def fail(self, sop_class: str, sop: str, reason: int, why: str, *, malformed: bool = False) -> None:
        self.failed.append((sop_class, sop, reason, why))
        self.malformed += malformed


def _ingest(gw: Gateway, out: Outcome, request: CaptureRequest, sop_class: str, sop: str) -> None:
    try:
        result = ingest(gw, request)  # returns after the commit: nothing is acknowledged before
    except IngestRejected as exc:  # audited by the core
        out.fail(sop_class, sop, REASON.get(exc.code, PROCESSING_FAILURE), exc.message)
        return
    except Exception as exc:  # our failure, not the sender's
        log.error("STOW-RS: an instance could not be stored: %s", type(exc).__name__)
        log.debug("STOW-RS failure", exc_info=True)
        out.fail(sop_class, sop, PROCESSING_FAILURE, f"not stored ({type(exc).__name__}); send it again")
        return
    photo = result.photos[0]
    out.stored.append((sop_class, photo.sop_instance_uid, photo.study_uid, photo.series_uid))
    if sop and photo.sop_instance_uid != sop:
        # the same image of the same patient is kept once (the core's rule): say where it is, not where it was asked
        out.warnings[photo.sop_instance_uid] = f"this image is already stored as instance {photo.sop_instance_uid}, not {sop}"


def _dicom_part(gw: Gateway, source: Source, part: ReceivedPart, study: str | None, out: Outcome) -> None:
    path = part.path
    try:
        if not part.kept:  # over ingest.max_bytes as it came: nothing to read, the core refuses it for its size
            _ingest(gw, out, CaptureRequest(source=source, items=[ReceivedObject(path, received_size=part.size)]), "", "")
            return
        try:
            # the header the ingest reads too, read once and handed on: the door's own read of three UIDs took 0.76 ms
            # of a 12-MP instance, the door and the ingest's reads together 2.24 -> 1.99 ms (traced in the server)
            head = part10.read_head(path)
            ds = head.dataset
            # pydicom converts a value when it is read: a malformed one raises here, not in read_head
            sop_class, sop = str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
            part_study = str(ds.get("StudyInstanceUID", "") or "")
        except part10.Part10Error as exc:
            out.fail("", "", CANNOT_UNDERSTAND, f"a part: {exc}", malformed=True)
            return
        except Exception as exc:  # pydicom raises many kinds on garbage
            out.fail("", "", CANNOT_UNDERSTAND, f"a part is not a readable DICOM Part 10 object ({type(exc).__name__})",
                     malformed=True)
            return
        if study is not None and part_study != study:
            out.fail(sop_class, sop, DOES_NOT_MATCH, f"the instance is of study {part_study or '(none)'}, not {study} as the URL says")
            out.mismatched += 1
            return
        # the part's file becomes the blob (linked, not copied), named by the SHA-256 worked out as it came
        item = ReceivedObject(path, spooled=True, sha256=part.sha256, head=head)
        _ingest(gw, out, CaptureRequest(source=source, items=[item]), sop_class, sop)
    finally:
        path.unlink(missing_ok=True)


def _value(data: dict[str, Any], tag: str) -> str | None:
    values = (data.get(tag) or {}).get("Value") or []
    return str(values[0]).strip() or None if values else None


def _bulk(parts: list[ReceivedPart], uri: str) -> ReceivedPart | None:
    """The bulk data part a BulkDataURI names: `cid:` and a part's Content-ID, else its Content-Location (the same,
    or one an absolute URL ending in the other, as senders write them either way)."""
    for part in parts:
        if uri.startswith("cid:"):
            if part.headers.get("content-id", "").strip().strip("<>") == uri[4:]:
                return part
            continue
        location = part.headers.get("content-location", "").strip()
        if location and (location == uri or uri.endswith("/" + location) or location.endswith("/" + uri)):
            return part
    return None


def _json_instance(gw: Gateway, source: Source, data: dict[str, Any], bulk: list[ReceivedPart], study: str | None,
                   out: Outcome) -> None:
    sop_class = _value(data, "00080016") or VL_PHOTOGRAPHIC_IMAGE
    sop = _value(data, "00080018") or ""
    # the URL's study stands for a StudyInstanceUID the metadata leaves out
    missing = [name for tag, name in REQUIRED_JSON.items() if not _value(data, tag) and not (tag == "0020000D" and study)]
    if missing:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"required attributes missing: {', '.join(missing)}", malformed=True)
        return
    if sop_class != VL_PHOTOGRAPHIC_IMAGE:
        out.fail(sop_class, sop, SOP_CLASS_NOT_SUPPORTED, f"image bulk data is stored as VL Photographic Image ({VL_PHOTOGRAPHIC_IMAGE}), "
                                                          f"not {sop_class}")
        return
    part_study = _value(data, "0020000D") or study or ""
    if study is not None and part_study != study:
        out.fail(sop_class, sop, DOES_NOT_MATCH, f"the instance is of study {part_study}, not {study} as the URL says")
        out.mismatched += 1
        return
    uri = (data.get("7FE00010") or {}).get("BulkDataURI")
    part = _bulk(bulk, str(uri)) if uri else None
    if part is None:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, "PixelData (7FE00010) needs a BulkDataURI naming an image part of the request "
                                                    "(its Content-Location, or cid: and its Content-ID)", malformed=True)
        return
    media = part.content_type.split(";")[0].strip().lower()
    if media not in IMAGE_TYPES:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"bulk data of type {media or '(none)'}: send image/jpeg or image/png")
        return
    try:
        patient = PatientRef.dicom(_value(data, "00100020") or "", _value(data, "00100021") or "")
    except IngestRejected as exc:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, exc.message, malformed=True)
        return
    try:
        # what the capture device says about the photo (body site, laterality, when, device, operator, descriptions),
        # mapped by the core's one mapping of DICOM attributes, as for a received object
        gov = received.governance_of(Dataset.from_json(data, bulk_data_uri_handler=lambda _tag, _vr, _uri: b""))
    except IngestRejected as exc:
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, exc.message, malformed=True)
        return
    except Exception as exc:  # pydicom raises many kinds on a malformed DICOM JSON value
        out.fail(sop_class, sop, CANNOT_UNDERSTAND, f"a DICOM JSON value cannot be read ({type(exc).__name__})", malformed=True)
        return
    # the part's own file, read by the ingest (another data set may name the same part: removed with the request)
    image = ImageFile(part.path, sha256=part.sha256 or None, sop_instance_uid=sop, received_size=None if part.kept else part.size)
    request = CaptureRequest(source=source, items=[image],
                             patient=patient, governance=gov, study_uid=part_study, series_uid=_value(data, "0020000E"))
    _ingest(gw, out, request, sop_class, sop)


def _json_parts(gw: Gateway, source: Source, json_parts: list[ReceivedPart], bulk: list[ReceivedPart],
                study: str | None, out: Outcome) -> None:
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
        for item in data if isinstance(data, list) else [data]:
            if not isinstance(item, dict):
                raise DicomwebError(400, "an application/dicom+json part must hold a DICOM JSON data set or an array of them")
            _json_instance(gw, source, item, bulk, study, out)


def store_all(gw: Gateway, source: Source, parts: list[ReceivedPart], part_type: str, study: str | None) -> Outcome:
    if not parts:
        raise DicomwebError(400, "the request holds no parts")
    out = Outcome()
    json_parts, bulk = [], []
    for part in parts:
        media = (part.content_type.split(";")[0].strip().lower()) or part_type
        if media == DICOM:
            _dicom_part(gw, source, part, study, out)
        elif media == DICOM_JSON:
            json_parts.append(part)
        else:
            bulk.append(part)
    _json_parts(gw, source, json_parts, bulk, study, out)
    if not out.stored and not out.failed:
        raise DicomwebError(400, "no instance in the request: send application/dicom parts, or application/dicom+json with bulk data parts")
    return out


def response(out: Outcome, base: str, study: str | None) -> Response:
    ds = Dataset()
    if study is not None or len({s[2] for s in out.stored}) == 1:
        ds.RetrieveURL = f"{base}/studies/{study or out.stored[0][2]}"
    referenced = []
    for sop_class, sop, st, se in out.stored:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        item.RetrieveURL = f"{base}/studies/{st}/series/{se}/instances/{sop}"
        if sop in out.warnings:
            item.WarningReason = COERCED
            item.add_new(0x00000902, "LO", words(out.warnings[sop]))
        referenced.append(item)
    failed = []
    for sop_class, sop, reason, why in out.failed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        item.FailureReason = reason
        item.add_new(0x00000902, "LO", words(why))  # ErrorComment: why, in words
        failed.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    if not out.failed and not out.warnings:
        status = 200
    elif out.stored:
        status = 202  # stored, with failures or warnings
    elif out.malformed == len(out.failed) and not out.mismatched:
        status = 400
    else:
        status = 409
    return dicom_json(ds.to_json_dict(), status)


async def _receive_parts(gw: Gateway, request: Request, boundary: str) -> list[ReceivedPart]:
    """The body's parts, each to a spool file as it arrives (chunked transfer coding too), refused over the limit."""
    limit = gw.settings.ingest.max_bytes * MAX_BODY_FACTOR
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise DicomwebError(413, f"the body is over {limit // (1024 * 1024)} MiB: send fewer instances per request")
    # a part is kept up to the larger of the two limits parts have: one longer is refused for its size, having
    # taken no more disk than that (it was spooled whole, up to the request's limit of four of them)
    receiver = PartsReceiver(boundary, lambda: gw.spool.new_file(prefix="stow-", suffix=".part"),
                             part_limit=max(gw.settings.ingest.max_bytes, MAX_JSON_PART))
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise DicomwebError(413, f"the body is over {limit // (1024 * 1024)} MiB: send fewer instances per request")
            receiver.feed(chunk)
        return receiver.close()
    except BadMultipart as exc:
        receiver.discard()
        raise DicomwebError(400, str(exc)) from None
    except TooManyParts as exc:
        receiver.discard()
        raise DicomwebError(413, str(exc)) from None
    except BaseException:
        receiver.discard()
        raise


async def _store(request: Request, subject: Caller, study: str | None) -> Response:
    gw = gw_of(request)
    if not any(r.covers("application/dicom+json") or r.media == "application/json" for r in parse_accept(request.headers.get("accept"))):
        raise DicomwebError(406, "the STOW-RS answer is sent as application/dicom+json")
    media, params = content_type_params(request.headers.get("content-type", ""))
    part_type = (params.get("type") or "").lower()
    if media != MULTIPART or part_type not in (DICOM, DICOM_JSON):
        raise DicomwebError(415, f'STOW-RS takes {MULTIPART}; type="{DICOM}" (Part 10 objects) or type="{DICOM_JSON}" '
                                 "(DICOM JSON metadata with image/jpeg or image/png bulk data)")
    boundary = params.get("boundary")
    if not boundary:
        raise DicomwebError(400, f"the Content-Type {MULTIPART} has no boundary parameter")
    try:
        source = await run_in_threadpool(uploader, gw, subject, Channel.STOW)
    except IngestRejected as exc:  # audited by the core
        raise DicomwebError(403, exc.message) from None
    parts = await _receive_parts(gw, request, boundary)
    try:
        out = await run_in_threadpool(store_all, gw, source, parts, part_type, study)
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)
    log.info("STOW-RS: %d stored, %d failed", len(out.stored), len(out.failed))
    return response(out, base_url(request), study)


@router.post("/studies")
async def store_instances(request: Request, subject: Caller) -> Response:
    return await _store(request, subject, None)


@router.post("/studies/{study}")
async def store_study(request: Request, study: str, subject: Caller) -> Response:
    return await _store(request, subject, study)
