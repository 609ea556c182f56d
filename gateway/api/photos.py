"""REST read door: list a patient's photos, read one, fetch its image (policy inside every query).

GET /api/v1/photos?patient=system|value&limit=&offset=   newest first, paged, totals right
GET /api/v1/photos/{id}
GET /api/v1/photos/{id}/image?rendition=original|preview|thumbnail

A photo the caller may not see answers 404 exactly like one that does not
exist; the denial and its reasons go to the audit trail only.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, or_, select

from gateway import access_audit
from gateway.api.params import parse_patient
from gateway.auth import Subject, require_scope, require_subject
from gateway.consents import ConsentError, PhotoNotFound, access_list, grant_access, revoke_access, set_sensitivity
from gateway.policy import (
    AccessContext,
    PolicyRefusal,
    check_request,
    consent_summary,
    decide_in,
    filter_for,
    linked_consents,
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
MAX_OFFSET = 1_000_000  # far beyond any patient's photos; bounds the SQL OFFSET (an int64 on PostgreSQL)
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


def photo_json(asset: Asset, consents: list, original: bool, linked: set[str] = frozenset()) -> dict:
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
        "consent": consent_summary(asset, consents, linked),
        "taken_at": _iso(asset.taken_at),
        "stored_at": _iso(asset.created_at),
        "media_type": asset.media_type,
        "width": asset.width,
        "height": asset.height,
        "study_uid": asset.study_uid,
        "sop_instance_uid": asset.sop_instance_uid,
        "links": _links(asset, original),
    }


def _consents_for(session, assets: list[Asset]) -> tuple[list, dict[str, set[str]]]:
    """The consents that may apply to the photos, and each photo's linked consent ids."""
    if not assets:
        return [], {}
    links = linked_consents(session, [a.id for a in assets])
    patients = {a.patient_id for a in assets}
    linked = set().union(*links.values())
    cond = Consent.patient_id.in_(patients)
    if linked:
        cond = or_(cond, Consent.id.in_(sorted(linked)))
    return list(session.scalars(select(Consent).where(cond))), links


@router.get("")
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
    system, value = parse_patient(patient)
    ctx = _context(request, subject, "search")
    gw = request.app.state.gw
    try:
        require_scope(subject, "Media", "s", gw.settings.auth.realm)
    except HTTPException as exc:
        # no scope grants searching photos at all: a refusal (403 insufficient_scope), audited as one
        access_audit.record_refusal(gw, ctx, f"{request.method} {request.url.path}", reason=str(exc.detail))
        raise
    where = filter_for(ctx, gw.settings.policy)
    with gw.db.read() as session:
        found = find_patient(session, system, value)
        if found is None:
            # unknown and hidden look the same: an empty page
            total, assets, consents, links = 0, [], [], {}
        else:
            scope = [Asset.patient_id == found.id, where]
            if site:
                scope.append(Asset.body_site_code == site)
            if laterality:
                scope.append(Asset.laterality == laterality)
            total = session.scalar(select(func.count()).select_from(Asset).where(*scope))
            assets = list(session.scalars(select(Asset).where(*scope).order_by(*_newest_first()).limit(limit).offset(offset)))
            consents, links = _consents_for(session, assets)
        session.expunge_all()  # keep the loaded rows usable after the read transaction ends
    original = may_see_original(subject, gw.settings.policy)
    items = [photo_json(a, consents, original, links.get(a.id, set())) for a in assets]
    results = {found.id: [a.id for a in assets]} if found is not None and assets else {}
    access_audit.record_search(gw, ctx, query=f"{request.url.path}?{request.url.query}", results=results)
    links = {"self": f"/api/v1/photos?{request.url.query}"}
    if offset + len(items) < total:
        links["next"] = f"/api/v1/photos?{request.url.include_query_params(offset=offset + limit, limit=limit).query}"
    return {"total": total, "offset": offset, "limit": limit, "items": items, "links": links}


