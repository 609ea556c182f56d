"""REST read door: a patient's photos, one photo, its image, and who may see it (gateway/core/access.py decides).

GET /api/v1/photos?patient=system|value&limit=&offset=   newest first, paged, totals right
GET /api/v1/photos/{id}
GET /api/v1/photos/{id}/image?rendition=original|preview|thumbnail
PUT /api/v1/photos/{id}/sensitivity, GET /api/v1/photos/{id}/access, PUT|DELETE /api/v1/photos/{id}/access/{name}

This module parses and renders only: every rule, refusal and audit record is the core's.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from gateway.api.json import iso, patient_link
from gateway.api.params import parse_patient
from gateway.api.schemas import AccessList, PhotoOut, PhotoPage, SensitivityOut, errors
from gateway.core import access
from gateway.core.access import PhotoView, StoreFault
from gateway.core.identity import Subject
from gateway.core.ingest import deferred
from gateway.core.refusals import Refused
from gateway.http.errors import http_error
from gateway.http.security import gateway_of, require_subject, what
from store.models import Asset, AssetAccess

router = APIRouter(prefix="/api/v1/photos", tags=["photos"])

MAX_LIMIT = 200
MAX_OFFSET = 1_000_000  # far beyond any patient's photos; bounds the SQL OFFSET (an int64 on PostgreSQL)
SUFFIX = {"image/jpeg": "jpg", "image/png": "png", "image/heic": "heic", "image/tiff": "tif"}


def _links(asset: Asset, original: bool) -> dict:
    base = f"/api/v1/photos/{asset.id}"
    links = {"self": base}
    if deferred.available(asset):  # a due preview is made on first asking
        links["preview"] = f"{base}/image?rendition=preview"
        links["thumbnail"] = f"{base}/image?rendition=thumbnail"
    if original and asset.original_kept:
        links["original"] = f"{base}/image?rendition=original"
    image = links.get("preview") or links.get("original")
    if image:
        links["image"] = image
    return links


def photo_json(view: PhotoView) -> dict[str, Any]:
    asset = view.asset
    consent = view.consent
    return {
        "id": asset.id,
        "patient": patient_link(view.patient),
        "description": asset.description,
        "originalFilename": asset.original_filename,
        "bodySite": (
            {"system": "http://snomed.info/sct", "code": asset.body_site_code, "display": asset.body_site_display,
             "laterality": asset.laterality}
            if asset.body_site_code or asset.body_site_display or asset.laterality else None
        ),
        "view": asset.view,
        "specialty": asset.specialty,
        "sensitivity": asset.sensitivity,
        "consent": {"id": consent.id, "level": consent.level, "status": consent.status,
                    "givenBy": consent.given_by} if consent else None,
        "takenAt": iso(asset.taken_at),
        "storedAt": iso(asset.created_at),
        "mediaType": asset.media_type,
        "width": asset.width,
        "height": asset.height,
        "studyInstanceUid": asset.study_uid,
        "sopInstanceUid": asset.sop_instance_uid,
        "links": _links(asset, view.original_allowed),
    }


def _refused(request: Request, refused: Refused) -> HTTPException:
    return http_error(refused, gateway_of(request).settings.auth.realm)


@router.get("", response_model=PhotoPage, responses=errors(400, 401, 403, 503))
def list_photos(
    request: Request,
    subject: Annotated[Subject, Depends(require_subject)],
    patient: Annotated[str | None, Query(description="The patient, as identifier system|value")] = None,
    site: Annotated[str | None, Query(max_length=20, description="Only photos of this body site (SNOMED CT code), for comparison")] = None,
    laterality: Annotated[Literal["left", "right", "both"] | None, Query(description="Only photos of this side")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict:
    """The photos of a patient the caller may see, newest first."""
    if patient is None:
        raise HTTPException(400, "the patient parameter is required: patient=system|value")
    ref = parse_patient(patient)
    gw = gateway_of(request)
    try:
        ctx = access.photo_request(gw, subject, "search", what(request))
        found = access.search(gw, ctx, patient=ref, query=f"{request.url.path}?{request.url.query}", site=site,
                              laterality=laterality, limit=limit, offset=offset)
    except Refused as refused:
        raise _refused(request, refused) from None
    items = [photo_json(v) for v in found.photos]
    links = {"self": f"/api/v1/photos?{request.url.query}"}
    if offset + len(items) < found.total:
        links["next"] = f"/api/v1/photos?{request.url.include_query_params(offset=offset + limit, limit=limit).query}"
    return {"total": found.total, "offset": offset, "limit": limit, "items": items, "links": links}


@router.get("/{photo_id}", response_model=PhotoOut, responses=errors(400, 401, 403, 404, 410))
def read_photo(request: Request, photo_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """One photo's details, if the caller may see it."""
    gw = gateway_of(request)
    try:
        ctx = access.photo_request(gw, subject, "read", what(request))
        return photo_json(access.read(gw, ctx, photo_id))
    except Refused as refused:
        raise _refused(request, refused) from None


