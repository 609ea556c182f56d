"""REST read door: list a patient's photos, read one, fetch its image (policy inside every query).

GET /api/v1/photos?patient=system|value&limit=&offset=   newest first, paged, totals right
GET /api/v1/photos/{id}
GET /api/v1/photos/{id}/image?rendition=original|preview|thumbnail

A photo the caller may not see answers 404 exactly like one that does not
exist; the denial and its reasons go to the audit trail only.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, or_, select

from gateway import access_audit
from gateway.auth import Subject, require_scope, require_subject
from gateway.consents import ConsentError, access_list, grant_access, revoke_access, set_sensitivity
from gateway.policy import (
    AccessContext,
    PolicyRefusal,
    check_request,
    consent_summary,
    decide_in,
    filter_for,
    may_see_original,
    resolve,
    utc,
)
from store import audit
from store.models import Asset, Consent
from store.patients import find_patient

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/photos", tags=["photos"])

MAX_LIMIT = 200
NOT_FOUND = "photo not found"


def _context(request: Request, subject: Subject, interaction: str) -> AccessContext:
    gw = request.app.state.gw
    ctx = resolve(subject, gw.settings.policy, interaction=interaction)
    try:
        check_request(ctx)
    except PolicyRefusal as exc:
        access_audit.record_refusal(gw, ctx, f"{request.method} {request.url.path}")
        raise HTTPException(exc.status, str(exc)) from None
    return ctx


def _parse_patient(text: str) -> tuple[str, str]:
    system, sep, value = text.partition("|")
    if not sep or not system.strip() or not value.strip():
        raise HTTPException(400, "patient must be system|value, e.g. https://fhir.nhs.uk/Id/nhs-number|9449305552")
    return system.strip(), value.strip()


def _newest_first():
    return (func.coalesce(Asset.taken_at, Asset.created_at).desc(), Asset.id.desc())


def _links(asset: Asset, original: bool) -> dict:
    base = f"/api/v1/photos/{asset.id}"
    links = {"self": base}
    if asset.preview_sha256:
        links["preview"] = f"{base}/image?rendition=preview"
    if asset.thumbnail_sha256:
        links["thumbnail"] = f"{base}/image?rendition=thumbnail"
    if original and asset.original_kept:
        links["original"] = f"{base}/image?rendition=original"
    image = links.get("preview") or links.get("original")
    if image:
        links["image"] = image
    return links


def _iso(moment) -> str | None:
    return utc(moment).isoformat().replace("+00:00", "Z") if moment is not None else None


def photo_json(asset: Asset, consents: list, original: bool) -> dict:
    return {
        "id": asset.id,
        "patient": asset.patient_id,
        "description": asset.description,
        "original_filename": asset.original_filename,
        "body_site": (
            {"system": "http://snomed.info/sct", "code": asset.body_site_code, "display": asset.body_site_display, "laterality": asset.laterality}
            if asset.body_site_code or asset.body_site_display or asset.laterality else None
        ),
        "view": asset.view,
        "specialty": asset.specialty,
        "sensitivity": asset.sensitivity,
        "consent": consent_summary(asset, consents),
        "taken_at": _iso(asset.taken_at),
        "stored_at": _iso(asset.created_at),
        "media_type": asset.media_type,
        "width": asset.width,
        "height": asset.height,
        "study_uid": asset.study_uid,
        "sop_instance_uid": asset.sop_instance_uid,
        "links": _links(asset, original),
    }


def _consents_for(session, assets: list[Asset]) -> list:
    if not assets:
        return []
    patients = {a.patient_id for a in assets}
    linked = {a.consent_id for a in assets if a.consent_id}
    cond = Consent.patient_id.in_(patients)
    if linked:
        cond = or_(cond, Consent.id.in_(linked))
    return list(session.scalars(select(Consent).where(cond)))


@router.get("")
def list_photos(
    request: Request,
    subject: Annotated[Subject, Depends(require_subject)],
    patient: Annotated[str | None, Query(description="The patient, as identifier system|value")] = None,
    site: Annotated[str | None, Query(max_length=20, description="Only photos of this body site (SNOMED CT code), for comparison")] = None,
    laterality: Annotated[Literal["left", "right", "both"] | None, Query(description="Only photos of this side")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict:
    """The photos of a patient the caller may see, newest first."""
    if patient is None:
        raise HTTPException(400, "the patient parameter is required: patient=system|value")
    system, value = _parse_patient(patient)
    ctx = _context(request, subject, "search")
    gw = request.app.state.gw
    where = filter_for(ctx, gw.settings.policy)
    with gw.db.read() as session:
        found = find_patient(session, system, value)
        if found is None:
            # unknown and hidden look the same: an empty page
            total, assets, consents = 0, [], []
        else:
            scope = [Asset.patient_id == found.id, where]
            if site:
                scope.append(Asset.body_site_code == site)
            if laterality:
                scope.append(Asset.laterality == laterality)
            total = session.scalar(select(func.count()).select_from(Asset).where(*scope))
            assets = list(session.scalars(select(Asset).where(*scope).order_by(*_newest_first()).limit(limit).offset(offset)))
            consents = _consents_for(session, assets)
        session.expunge_all()  # keep the loaded rows usable after the read transaction ends
    original = may_see_original(subject, gw.settings.policy)
    items = [photo_json(a, consents, original) for a in assets]
    results = {found.id: [a.id for a in assets]} if found is not None and assets else {}
    access_audit.record_search(gw, ctx, query=f"{request.url.path}?{request.url.query}", results=results)
    links = {"self": f"/api/v1/photos?{request.url.query}"}
    if offset + len(items) < total:
        links["next"] = f"/api/v1/photos?{request.url.include_query_params(offset=offset + limit, limit=limit).query}"
    return {"total": total, "offset": offset, "limit": limit, "items": items, "links": links}


def _visible_asset(request: Request, ctx: AccessContext, photo_id: str, what: str) -> tuple[Asset, list]:
    """The photo if the caller may see it (policy inside the query); else audit the denial and 404."""
    gw = request.app.state.gw
    policy = gw.settings.policy
    with gw.db.read() as session:
        asset = session.scalars(select(Asset).where(Asset.id == photo_id, filter_for(ctx, policy))).first()
        if asset is not None:
            consents = _consents_for(session, [asset])
            session.expunge_all()  # keep the loaded rows usable after the read transaction ends
            return asset, consents
        decision = decide_in(session, ctx, policy, photo_id)
        row = session.get(Asset, photo_id)
        patient_id = row.patient_id if row is not None else None
    access_audit.record_read(gw, ctx, asset_id=photo_id, patient_id=patient_id, permitted=False, reasons=decision.reasons, what=what)
    raise HTTPException(404, NOT_FOUND)


@router.get("/{photo_id}")
def read_photo(request: Request, photo_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """One photo's details, if the caller may see it."""
    ctx = _context(request, subject, "read")
    gw = request.app.state.gw
    asset, consents = _visible_asset(request, ctx, photo_id, "read")
    access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="read")
    return photo_json(asset, consents, may_see_original(subject, gw.settings.policy))