def _visible_asset(request: Request, ctx: AccessContext, photo_id: str, what: str) -> tuple[Asset, tuple]:
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
    asset, (consents, links) = _visible_asset(request, ctx, photo_id, "read")
    access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="read")
    return photo_json(asset, consents, may_see_original(subject, gw.settings.policy), links.get(asset.id, set()))


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
    suffix = {"image/jpeg": "jpg", "image/png": "png", "image/heic": "heic", "image/tiff": "tif"}.get(media_type, "bin")
    stem = safe_file_stem(asset.original_filename, asset.id)
    return FileResponse(
        path,
        media_type=media_type,
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


def _governor(request: Request, subject: Subject) -> AccessContext:
    """Medical illustration staff with an update scope on Media; every refusal is audited."""
    gw = request.app.state.gw
    policy = gw.settings.policy
    ctx = resolve(subject, policy)
    what = f"{request.method} {request.url.path}"
    if subject.role not in policy.governance_roles:
        message = f"only roles {', '.join(policy.governance_roles) or 'none'} may change who sees a photo"
        access_audit.record_refusal(gw, ctx, what, reason=message)
        raise HTTPException(403, message)
    try:
        require_scope(subject, "Media", "u", gw.settings.auth.realm)
    except HTTPException as exc:
        access_audit.record_refusal(gw, ctx, what, reason=str(exc.detail))
        raise
    return ctx


def _governed_asset(request: Request, ctx: AccessContext, session, photo_id: str, *, lock: bool = False) -> Asset:
    """The photo, if it exists and the governance caller may manage it: every rule but consent and
    sensitivity (staff manage V photos they cannot see). Hidden and missing give the same 404, audited."""
    gw = request.app.state.gw
    query = select(Asset).where(Asset.id == photo_id, filter_for(ctx, gw.settings.policy, skip=("consent", "sensitivity")))
    asset = session.scalars(query.with_for_update() if lock else query).first()
    if asset is None:
        row = session.get(Asset, photo_id)
        access_audit.append(session, access_audit.refusal_entries(
            ctx, f"{request.method} {request.url.path}", reason="governance: photo not found or not manageable by the caller",
            patient_id=row.patient_id if row is not None else None, entities=[{"type": "asset", "id": photo_id}],
        ))
        raise _NotFoundAfterAudit()
    return asset


class _NotFoundAfterAudit(Exception):
    """Raised inside a write transaction after its denial record was added: the block commits, then 404."""


def _access_json(rows) -> dict:
    return {"subjects": [{"subject": r.subject, "granted_by": r.granted_by, "granted_at": _iso(r.created_at)} for r in rows]}


def _governance_write(request: Request, ctx: AccessContext, photo_id: str, change):
    """Run change(session, asset) in one write transaction; a hidden or missing photo is a 404
    whose denial record still commits; a refused change is a 400."""
    gw = request.app.state.gw
    try:
        with gw.db.write() as session:
            try:
                asset = _governed_asset(request, ctx, session, photo_id, lock=True)
            except _NotFoundAfterAudit:
                return None
            return change(session, asset)
    except PhotoNotFound:
        raise HTTPException(404, NOT_FOUND) from None
    except ConsentError as exc:
        raise HTTPException(400, str(exc)) from None


@router.get("/{photo_id}/access")
def get_access_list(request: Request, photo_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """Who is named on the photo's access list (medical illustration staff)."""
    ctx = _governor(request, subject)
    gw = request.app.state.gw
    found = _governance_write(request, ctx, photo_id, lambda session, asset: (asset.patient_id, _access_json(access_list(session, asset.id))))
    if found is None:
        raise HTTPException(404, NOT_FOUND)
    patient_id, body = found
    access_audit.write(gw, [access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="access-list",
                                                    patient_id=patient_id, entities=[{"type": "asset", "id": photo_id}])])
    return body


@router.put("/{photo_id}/access/{grantee}")
def grant(request: Request, photo_id: str, grantee: str, subject: Annotated[Subject, Depends(require_subject)]) -> JSONResponse:
    """Name a person (user id, or a DICOM peer as ae:AETITLE) on the photo's access list."""
    ctx = _governor(request, subject)

    def change(session, asset):
        added = grant_access(session, asset.id, grantee, granted_by=subject.sub, actor_role=subject.role,
                             actor_network=access_audit.source_of(subject))
        if added and asset.sensitivity == "V" and grantee.strip() == subject.sub:
            # staff opening a very restricted photo to themselves: legitimate at times, always worth a look
            access_audit.append(session, [access_audit.make_entry(
                ctx, type_code=audit.SECURITY_ALERT, action="E", subtype="self-grant",
                outcome_desc=f"{subject.sub} put themselves on the access list of a very restricted (V) photo",
                patient_id=asset.patient_id, entities=[{"type": "asset", "id": asset.id}, {"type": "patient", "id": asset.patient_id}],
            )])
        return added, _access_json(access_list(session, asset.id))

    found = _governance_write(request, ctx, photo_id, change)
    if found is None:
        raise HTTPException(404, NOT_FOUND)
    added, body = found
    return JSONResponse(body, status_code=201 if added else 200)


@router.delete("/{photo_id}/access/{grantee}", status_code=204)
def revoke(request: Request, photo_id: str, grantee: str, subject: Annotated[Subject, Depends(require_subject)]) -> Response:
    """Take a person off the photo's access list (effective at once on every exit)."""
    ctx = _governor(request, subject)
    found = _governance_write(request, ctx, photo_id, lambda session, asset: (revoke_access(
        session, asset.id, grantee, revoked_by=subject.sub, actor_role=subject.role, actor_network=access_audit.source_of(subject)),))
    if found is None:
        raise HTTPException(404, NOT_FOUND)
    if not found[0]:
        raise HTTPException(404, f"{grantee} is not on this photo's access list")
    return Response(status_code=204)


@router.put("/{photo_id}/sensitivity")
def reclassify(request: Request, photo_id: str, body: SensitivityIn, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    """Set the photo's sensitivity (N, R or V)."""
    ctx = _governor(request, subject)

    def change(session, asset):
        asset = set_sensitivity(session, asset.id, body.sensitivity, changed_by=subject.sub,
                                actor_role=subject.role, actor_network=access_audit.source_of(subject))
        return {"id": asset.id, "sensitivity": asset.sensitivity}

    found = _governance_write(request, ctx, photo_id, change)
    if found is None:
        raise HTTPException(404, NOT_FOUND)
    return found
