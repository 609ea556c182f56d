"""WADO-RS (PS3.18 10.4): studies, series and instances as multipart/related DICOM, their metadata as DICOM JSON,
an instance's frame, rendered and thumbnail images.

Which instances: the core StudyQuery at IMAGE level (the policy inside the query, audited), then the core's
access.dicom_objects (each retrieve audited, today's patient module). A hidden instance is answered exactly like
a missing one (404). Objects go as stored unless the client accepts no stored transfer syntax; images are never
compressed by the HTTP layer (no GZip middleware anywhere in this app: JPEG does not shrink, and gzipping it made
Orthanc's WADO-RS 130-185 ms instead of 16 ms, peers-measured.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gateway.core import access, study_query
from gateway.core.access import DicomObject
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.policy.rules import AccessContext
from gateway.core.study_query import Match, StudyQuery
from gateway.dicomweb import pixels
from gateway.dicomweb.common import CHANNEL, Caller, DicomwebError, base_url, dicom_json, gw_of, what
from gateway.dicomweb.media import (
    DICOM,
    EXPLICIT_VR_LE,
    FRAME_MEDIA,
    MULTIPART,
    OCTET_STREAM,
    MediaRange,
    Part,
    multipart,
    multipart_type,
    new_boundary,
    parse_accept,
)
from store import audit

router = APIRouter()

NATIVE = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
NOT_HERE = "no such {what} here, or none you may see"
DICOM_ACCEPTS = f'{MULTIPART}; type="{DICOM}"; transfer-syntax=* (as stored) or transfer-syntax={EXPLICIT_VR_LE} (decoded)'
IMAGE_MEDIA = ("image/jpeg", "image/png")


@dataclass(frozen=True)
class Target:
    study: str
    series: str | None = None
    sop: str | None = None

    @property
    def name(self) -> str:
        return "instance" if self.sop else "series" if self.series else "study"


def _query(target: Target) -> StudyQuery:
    return StudyQuery(level="IMAGE", study_uids=[target.study], series_uids=[target.series] if target.series else None,
                      sop_uids=[target.sop] if target.sop else None)


def _matches(gw: Gateway, subject: Subject, target: Target, text: str) -> tuple[AccessContext, list[Match]]:
    """The visible instances the URL names (the query audited), or 404 when there are none."""
    ctx = access.photo_request(gw, subject, "read", text)
    access.require_scope(gw, ctx, "Media", access.READ_SCOPE, text)
    found = [m for m in study_query.find(gw, ctx, _query(target), query=text, channel=CHANNEL) if m.asset_id]
    if not found:
        raise DicomwebError(404, NOT_HERE.format(what=target.name))
    return ctx, found


def _objects(gw: Gateway, subject: Subject, target: Target, text: str, type_code: str) -> list[DicomObject]:
    """The visible instances the URL names as served, the query and the retrieve audited together; 404 when none."""
    ctx = access.photo_request(gw, subject, "read", text)
    access.require_scope(gw, ctx, "Media", access.READ_SCOPE, text)
    objects = access.dicom_objects_matching(gw, ctx, _query(target), query=text, channel=CHANNEL, type_code=type_code)
    if not objects:
        raise DicomwebError(404, NOT_HERE.format(what=target.name))
    return objects


# -- DICOM instances ------------------------------------------------------------------------------------


def dicom_syntaxes(ranges: list[MediaRange]) -> set[str]:
    """The transfer syntaxes the client takes application/dicom parts in ("*": any, as stored)."""
    accepted: set[str] = set()
    for r in ranges:
        if r.media in ("*/*", "multipart/*"):
            accepted.add("*")
        elif r.media == MULTIPART and (r.part_type or DICOM) in (DICOM, "*/*"):
            # no transfer-syntax parameter: the media type's default, Explicit VR Little Endian (PS3.18 8.7.3.5.2)
            accepted.add(r.transfer_syntax or EXPLICIT_VR_LE)
    return accepted


def _dicom_parts(objects: list[DicomObject], accepted: set[str]) -> Iterator[Part]:
    for obj in objects:
        ts = obj.served.transfer_syntax
        if "*" in accepted or ts in accepted:
            yield Part(f"{DICOM}; transfer-syntax={ts}", obj.served.chunks())
        else:
            yield Part(f"{DICOM}; transfer-syntax={EXPLICIT_VR_LE}", pixels.decoded_part10(obj))


async def _retrieve(request: Request, subject: Caller, target: Target) -> Response:
    gw = gw_of(request)
    accepted = dicom_syntaxes(parse_accept(request.headers.get("accept")))
    if not accepted:
        raise DicomwebError(406, f"instances are sent as {DICOM_ACCEPTS}")
    objects = await run_in_threadpool(_objects, gw, subject, target, f"WADO-RS {what(request)}", audit.INSTANCES_TRANSFERRED)
    if not ("*" in accepted or EXPLICIT_VR_LE in accepted) and any(o.served.transfer_syntax not in accepted for o in objects):
        stored = ", ".join(sorted({o.served.transfer_syntax for o in objects}))
        raise DicomwebError(406, f"stored as {stored}; ask for transfer-syntax=* (as stored) or {EXPLICIT_VR_LE} (decoded)")
    boundary = new_boundary()
    return StreamingResponse(multipart(_dicom_parts(objects, accepted), boundary), media_type=multipart_type(DICOM, boundary))


@router.get("/studies/{study}")
async def retrieve_study(request: Request, study: str, subject: Caller) -> Response:
    return await _retrieve(request, subject, Target(study))


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, study: str, series: str, subject: Caller) -> Response:
    return await _retrieve(request, subject, Target(study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(request: Request, study: str, series: str, sop: str, subject: Caller) -> Response:
    return await _retrieve(request, subject, Target(study, series, sop))


# -- metadata -------------------------------------------------------------------------------------------


def _metadata(objects: list[DicomObject], base: str) -> list[dict]:
    out = []
    for obj in objects:
        data = pixels.header_json(obj)
        a = obj.asset
        url = f"{base}/studies/{a.study_uid}/series/{a.series_uid}/instances/{a.sop_instance_uid}"
        data["7FE00010"] = {"vr": "OB", "BulkDataURI": f"{url}/frames/1"}
        data["00083002"] = {"vr": "UI", "Value": [obj.served.transfer_syntax]}  # AvailableTransferSyntaxUID
        out.append(data)
    return out


async def _metadata_of(request: Request, subject: Caller, target: Target) -> Response:
    ranges = parse_accept(request.headers.get("accept"))
    if not any(r.covers("application/dicom+json") or r.media == "application/json" for r in ranges):
        raise DicomwebError(406, "metadata is sent as application/dicom+json")
    gw = gw_of(request)
    objects = await run_in_threadpool(_objects, gw, subject, target, f"WADO-RS {what(request)}", audit.REST)
    return dicom_json(await run_in_threadpool(_metadata, objects, base_url(request)))


@router.get("/studies/{study}/metadata")
async def study_metadata(request: Request, study: str, subject: Caller) -> Response:
    return await _metadata_of(request, subject, Target(study))


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, study: str, series: str, subject: Caller) -> Response:
    return await _metadata_of(request, subject, Target(study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
async def instance_metadata(request: Request, study: str, series: str, sop: str, subject: Caller) -> Response:
    return await _metadata_of(request, subject, Target(study, series, sop))


# -- frames ---------------------------------------------------------------------------------------------


def frame_choice(ranges: list[MediaRange], stored: str) -> tuple[str, bool] | None:
    """(the part's media type, whether the frame is decoded) for the first range the stored frame can answer."""
    stored_media = FRAME_MEDIA.get(stored, OCTET_STREAM)
    for r in ranges:
        if r.media in ("*/*", "multipart/*") or (r.media == MULTIPART and r.part_type in (None, "*/*")):
            return stored_media, False
        if r.media != MULTIPART:
            continue
        part = r.part_type or ""
        if part == OCTET_STREAM:
            ts = r.transfer_syntax or EXPLICIT_VR_LE
            if ts == "*" or ts == stored or (ts == EXPLICIT_VR_LE and stored in NATIVE):
                return OCTET_STREAM, False
            if ts == EXPLICIT_VR_LE:
                return OCTET_STREAM, True
        elif part == stored_media and (r.transfer_syntax in (None, "*", stored)):
            return stored_media, False
    return None


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(n) for n in frames.split(",")]
    except ValueError:
        raise DicomwebError(400, f"frames {frames!r}: a comma-separated list of frame numbers from 1") from None
    if not numbers or min(numbers) < 1:
        raise DicomwebError(400, f"frames {frames!r}: frame numbers start at 1")
    if max(numbers) > 1:
        raise DicomwebError(404, f"frame {max(numbers)} does not exist: the instance has 1 frame")
    return numbers


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
async def retrieve_frames(request: Request, study: str, series: str, sop: str, frames: str, subject: Caller) -> Response:
    numbers = _frame_numbers(frames)
    ranges = parse_accept(request.headers.get("accept"))
    gw = gw_of(request)
    objects = await run_in_threadpool(_objects, gw, subject, Target(study, series, sop), f"WADO-RS {what(request)}",
                                      audit.INSTANCES_TRANSFERRED)
    obj = objects[0]
    stored = obj.served.transfer_syntax
    choice = frame_choice(ranges, stored)
    if choice is None:
        raise DicomwebError(406, f"the frame is stored as {stored} ({FRAME_MEDIA.get(stored, OCTET_STREAM)}); ask for "
                                 f'{MULTIPART}; type="{OCTET_STREAM}"; transfer-syntax=* (as stored), type="{OCTET_STREAM}" '
                                 f'(decoded), or type="{FRAME_MEDIA.get(stored, OCTET_STREAM)}"')
    media, decode = choice
    data = await run_in_threadpool(pixels.decoded_frame if decode else pixels.frame, obj)
    ts = EXPLICIT_VR_LE if decode else stored
    boundary = new_boundary()
    parts = [Part(f"{media}; transfer-syntax={ts}", [data]) for _ in numbers]
    return StreamingResponse(multipart(parts, boundary), media_type=multipart_type(media, boundary, ts))