@router.get("/{photo_id}/image")
def photo_image(
    request: Request,
    photo_id: str,
    subject: Annotated[Subject, Depends(require_subject)],
    rendition: Annotated[Literal["original", "preview", "thumbnail"], Query()] = "preview",
) -> FileResponse:
    """The photo's image: the original as received (roles allowed originals only), or a derived rendition."""
    ctx = _context(request, subject, "read")
    gw = request.app.state.gw
    asset, _ = _visible_asset(request, ctx, photo_id, "retrieve")
    detail = {"rendition": rendition}
    if rendition == "original" and not may_see_original(subject, gw.settings.policy):
        reason = f"rendition: DENIED - originals are only for roles {', '.join(gw.settings.policy.original_roles) or 'none'}"
        access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=False, reasons=[reason], what="retrieve", detail=detail)
        raise HTTPException(403, f"the original is only for roles {', '.join(gw.settings.policy.original_roles) or 'none'}; ask for rendition=preview")
    if rendition == "original":
        sha, media_type = (asset.sha256 if asset.original_kept else None), asset.media_type
    else:
        sha, media_type = (asset.preview_sha256 if rendition == "preview" else asset.thumbnail_sha256), "image/jpeg"
    if not sha:
        raise HTTPException(404, f"this photo has no {rendition} rendition" + (" (the original was not kept)" if rendition == "original" else ""))
    path = gw.blobs.path(sha)
    if not path.is_file():
        log.error("blob %s of photo %s (%s) is missing from the blob store", sha, asset.id, rendition)
        raise HTTPException(500, f"the stored {rendition} of this photo is missing; run `clinphoto store check`")
    access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="retrieve", detail=detail)
    stem = (asset.original_filename or asset.id).rsplit(".", 1)[0]
    suffix = {"image/jpeg": "jpg", "image/png": "png", "image/heic": "heic", "image/tiff": "tif"}.get(media_type, "bin")
    return FileResponse(
        path,
        media_type=media_type,
        filename=f"{stem}-{rendition}.{suffix}" if rendition != "original" else (asset.original_filename or f"{asset.id}.{suffix}"),
        content_disposition_type="inline",
        headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"},
    )


