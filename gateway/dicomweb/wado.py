"""WADO-RS (PS3.18 10.4): studies, series and instances as multipart/related DICOM, their metadata as DICOM JSON,
an instance's frame, rendered and thumbnail images.

Which instances: the core StudyQuery at IMAGE level (the policy inside the query, audited), then the core's
access.dicom_objects (each retrieve audited, today's patient module). A hidden instance is answered exactly like
a missing one (404). Objects go as stored unless the client accepts no stored transfer syntax; images are never
compressed by the HTTP layer (no GZip middleware anywhere in this app: JPEG does not shrink, and gzipping it made
Orthanc's WADO-RS 130-185 ms instead of 16 ms, peers-measured.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from gateway.core import access, study_query
from gateway.core.access import DicomObject
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.policy.rules import AccessContext
from gateway.core.refusals import Kind, Refused
from gateway.core.study_query import Match, StudyQuery
from gateway.dicomweb import pixels
from gateway.dicomweb.common import CHANNEL, Caller, DicomwebError, answer_format, base_url, data_sets, gw_of, what
from gateway.dicomweb.media import (
    DICOM,
    EXPLICIT_VR_LE,
    FRAME_MEDIA,
    MULTIPART,
    OCTET_STREAM,
    FileRange,
    MediaRange,
    MultipartResponse,
    Part,
    SizedPart,
    multipart,
    multipart_type,
    new_boundary,
    parse_accept,
)
from gateway.http.numbers import NotANumber, shown, whole_number
from gateway.http.security import require_subject
from store import audit

router = APIRouter()

NATIVE = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
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


def _callers_objects(request: Request, target: Target, accepted: set[str]) -> list[DicomObject]:
    """The caller, as the Caller dependency makes it (the same refusals, audited), then the objects, in one call on
    the thread pool: the dependency's own call there cost ~0.5 ms before the first byte (0.4 ms running, 0.1 ms back,
    timed in the server), about a tenth of it."""
    subject = require_subject(request)
    if not accepted:
        raise DicomwebError(406, f"instances are sent as {DICOM_ACCEPTS}")
    return _objects(gw_of(request), subject, target, f"WADO-RS {what(request)}", audit.INSTANCES_TRANSFERRED)


async def _retrieve(request: Request, target: Target) -> Response:
    accepted = dicom_syntaxes(parse_accept(request.headers.get("accept")))
    objects = await run_in_threadpool(_callers_objects, request, target, accepted)
    if not ("*" in accepted or EXPLICIT_VR_LE in accepted) and any(o.served.transfer_syntax not in accepted for o in objects):
        stored = ", ".join(sorted({o.served.transfer_syntax for o in objects}))
        raise DicomwebError(406, f"stored as {stored}; ask for transfer-syntax=* (as stored) or {EXPLICIT_VR_LE} (decoded)")
    boundary = new_boundary()
    if "*" in accepted or all(o.served.transfer_syntax in accepted for o in objects):
        # every object as stored: its new header, then the rest of the stored file, with a Content-Length
        parts = [SizedPart(f"{DICOM}; transfer-syntax={o.served.transfer_syntax}",
                           (o.served.header, *[p if isinstance(p, bytes) else FileRange(o.served.source, *p) for p in o.served.tail]))
                 for o in objects]
        return MultipartResponse(parts, boundary, multipart_type(DICOM, boundary))
    return StreamingResponse(multipart(_dicom_parts(objects, accepted), boundary), media_type=multipart_type(DICOM, boundary))


@router.get("/studies/{study}")
async def retrieve_study(request: Request, study: str) -> Response:
    return await _retrieve(request, Target(study))


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, study: str, series: str) -> Response:
    return await _retrieve(request, Target(study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return await _retrieve(request, Target(study, series, sop))


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
    media = answer_format(request, "metadata")
    gw = gw_of(request)
    objects = await run_in_threadpool(_objects, gw, subject, target, f"WADO-RS {what(request)}", audit.REST)
    return data_sets(await run_in_threadpool(_metadata, objects, base_url(request)), media)


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


FrameMode = Literal["stored", "decoded", "encoded"]
ENCODED_FRAME_MEDIA = ("image/jpeg", "image/png")  # what a frame not stored as JPEG can be encoded as (Pillow)


def frame_choice(ranges: list[MediaRange], stored: str, single: bool = True) -> tuple[str, FrameMode, bool] | None:
    """(the part's media type, how the frame is made, whether multipart) for the first range the stored frame can
    answer: as stored, decoded to native pixels (octet-stream), or decoded and encoded as JPEG or PNG (a frame stored
    native, RLE or JPEG-LS asked for as image/jpeg). An image type named alone (Accept: image/jpeg) is answered by
    the image itself, and only when one frame is asked (`single`; PS3.18 10.4.4: single part types are for a
    resource that is a single item)."""
    stored_media = FRAME_MEDIA.get(stored, OCTET_STREAM)
    for r in ranges:
        if r.media in ("*/*", "multipart/*") or (r.media == MULTIPART and r.part_type in (None, "*/*")):
            return stored_media, "stored", True
        many = r.media == MULTIPART
        if many:
            part = r.part_type or ""
        elif r.media.startswith("image/") and single:
            part = r.media
        else:
            continue
        if part == OCTET_STREAM:
            ts = r.transfer_syntax or EXPLICIT_VR_LE
            if ts == "*" or ts == stored or (ts == EXPLICIT_VR_LE and stored in NATIVE):
                return OCTET_STREAM, "stored", many
            if ts == EXPLICIT_VR_LE:
                return OCTET_STREAM, "decoded", many
        elif part == stored_media and (r.transfer_syntax in (None, "*", stored)):
            return stored_media, "stored", many
        elif part in ENCODED_FRAME_MEDIA and r.transfer_syntax in (None, "*", JPEG_BASELINE if part == "image/jpeg" else None):
            return part, "encoded", many
    return None


# every instance here is one photo: one frame (the metadata's BulkDataURI names frames/1)
FRAME_COUNT = 1


def _frame_numbers(frames: str) -> list[int]:
    """The URL's frame list: numbers from 1, each once (PS3.18's {frames}: "one or more non duplicate frame numbers"),
    none past the instance's frames. So an answer holds at most the instance's frames: /frames/1,1,... (30,000 of them
    in a 60 KB URL) was answered with the one frame 30,000 times, 3.66 GB from a 122 KB frame."""
    numbers: list[int] = []
    for text in frames.split(","):
        try:
            number = whole_number(text, "frame", low=1)
        except NotANumber:
            raise DicomwebError(400, f"frames {shown(frames)}: a comma-separated list of frame numbers from 1 "
                                     f"(digits 0-9), not {shown(text)}") from None
        if number in numbers:  # a short list: at most FRAME_COUNT numbers are kept
            raise DicomwebError(400, f"frames {shown(frames)}: frame {number} is asked for more than once; name each frame once")
        if number > FRAME_COUNT:
            raise DicomwebError(404, f"frame {number} does not exist: the instance has {FRAME_COUNT} frame")
        numbers.append(number)
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
    choice = frame_choice(ranges, stored, single=len(numbers) == 1)
    if choice is None:
        as_stored = FRAME_MEDIA.get(stored, OCTET_STREAM)
        encoded = "" if as_stored == "image/jpeg" else ', type="image/jpeg" or type="image/png" (encoded from the decoded frame)'
        raise DicomwebError(406, f"the frame is stored as {stored} ({as_stored}); ask for "
                                 f'{MULTIPART}; type="{OCTET_STREAM}"; transfer-syntax=* (as stored), type="{OCTET_STREAM}" '
                                 f'(decoded), type="{as_stored}"{encoded}')
    media, mode, many = choice
    if mode == "encoded":
        data = await run_in_threadpool(pixels.frame_image, obj, media)
        ts: str | None = JPEG_BASELINE if media == "image/jpeg" else None
    else:
        data = await run_in_threadpool(pixels.decoded_frame if mode == "decoded" else pixels.frame, obj)
        ts = EXPLICIT_VR_LE if mode == "decoded" else stored
    if not many:
        return Response(data, media_type=media)  # asked for image/jpeg itself, not a multipart of it
    part_type = f"{media}; transfer-syntax={ts}" if ts else media
    boundary = new_boundary()
    parts = [Part(part_type, [data]) for _ in numbers]
    return StreamingResponse(multipart(parts, boundary), media_type=multipart_type(media, boundary, ts))


# -- rendered and thumbnail -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendering:
    """The rendering query parameters of PS3.18 8.3.5.1 that this door takes."""

    viewport: tuple[int, int] | None = None
    quality: int | None = None
    window: pixels.Window | None = None
    annotation: tuple[str, ...] = ()

    @property
    def as_stored(self) -> bool:
        """Whether the stored rendition answers as it is (nothing to change in its pixels)."""
        return self.quality is None and self.window is None and not self.annotation


RENDER_PARAMS = {"viewport", "quality", "window", "annotation", "iccprofile"}
# a rendition is fitted into the viewport, never enlarged: past JPEG's largest side (65,535, a 16-bit field of the
# frame header, ITU T.81 B.2.2) a viewport changes nothing
MAX_VIEWPORT = 65535


def _rendering(request: Request, known: set[str]) -> Rendering:
    params = request.query_params
    unknown = set(params) - known
    if unknown:
        raise DicomwebError(400, f"{', '.join(sorted(unknown))}: not supported here; give {', '.join(sorted(known))}")
    viewport = None
    if "viewport" in params:
        parts = params["viewport"].split(",")
        try:
            if len(parts) != 2:
                raise NotANumber(f"viewport={shown(params['viewport'])}: must be two whole numbers, width,height")
            viewport = (whole_number(parts[0], "width", low=1, high=MAX_VIEWPORT),
                        whole_number(parts[1], "height", low=1, high=MAX_VIEWPORT))
        except NotANumber as exc:
            raise DicomwebError(400, f"viewport: give the width and height in pixels, e.g. viewport=512,512 ({exc})") from None
    quality = None
    if "quality" in params:
        try:
            quality = whole_number(params["quality"], "quality", low=1, high=100)
        except NotANumber as exc:
            raise DicomwebError(400, str(exc)) from None
    return Rendering(viewport, quality, _window(params.get("window")), _annotation(params.get("annotation")))


def _window(text: str | None) -> pixels.Window | None:
    """window=center,width,function (PS3.18 8.3.5.1.3): decimals, the function one of linear, linear-exact, sigmoid."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise DicomwebError(400, f"window={text!r}: give center,width,function, e.g. window=128,256,linear "
                                 f"(function: {', '.join(pixels.WINDOW_FUNCTIONS)})")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise DicomwebError(400, f"window={text!r}: the center and width are decimal numbers") from None
    if not (math.isfinite(center) and math.isfinite(width)):
        raise DicomwebError(400, f"window={text!r}: the center and width are finite decimal numbers")
    function = parts[2].lower()
    if function not in pixels.WINDOW_FUNCTIONS:
        raise DicomwebError(400, f"window={text!r}: function {parts[2]!r} is not one of {', '.join(pixels.WINDOW_FUNCTIONS)}")
    if function == "linear" and width < 1:
        raise DicomwebError(400, f"window={text!r}: a linear window's width is at least 1 (PS3.3 C.11.2.1.2.1)")
    if width <= 0:
        raise DicomwebError(400, f"window={text!r}: a {function} window's width is greater than 0")
    return pixels.Window(center, width, function)


