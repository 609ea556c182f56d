"""STOW-RS (PS3.18 10.5): instances in, through the one core ingest, answered only after each is committed.

Two forms of request body (multipart/related, chunked or not; each part to a spool file of its own as it arrives,
hashed on the way: multipart_in.py):
- `application/dicom` parts: each a Part 10 object, ingested as a received object (kept byte for byte);
- `application/dicom+json` metadata with `image/jpeg` or `image/png` bulk data parts (IHE Web-based Image
  Capture): stow_json.py.

What the request as a whole must be is checked before any instance is stored, so a request refused whole (400, 413)
has stored nothing; after that each instance is stored or refused on its own and answered so (stow_outcome.py)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from gateway.core.context import Gateway
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import uploader
from gateway.core.ingest.request import CaptureRequest, Channel, ReceivedObject, Source
from gateway.core.objects import part10
from gateway.dicomweb import stow_json
from gateway.dicomweb.common import Caller, DicomwebError, base_url, gw_of
from gateway.dicomweb.media import DICOM, DICOM_JSON, MULTIPART, content_type_params, parse_accept
from gateway.dicomweb.multipart_in import BadMultipart, PartsReceiver, ReceivedPart, TooManyParts
from gateway.dicomweb.stow_json import MAX_INSTANCES, MAX_JSON_PART
from gateway.dicomweb.stow_outcome import CANNOT_UNDERSTAND, DOES_NOT_MATCH, Outcome, ingest_one, response
from gateway.http.boundary import boundary_problem

log = logging.getLogger("clinphoto.dicomweb")
router = APIRouter()

MAX_BODY_FACTOR = 4  # a request may carry several photos: up to this many times ingest.max_bytes


def _dicom_part(gw: Gateway, source: Source, part: ReceivedPart, study: str | None, out: Outcome) -> None:
    path = part.path
    try:
        if not part.kept:  # over ingest.max_bytes as it came: nothing to read, the core refuses it for its size
            ingest_one(gw, out, CaptureRequest(source=source, items=[ReceivedObject(path, received_size=part.size)]), "", "")
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
        ingest_one(gw, out, CaptureRequest(source=source, items=[item]), sop_class, sop)
    finally:
        path.unlink(missing_ok=True)


def store_all(gw: Gateway, source: Source, parts: list[ReceivedPart], part_type: str, study: str | None) -> Outcome:
    if not parts:
        raise DicomwebError(400, "the request holds no parts")
    dicom: list[ReceivedPart] = []
    json_parts: list[ReceivedPart] = []
    bulk: list[ReceivedPart] = []
    for part in parts:
        media = (part.content_type.split(";")[0].strip().lower()) or part_type
        (dicom if media == DICOM else json_parts if media == DICOM_JSON else bulk).append(part)
    # every check of the request as a whole before the first instance is stored: refused whole, it stored nothing
    data_sets, named = stow_json.read(json_parts, bulk)
    if len(dicom) + len(data_sets) > MAX_INSTANCES:
        raise DicomwebError(413, f"the request holds over {MAX_INSTANCES} instances: send fewer per request")
    out = Outcome()
    for part in dicom:
        _dicom_part(gw, source, part, study, out)
    for data in data_sets:
        stow_json.instance(gw, source, data, named, study, out)
    if not out.stored and not out.failed:
        raise DicomwebError(400, "no instance in the request: send application/dicom parts, or application/dicom+json with bulk data parts")
    return out


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
    boundary = params.get("boundary") or ""
    if problem := boundary_problem(boundary):
        raise DicomwebError(400, f"{MULTIPART}: {problem}")
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