@router.get("/{photo_id}/image", response_class=FileResponse, responses={
    200: {"content": {"image/jpeg": {}, "image/png": {}, "image/heic": {}, "image/tiff": {}},
          "description": "The image: a JPEG rendition, or the original as received (as a download)"},
    **errors(400, 401, 403, 404, 410, 500)})
def photo_image(
    request: Request,
    photo_id: str,
    subject: Annotated[Subject, Depends(require_subject)],
    rendition: Annotated[Literal["original", "preview", "thumbnail"], Query()] = "preview",
) -> FileResponse:
    """The photo's image: the original as received (roles allowed originals only), or a derived rendition."""
    gw = gateway_of(request)
    try:
        ctx = access.photo_request(gw, subject, "read", what(request))
        found = access.image(gw, ctx, photo_id, rendition, what(request))
    except Refused as refused:
        raise _refused(request, refused) from None
    except StoreFault as fault:
        raise HTTPException(500, str(fault)) from None
    suffix = SUFFIX.get(found.media_type, "bin")
    stem = safe_file_stem(found.asset.original_filename, found.asset.id)
    return FileResponse(
        found.path,
        media_type=found.media_type,
        filename=f"{stem}-{rendition}.{suffix}" if rendition != "original" else f"{stem}.{suffix}",
        # the original is the uploader's file, kept as evidence: a download, never rendered in the page
        content_disposition_type="attachment" if rendition == "original" else "inline",
        headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"},
    )


def safe_file_stem(filename: str | None, fallback: str) -> str:
    """A download name from the uploader's file name: letters, digits, '.', '-', '_' only, no path, no
    extension (the served type decides it), at most 80 characters."""
    stem = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80]
    return stem or fallback


# -- governance: sensitivity and access list (medical illustration staff) --------------------------


class SensitivityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sensitivity: Literal["N", "R", "V"]


def _access_json(rows: list[AssetAccess]) -> dict[str, Any]:
    return {"subjects": [{"subject": r.subject, "grantedBy": r.granted_by, "grantedAt": iso(r.created_at)} for r in rows]}


@router.get("/{photo_id}/access", response_model=AccessList, responses=errors(401, 403, 404))
def get_access_list(request: Request, photo_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """Who is named on the photo's access list (medical illustration staff)."""
    gw = gateway_of(request)
    try:
        ctx = access.governor(gw, subject, what(request))
        return _access_json(access.access_subjects(gw, ctx, photo_id, what(request)))
    except Refused as refused:
        raise _refused(request, refused) from None


@router.put("/{photo_id}/access/{grantee}", response_model=AccessList,
            responses={201: {"model": AccessList, "description": "Added"}, **errors(400, 401, 403, 404)})
def grant(request: Request, photo_id: str, grantee: str, subject: Annotated[Subject, Depends(require_subject)]) -> JSONResponse:
    """Name a person (user id, or a DICOM peer as ae:AETITLE) on the photo's access list."""
    gw = gateway_of(request)
    try:
        ctx = access.governor(gw, subject, what(request))
        added, rows = access.grant(gw, ctx, photo_id, grantee, what(request))
    except Refused as refused:
        raise _refused(request, refused) from None
    return JSONResponse(_access_json(rows), status_code=201 if added else 200)


@router.delete("/{photo_id}/access/{grantee}", status_code=204, responses=errors(401, 403, 404))
def revoke(request: Request, photo_id: str, grantee: str, subject: Annotated[Subject, Depends(require_subject)]) -> Response:
    """Take a person off the photo's access list (effective at once on every exit)."""
    gw = gateway_of(request)
    try:
        ctx = access.governor(gw, subject, what(request))
        access.revoke(gw, ctx, photo_id, grantee, what(request))
    except Refused as refused:
        raise _refused(request, refused) from None
    return Response(status_code=204)


@router.put("/{photo_id}/sensitivity", response_model=SensitivityOut, responses=errors(400, 401, 403, 404))
def reclassify(request: Request, photo_id: str, body: SensitivityIn, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """Set the photo's sensitivity (N, R or V)."""
    gw = gateway_of(request)
    try:
        ctx = access.governor(gw, subject, what(request))
        return {"id": photo_id, "sensitivity": access.reclassify(gw, ctx, photo_id, body.sensitivity, what(request))}
    except Refused as refused:
        raise _refused(request, refused) from None