def _annotation(text: str | None) -> tuple[str, ...]:
    """annotation=patient,technique (PS3.18 8.3.5.1.1), in the order given, each once."""
    if text is None:
        return ()
    items = [a.strip().lower() for a in text.split(",")]
    wrong = [a for a in items if a not in pixels.ANNOTATIONS]
    if wrong or not items:
        raise DicomwebError(400, f"annotation={text!r}: give patient, technique or both (comma-separated)")
    return tuple(dict.fromkeys(items))


def _annotation_lines(source: access.RenderedSource, kinds: tuple[str, ...]) -> list[str]:
    """The text to burn in: the patient as the patient index names them now (the served objects' patient module), the
    technique from the photo's own record. Only for a caller the core has just let see this photo."""
    lines: list[str] = []
    asset = source.image.asset
    for kind in kinds:
        if kind == "patient":
            p = source.patient
            name = ", ".join(x for x in ((p.family or "").upper(), " ".join(x for x in (p.prefix, p.given) if x)) if x)
            born = f"  born {p.birth_date:%d %b %Y}" if p.birth_date else ""
            lines.append(f"{name or '(no name)'}{born}")
            lines.append(f"{p.issuer or 'ID'} {p.patient_id}".strip())
        else:
            site = asset.body_site_display or "body site not recorded"
            side = f" ({asset.laterality})" if asset.laterality else ""
            when = asset.taken_at or asset.created_at
            taken = f"  {when:%d %b %Y %H:%M}" if when else ""
            view = f", {asset.view}" if asset.view else ""
            lines.append(f"XC  {site}{side}{view}{taken}")
    return lines