# -- rendered and thumbnail -----------------------------------------------------------------------------


def _image_media(request: Request) -> str:
    for r in parse_accept(request.headers.get("accept")):
        for media in IMAGE_MEDIA:
            if r.covers(media):
                return media
    raise DicomwebError(406, "rendered images are sent as image/jpeg or image/png")


def _viewport(request: Request, known: set[str]) -> tuple[tuple[int, int] | None, int | None]:
    params = request.query_params
    unknown = set(params) - known
    if unknown:
        raise DicomwebError(400, f"{', '.join(sorted(unknown))}: not supported here; give {', '.join(sorted(known))}")
    viewport = None
    if "viewport" in params:
        parts = params["viewport"].split(",")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise DicomwebError(400, "viewport: give the width and height in pixels, e.g. viewport=512,512")
        viewport = (int(parts[0]), int(parts[1]))
    quality = None
    if "quality" in params:
        q = params["quality"]
        if not q.isdigit() or not 1 <= int(q) <= 100:
            raise DicomwebError(400, "quality: a whole number from 1 to 100")
        quality = int(q)
    return viewport, quality


def _rendition(gw: Gateway, subject: Subject, target: Target, text: str, viewport: tuple[int, int] | None,
               prefer_thumbnail: bool) -> access.StoredImage:
    """The smallest stored rendition that still fills the viewport (thumbnail, else preview) of the first instance."""
    ctx, found = _matches(gw, subject, target, text)
    fits = gw.settings.ingest.thumbnail_size
    small = viewport is None and prefer_thumbnail or viewport is not None and max(viewport) <= fits
    asset_id = found[0].asset_id or ""
    return access.image(gw, ctx, asset_id, "thumbnail" if small else "preview", text)


