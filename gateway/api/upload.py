"""POST /api/v1/photos: the capture-app upload door. Translates HTTP <-> the ingest pipeline.

multipart/form-data with one or more parts named `files` and one JSON part named
`metadata`. The body is parsed as it arrives: each file part is streamed to a
spool file (hashed on the way; this process's spool folder, see store/spool.py)
and cut off as soon as it passes the size limit, so a 200 MiB upload never sits
in memory whole.

201: photos stored; 200: all of them were already stored (same content for this
patient, or a replay of the same Idempotency-Key); 413/415/422 with
{"error": code, "message": ..., "item"/"filename"/"field"} and nothing stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from gateway.api.json import patient_link
from gateway.api.schemas import WHEN, Problem, UploadOut, UploadProblem
from gateway.core import patient_views
from gateway.core.identity import Subject
from gateway.core.ingest import errors
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.limits import mib
from gateway.core.ingest.metadata import json_key, parse_metadata
from gateway.core.ingest.pipeline import IngestResult, audit_refusal, ingest, uncovered, uploader
from gateway.core.ingest.request import CaptureRequest, ImageFile, Source
from gateway.http.boundary import boundary_problem
from gateway.http.errors import challenge, problem_response
from gateway.http.security import gateway_of, require_subject
from store.spool import Spool

if TYPE_CHECKING:
    from hashlib import _Hash

router = APIRouter(prefix="/api/v1", tags=["photos"])

STATUS = {
    errors.UNSUPPORTED_TYPE: 415,
    errors.TOO_LARGE: 413,
    errors.CORRUPT: 422,
    errors.TOO_MANY_PIXELS: 422,
    errors.NOT_FAITHFUL: 422,
    errors.BAD_METADATA: 422,
    errors.UNKNOWN_PATIENT: 422,
    errors.UNKNOWN_ENCOUNTER: 422,
    errors.UNKNOWN_CONSENT: 422,
    errors.IDEMPOTENCY_CONFLICT: 422,
    errors.NO_FILES: 422,
    errors.DUPLICATE_INSTANCE: 409,
    errors.PATIENT_MERGED: 409,
    errors.FORBIDDEN: 403,
    errors.INSUFFICIENT_SCOPE: 403,
    errors.PATIENT_MISMATCH: 422,
    # DICOM objects (not accepted by this door today; the codes are mapped for completeness)
    errors.SOP_CLASS_NOT_SUPPORTED: 415,
    errors.TRANSFER_SYNTAX_NOT_SUPPORTED: 415,
    errors.INVALID_OBJECT: 422,
}
MAX_METADATA_BYTES = 64 * 1024


def _error(status: int, code: str, message: str, **extra) -> JSONResponse:
    return problem_response(status, code, message, **extra)  # the REST door's one error body


def _rejection(exc: IngestRejected, realm: str = "clinphoto") -> JSONResponse:
    body = exc.to_dict()
    if exc.field:  # the core names its fields; this door's JSON spells them in camelCase
        body["field"] = ",".join(json_key(f) for f in exc.field.split(","))
    response = _error(STATUS.get(exc.code, 422), exc.code, exc.message,
                      **{k: v for k, v in body.items() if k not in ("code", "message")})
    if exc.code == errors.INSUFFICIENT_SCOPE:
        response.headers.update(challenge(realm, "insufficient_scope", "needs a scope granting Media.c"))
    return response


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    path: Path | None = None
    file: BinaryIO | None = None
    digest: _Hash | None = None
    size: int = 0
    data: bytearray = field(default_factory=bytearray)

    def image_file(self) -> ImageFile:
        """A 'files' part, spooled: its path and digest are set together when its headers end."""
        assert self.path is not None and self.digest is not None, f"form part {self.name!r} was not spooled"
        return ImageFile(path=self.path, filename=self.filename, sha256=self.digest.hexdigest())


class _Form:
    """Push-parser callbacks: file parts go to spool files, the metadata part to a small buffer."""

    def __init__(self, spool: Spool, max_bytes: int, max_files: int) -> None:
        self.spool, self.max_bytes, self.max_files = spool, max_bytes, max_files
        self.parts: list[_Part] = []
        self.current: _Part | None = None
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self.error: IngestRejected | None = None

    # python-multipart callbacks
    def on_part_begin(self) -> None:
        self.current = _Part()
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        part = self.current
        assert part is not None, "the parser calls on_part_begin first"
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if part.name not in ("files", "metadata"):
            raise _Stop(IngestRejected(
                errors.BAD_METADATA, f"unknown form part {part.name!r}: send image parts named 'files' and one 'metadata' part",
                field=part.name,
            ))
        if part.name == "metadata" and any(p.name == "metadata" for p in self.parts):
            # refused at the second, not counted at the end: each is kept in memory (a chunked body of 24,000 of them
            # took the gateway to 1.8 GB before the count)
            raise _Stop(IngestRejected(errors.BAD_METADATA, "exactly one 'metadata' part (JSON) is required", field="metadata"))
        filename = options.get(b"filename")
        # NUL cannot be stored (PostgreSQL text) and never belongs in a file name
        part.filename = (
            os.path.basename(filename.decode("utf-8", "replace").replace("\\", "/")).replace("\x00", "") if filename is not None else None
        )
        if part.name == "files":
            if sum(1 for p in self.parts if p.name == "files") >= self.max_files:
                raise _Stop(IngestRejected(errors.BAD_METADATA, f"too many files: at most {self.max_files} per upload", field="files"))
            fd, part.path = self.spool.new_file(prefix="upload-")
            part.file = os.fdopen(fd, "wb")
            part.digest = hashlib.sha256()
        self.parts.append(part)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        assert part is not None, "the parser calls on_part_begin first"
        chunk = data[start:end]
        part.size += len(chunk)
        if part.file is not None and part.digest is not None:
            if part.size > self.max_bytes:
                raise _Stop(IngestRejected(
                    errors.TOO_LARGE, f"file too large: over the {mib(self.max_bytes)} limit",
                    item=sum(1 for p in self.parts if p.name == "files") - 1, filename=part.filename,
                ))
            part.digest.update(chunk)
            part.file.write(chunk)
        else:
            if part.size > MAX_METADATA_BYTES:
                raise _Stop(IngestRejected(errors.BAD_METADATA, f"form field {part.name!r} is too large", field=part.name))
            part.data += chunk

    def on_part_end(self) -> None:
        if self.current is not None and self.current.file is not None:
            self.current.file.close()
            self.current.file = None
        self.current = None

    def cleanup(self) -> None:
        for part in self.parts:
            if part.file is not None:
                part.file.close()
            if part.path is not None:
                part.path.unlink(missing_ok=True)


class _Stop(Exception):
    def __init__(self, rejection: IngestRejected) -> None:
        self.rejection = rejection


def _links(result: IngestResult) -> list[dict[str, object]]:
    photos: list[dict[str, object]] = []
    for p in result.photos:
        item: dict[str, object] = {
            "assetId": p.asset_id,
            "mediaId": p.asset_id,
            "status": p.status,
            "filename": p.filename,
            "sha256": p.sha256,
            "mediaType": p.media_type,
            "width": p.width,
            "height": p.height,
            "studyInstanceUid": p.study_uid,
            "seriesInstanceUid": p.series_uid,
            "sopInstanceUid": p.sop_instance_uid,
            "transferSyntaxUid": p.transfer_syntax,
            "quarantined": p.quarantined,
            "links": {
                "self": f"/api/v1/photos/{p.asset_id}",
                "preview": f"/api/v1/photos/{p.asset_id}/image?rendition=preview",
                "thumbnail": f"/api/v1/photos/{p.asset_id}/image?rendition=thumbnail",
                # FHIR Media and DICOMweb links join here when those doors open
            },
        }
        photos.append(item)
    return photos


_METADATA_EXAMPLE = {
    "patient": "https://fhir.nhs.uk/Id/nhs-number|9449305552",
    "encounter": "V100",
    "bodySite": {"code": "368209003", "laterality": "right"},
    "view": "lateral",
    "specialty": "330",
    "sensitivity": "N",
    "consent": {"level": "record", "givenBy": "patient", "capturedBy": "Nurse A", "date": "2024-03-05"},
    "photographer": "A Jones",
    "device": "Ward 7 iPhone",
    "takenAt": "2024-03-05T14:22:31Z",
    "description": "Wound, day 5",
}

_OPENAPI = {
    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 200},
                    "description": "A repeat with the same key (and the same request) returns the first answer with 200."}],
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files", "metadata"],
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "JPEG, PNG, HEIC/HEIF or 8-bit RGB TIFF; the type is read from the content"},
                    "metadata": {"type": "string", "description": "JSON object; keys: " + ", ".join(_METADATA_EXAMPLE) + ", consentId",
                                 "example": json.dumps(_METADATA_EXAMPLE)},
                },
            },
        }},
    },
}


@router.post(
    "/photos",
    status_code=201,
    summary="Upload photos (multipart: files + metadata)",
    openapi_extra=_OPENAPI,
    responses={
        200: {"model": UploadOut, "description": "Already stored (same content for this patient, or a replayed Idempotency-Key)"},
        201: {"model": UploadOut, "description": "Stored: asset and Media ids, Study/Series/SOP Instance UIDs, links"},
        400: {"model": UploadProblem, "description": "A malformed or interrupted multipart body"},
        401: {"model": Problem, "description": WHEN[401]},
        403: {"model": UploadProblem, "description": "Role or scopes do not allow uploads"},
        409: {"model": UploadProblem, "description": "A DICOM object's SOP Instance UID is stored with other content, "
              "or the patient was merged while the photo was being stored"},
        413: {"model": UploadProblem, "description": "A file is over the size limit"},
        415: {"model": UploadProblem, "description": "Not an accepted image type (sniffed from content), or not multipart/form-data"},
        422: {"model": UploadProblem, "description": "Corrupt/truncated, over the pixel limit, not representable faithfully, "
              "bad metadata, unknown patient/encounter/consent"},
    },
)
async def upload_photos(request: Request, subject: Subject = Depends(require_subject)) -> JSONResponse:
    gw = gateway_of(request)
    settings = gw.settings.ingest
    try:
        actor = await run_in_threadpool(uploader, gw, subject)
    except IngestRejected as exc:  # audited by the core
        return _rejection(exc, gw.settings.auth.realm)
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        return _error(415, "unsupported-media-type", "send multipart/form-data with parts 'files' and 'metadata'")
    if problem := boundary_problem(options[b"boundary"]):
        return _error(400, "bad-request", f"multipart/form-data: {problem}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_files * settings.max_bytes + MAX_METADATA_BYTES * 4:
        return _error(413, errors.TOO_LARGE, f"request too large: at most {settings.max_files} files of {mib(settings.max_bytes)}")
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 200):
        return _error(422, errors.BAD_METADATA, "Idempotency-Key must be 1-200 characters", field="Idempotency-Key")

    form = _Form(gw.spool, settings.max_bytes, settings.max_files)
    parser = MultipartParser(options[b"boundary"], callbacks={
        "on_part_begin": form.on_part_begin, "on_part_data": form.on_part_data, "on_part_end": form.on_part_end,
        "on_header_field": form.on_header_field, "on_header_value": form.on_header_value,
        "on_header_end": form.on_header_end, "on_headers_finished": form.on_headers_finished,
    })
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
            if form.current is not None or not form.parts:
                raise MultipartParseError("the body ends before the closing boundary")
        except _Stop as stop:
            await _audit_refused(gw, actor, stop.rejection)
            return _rejection(stop.rejection)
        except (MultipartParseError, ClientDisconnect) as exc:
            return _error(400, "bad-request", f"malformed or interrupted multipart body: {exc or type(exc).__name__}")
        meta_parts = [p for p in form.parts if p.name == "metadata"]
        files = [p for p in form.parts if p.name == "files"]
        unknown = sorted({p.name for p in form.parts if p.name not in ("metadata", "files")})
        try:
            if unknown:
                raise IngestRejected(errors.BAD_METADATA, f"unknown form part(s) {', '.join(map(repr, unknown))}: send 'files' and 'metadata'",
                                     field=",".join(unknown))
            if len(meta_parts) != 1:
                raise IngestRejected(errors.BAD_METADATA, "exactly one 'metadata' part (JSON) is required", field="metadata")
            if not files:
                raise IngestRejected(errors.NO_FILES, "no 'files' part: attach at least one image", field="files")
            meta = parse_metadata(bytes(meta_parts[0].data))
        except IngestRejected as exc:
            await _audit_refused(gw, actor, exc)
            return _rejection(exc)
        capture = CaptureRequest(
            source=actor, items=[p.image_file() for p in files],
            patient=meta.patient_ref(), governance=meta.governance(), idempotency_key=key)
        try:
            result = await run_in_threadpool(ingest, gw, capture)
        except IngestRejected as exc:  # already audited by the pipeline
            return _rejection(exc)
    finally:
        form.cleanup()
    photos = _links(result)
    public_id = await run_in_threadpool(patient_views.public_id_of, gw, result.patient_id)
    body: dict[str, object] = {"patient": patient_link(public_id), "consentId": result.consent_id, "replayed": result.replayed,
                               "photos": photos}
    hidden = await run_in_threadpool(uncovered, gw, result)
    if hidden:
        # stored, but invisible for care: say so now rather than leave the uploader puzzled by a later 404
        body["warnings"] = [
            f"no consent covers {len(hidden)} of these photo(s) for care: they stay hidden until a consent is "
            "recorded (metadata 'consent' or 'consentId', or POST /api/v1/consents)"
        ]
    for item in photos:
        item["consentCovered"] = item["assetId"] not in hidden
    return JSONResponse(body, status_code=201 if result.created else 200)


async def _audit_refused(gw, actor: Source, exc: IngestRejected) -> None:
    await run_in_threadpool(audit_refusal, gw, actor, exc, None)