def _image_media(request: Request) -> str:
    for r in parse_accept(request.headers.get("accept")):
        for media in IMAGE_MEDIA:
            if r.covers(media):
                return media
    raise DicomwebError(406, "rendered images are sent as image/jpeg or image/png")


def _rendered_media(request: Request, single: bool) -> tuple[str, bool]:
    """The rendered media type and whether the answer is multipart/related. PS3.18 10.4.4 (Table 10.4.4-1 and its
    notes): rendered resources are multipart/related; type=<image type>; a single part type (image/jpeg) only for a
    resource that is a single item (`single`: an instance or frame), and the server ignores single part types for a
    study or series, answering 406 if nothing else remains, even for a study of one image."""
    for r in parse_accept(request.headers.get("accept")):
        if r.media == MULTIPART:
            part = r.part_type or "image/jpeg"  # no type: the default rendered media type
            for media in IMAGE_MEDIA:
                if part == media or part in ("*/*", "image/*") and media == "image/jpeg":
                    return media, True
        elif r.media == "multipart/*":
            return "image/jpeg", True
        elif r.media == "*/*":
            return "image/jpeg", not single
        elif single:
            for media in IMAGE_MEDIA:
                if r.covers(media):
                    return media, False
    if single:
        raise DicomwebError(406, 'rendered images are sent as image/jpeg or image/png, or as multipart/related; type="image/jpeg" '
                                 'or type="image/png"')
    raise DicomwebError(406, 'a rendered study or series is sent as multipart/related; type="image/jpeg" or type="image/png" '
                             "(a single part type such as image/jpeg alone is for one instance: PS3.18 10.4.4)")