# -- governance: sensitivity and access list (medical illustration staff) --------------------------


class SensitivityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sensitivity: Literal["N", "R", "V"]


def _governor(request: Request, subject: Subject) -> None:
    policy = request.app.state.gw.settings.policy
    if subject.role not in policy.governance_roles:
        raise HTTPException(403, f"only roles {', '.join(policy.governance_roles) or 'none'} may change who sees a photo")
    require_scope(subject, "Media", "u", request.app.state.gw.settings.auth.realm)


def _governance(call):
    try:
        return call()
    except ConsentError as exc:
        if str(exc).startswith("no photo"):
            raise HTTPException(404, NOT_FOUND) from None
        raise HTTPException(400, str(exc)) from None


def _access_json(rows) -> dict:
    return {"subjects": [{"subject": r.subject, "granted_by": r.granted_by, "granted_at": _iso(r.created_at)} for r in rows]}


@router.get("/{photo_id}/access")
def get_access_list(request: Request, photo_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """Who is named on the photo's access list (medical illustration staff)."""
    _governor(request, subject)
    gw = request.app.state.gw
    with gw.db.read() as session:
        row = session.get(Asset, photo_id)
        if row is None:
            raise HTTPException(404, NOT_FOUND)
        patient_id, body = row.patient_id, _access_json(access_list(session, photo_id))
    ctx = resolve(subject, gw.settings.policy)
    access_audit.write(gw, [access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="access-list",
                                                    patient_id=patient_id, entities=[{"type": "asset", "id": photo_id}])])
    return body


@router.put("/{photo_id}/access/{grantee}")
def grant(request: Request, photo_id: str, grantee: str, subject: Annotated[Subject, Depends(require_subject)]) -> JSONResponse:
    """Name a person (user id, or a DICOM peer's AE title) on the photo's access list."""
    _governor(request, subject)
    gw = request.app.state.gw
    with gw.db.write() as session:
        added = _governance(lambda: grant_access(session, photo_id, grantee, granted_by=subject.sub, actor_role=subject.role,
                                                 actor_network=access_audit.source_of(subject)))
        body = _access_json(access_list(session, photo_id))
    return JSONResponse(body, status_code=201 if added else 200)


@router.delete("/{photo_id}/access/{grantee}", status_code=204)
def revoke(request: Request, photo_id: str, grantee: str, subject: Annotated[Subject, Depends(require_subject)]) -> Response:
    """Take a person off the photo's access list (effective at once on every exit)."""
    _governor(request, subject)
    gw = request.app.state.gw
    with gw.db.write() as session:
        removed = _governance(lambda: revoke_access(session, photo_id, grantee, revoked_by=subject.sub, actor_role=subject.role,
                                                    actor_network=access_audit.source_of(subject)))
    if not removed:
        raise HTTPException(404, f"{grantee} is not on this photo's access list")
    return Response(status_code=204)


@router.put("/{photo_id}/sensitivity")
def reclassify(request: Request, photo_id: str, body: SensitivityIn, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """Set the photo's sensitivity (N, R or V)."""
    _governor(request, subject)
    gw = request.app.state.gw
    with gw.db.write() as session:
        asset = _governance(lambda: set_sensitivity(session, photo_id, body.sensitivity, changed_by=subject.sub,
                                                    actor_role=subject.role, actor_network=access_audit.source_of(subject)))
        return {"id": asset.id, "sensitivity": asset.sensitivity}