async def _render(request: Request, subject: Caller, target: Target, thumbnail: bool) -> Response:
    media = _image_media(request)
    viewport, quality = _viewport(request, {"viewport", "quality", "iccprofile"} if not thumbnail else {"viewport"})
    gw = gw_of(request)
    image = await run_in_threadpool(_rendition, gw, subject, target, f"WADO-RS {what(request)}", viewport, thumbnail)
    if media == "image/jpeg" and quality is None and (viewport is None or pixels.fits(image.path, viewport)):
        return FileResponse(image.path, media_type="image/jpeg")  # the stored rendition itself, byte for byte
    with open(image.path, "rb") as f:
        source = f.read()
    return Response(await run_in_threadpool(pixels.rendered, source, media, viewport, quality), media_type=media)


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
async def instance_rendered(request: Request, study: str, series: str, sop: str, subject: Caller) -> Response:
    return await _render(request, subject, Target(study, series, sop), thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered")
async def frame_rendered(request: Request, study: str, series: str, sop: str, frames: str, subject: Caller) -> Response:
    _frame_numbers(frames)
    return await _render(request, subject, Target(study, series, sop), thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
async def instance_thumbnail(request: Request, study: str, series: str, sop: str, subject: Caller) -> Response:
    return await _render(request, subject, Target(study, series, sop), thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail")
async def series_thumbnail(request: Request, study: str, series: str, subject: Caller) -> Response:
    return await _render(request, subject, Target(study, series), thumbnail=True)


@router.get("/studies/{study}/thumbnail")
async def study_thumbnail(request: Request, study: str, subject: Caller) -> Response:
    return await _render(request, subject, Target(study), thumbnail=True)