def _first_rendition(gw: Gateway, subject: Subject, target: Target, text: str,
                     rendition: Literal["preview", "thumbnail"]) -> access.StoredImage:
    """The stored rendition of the first visible instance the URL names that has one (a thumbnail stands for its
    series or study: an instance whose pixels did not decode has none, and the next one stands in)."""
    ctx, found = _matches(gw, subject, target, text)
    for match in found[:-1]:
        try:
            return access.image(gw, ctx, match.asset_id or "", rendition, text)
        except Refused as exc:
            if exc.kind != Kind.NOT_FOUND:
                raise
    return access.image(gw, ctx, found[-1].asset_id or "", rendition, text)


def _which(gw: Gateway, viewport: tuple[int, int] | None, prefer_thumbnail: bool = False) -> Literal["preview", "thumbnail"]:
    fits = gw.settings.ingest.thumbnail_size
    small = viewport is None and prefer_thumbnail or viewport is not None and max(viewport) <= fits
    return "thumbnail" if small else "preview"


def _annotation_detail(r: Rendering) -> dict[str, Any] | None:
    return {"annotation": list(r.annotation)} if r.annotation else None  # the audit says the patient's details were burned in


def _renditions(gw: Gateway, subject: Subject, target: Target, text: str, r: Rendering) -> list[access.RenderedSource]:
    """The stored renditions of every visible instance the URL names (hidden ones left out), or 404 when none."""
    ctx = access.photo_request(gw, subject, "read", text)
    access.require_scope(gw, ctx, "Media", access.READ_SCOPE, text)
    found = access.images_matching(gw, ctx, _query(target), _which(gw, r.viewport), query=text, channel=CHANNEL,
                                   detail=_annotation_detail(r))
    if not found:
        raise DicomwebError(404, NOT_HERE.format(what=target.name))
    return found


def _render_one(source: access.RenderedSource, media: str, r: Rendering) -> bytes:
    image = source.image
    if media == "image/jpeg" and r.as_stored and (r.viewport is None or pixels.fits(image.path, r.viewport)):
        return image.path.read_bytes()  # the stored rendition itself, byte for byte
    lines = _annotation_lines(source, r.annotation)
    return pixels.rendered(image.path.read_bytes(), media, r.viewport, r.quality, r.window, lines)


# an image with the patient's details burned in is not for shared caches
NO_STORE = {"Cache-Control": "private, no-store"}


async def _render(request: Request, subject: Caller, target: Target) -> Response:
    """Rendered instance, frame, series or study (PS3.18 10.4.1.1.3)."""
    media, many = _rendered_media(request, single=target.sop is not None)
    r = _rendering(request, RENDER_PARAMS)
    gw = gw_of(request)
    text = f"WADO-RS {what(request)}"
    headers = NO_STORE if r.annotation else None
    # the query and the retrieves in one audit commit, for an instance as for a study
    found = await run_in_threadpool(_renditions, gw, subject, target, text, r)
    if not many:  # an instance (or its frame) asked for as a single image
        image = found[0].image
        if media == "image/jpeg" and r.as_stored and (r.viewport is None or pixels.fits(image.path, r.viewport)):
            return FileResponse(image.path, media_type="image/jpeg")  # the stored rendition itself, byte for byte
        return Response(await run_in_threadpool(_render_one, found[0], media, r), media_type=media, headers=headers)

    def rendered_parts() -> Iterator[Part]:
        for source in found:
            yield Part(media, [_render_one(source, media, r)])

    boundary = new_boundary()
    # rendered one part at a time as the body streams (a study of 12 MP photos is not held in memory at once)
    return StreamingResponse(iterate_in_threadpool(multipart(rendered_parts(), boundary)),
                             media_type=multipart_type(media, boundary), headers=headers)


async def _thumbnail(request: Request, subject: Caller, target: Target) -> Response:
    media = _image_media(request)
    viewport = _rendering(request, {"viewport"}).viewport
    gw = gw_of(request)
    rendition = _which(gw, viewport, prefer_thumbnail=True)
    image = await run_in_threadpool(_first_rendition, gw, subject, target, f"WADO-RS {what(request)}", rendition)
    if media == "image/jpeg" and (viewport is None or pixels.fits(image.path, viewport)):
        return FileResponse(image.path, media_type="image/jpeg")  # the stored thumbnail itself, byte for byte
    return Response(await run_in_threadpool(pixels.rendered, image.path.read_bytes(), media, viewport, None), media_type=media)


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
async def instance_rendered(request: Request, study: str, series: str, sop: str, subject: Caller) -> Response:
    return await _render(request, subject, Target(study, series, sop))


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered")
async def frame_rendered(request: Request, study: str, series: str, sop: str, frames: str, subject: Caller) -> Response:
    _frame_numbers(frames)
    return await _render(request, subject, Target(study, series, sop))


@router.get("/studies/{study}/series/{series}/rendered")
async def series_rendered(request: Request, study: str, series: str, subject: Caller) -> Response:
    return await _render(request, subject, Target(study, series))


@router.get("/studies/{study}/rendered")
async def study_rendered(request: Request, study: str, subject: Caller) -> Response:
    return await _render(request, subject, Target(study))


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
async def instance_thumbnail(request: Request, study: str, series: str, sop: str, subject: Caller) -> Response:
    return await _thumbnail(request, subject, Target(study, series, sop))


@router.get("/studies/{study}/series/{series}/thumbnail")
async def series_thumbnail(request: Request, study: str, series: str, subject: Caller) -> Response:
    return await _thumbnail(request, subject, Target(study, series))


@router.get("/studies/{study}/thumbnail")
async def study_thumbnail(request: Request, study: str, subject: Caller) -> Response:
    return await _thumbnail(request, subject, Target(study))
