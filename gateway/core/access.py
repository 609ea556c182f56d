"""The read workflow every door calls: find a patient's photos, open one, fetch its image, manage who sees it.

Protocol-free. A door parses its request into these calls and renders what comes
back; every rule lives here or in the policy, every refusal is a Refused with a
kind the door maps to its own answer, and every access, allowed or denied, is in
the audit trail before the call returns:

- the policy filter is inside every query (so totals and paging are right);
- a photo the caller may not see is NOT_FOUND, exactly like one that does not
  exist; the reasons go to the audit trail only;
- the original file is only for the roles the policy names;
- a photo's DICOM object is served with the patient module the patient index
  holds at that moment (dicom_object; gateway/core/objects/coerce.py);
- governance (sensitivity, access lists) is for governance roles, over the
  photos the policy's governance reading lets them manage.

`channel` names the door in audit records (rest, fhir, dicomweb, dimse, viewer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, and_, func, select, union
from sqlalchemy.orm import Session

from gateway.core import access_audit, patient_refs, study_query
from gateway.core.consents import ConsentError, PhotoNotFound, access_list, grant_access, revoke_access, set_sensitivity
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.ingest import deferred
from gateway.core.ingest.dicom_patients import patient_info, patient_infos
from gateway.core.ingest.renditions import DUE, FAILED
from gateway.core.objects.coerce import Served, coerce
from gateway.core.objects.part10 import Part10Error
from gateway.core.objects.vlphoto import PatientInfo
from gateway.core.policy.rules import (
    AccessContext,
    ConsentSummary,
    access_list_name,
    care_only,
    consent_summary,
    decide_in,
    filter_for,
    governance_filter,
    may_see_original,
    resolve,
    scope_allows,
)
from gateway.core.policy.settings import PolicySettings
from gateway.core.refusals import Kind, Refused
from store import audit
from store.models import Asset, AssetAccess, Consent, ConsentAsset, Encounter, Patient
from store.patients import survivor

log = logging.getLogger(__name__)

NOT_FOUND = "photo not found"
ENTERED_IN_ERROR = "entered-in-error"
Rendition = Literal["original", "preview", "thumbnail"]
SEARCH_SCOPE, READ_SCOPE, MANAGE_SCOPE = "s", "r", "u"
T = TypeVar("T")


class StoreFault(RuntimeError):
    """A row points at a blob the store does not have: our failure, not the caller's (`clinphoto store check`)."""


# -- the request ----------------------------------------------------------------------------------------


def screen(gw: Gateway, subject: Subject, what: str) -> AccessContext:
    """Every authenticated request, any door: a malformed purpose or a break-glass the subject may not use is
    refused (and audited) before anything is looked up."""
    ctx = resolve(subject, gw.settings.policy)
    if ctx.refusal and ctx.refuse_request:
        raise access_audit.refuse(gw, ctx, what, Refused(ctx.refusal_kind or Kind.FORBIDDEN, ctx.refusal))
    return ctx


def refuse(gw: Gateway, subject: Subject, what: str, refusal: Refused) -> Refused:
    """A request a door refuses before any photo is looked up (a DICOM peer asking for a service its settings do not
    allow, an identifier that cannot be read): on the trail like every other refusal; given back to raise or map."""
    return access_audit.refuse(gw, resolve(subject, gw.settings.policy), what, refusal)


def photo_request(gw: Gateway, subject: Subject, interaction: Literal["read", "search"], what: str,
                  resource: str = "Media") -> AccessContext:
    """The context for reading or searching photos as `resource` (the FHIR door also serves them as DocumentReference
    and Binary; SMART scopes are granted per type); a role that may not act for the purpose at all is refused."""
    ctx = resolve(subject, gw.settings.policy, interaction=interaction, resource=resource)
    if ctx.refusal:
        raise access_audit.refuse(gw, ctx, what, Refused(ctx.refusal_kind or Kind.FORBIDDEN, ctx.refusal))
    return ctx


def require_scope(gw: Gateway, ctx: AccessContext, resource: str, perm: str, what: str) -> None:
    """SMART scopes only narrow: a token none of whose scopes grants `perm` on `resource` is refused, audited."""
    if not scope_allows(ctx.subject.scopes, resource, perm):
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.INSUFFICIENT_SCOPE, f"the token's scopes do not allow '{perm}' on {resource}",
                                            needs=f"{resource}.{perm}"))


# -- what a door renders --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoView:
    """One photo as the caller may see it: the row (detached), the consent that covers it, whether the
    caller may have the original file."""

    asset: Asset
    consent: ConsentSummary | None
    original_allowed: bool
    patient: str  # the patient's public id
    encounter: tuple[str, str] | None = None  # the encounter's visit number: (its system, the number)
    care_only: bool = False  # its teaching consent was withdrawn: kept for care only (rules.care_only)


@dataclass(frozen=True)
class SearchResult:
    total: int
    photos: list[PhotoView]
    patient_id: int | None  # the patient found, None when unknown (answered like a hidden one: empty)


@dataclass(frozen=True)
class StoredImage:
    path: Path
    media_type: str
    rendition: Rendition
    asset: Asset
    sha256: str = ""  # the blob's: what an ETag names (a correction replaces an original under the same photo id)


def newest_first() -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """The order every list of photos uses: when taken (else stored), newest first, then id."""
    return func.coalesce(Asset.taken_at, Asset.created_at).desc(), Asset.id.desc()


def views_of(session: Session, assets: list[Asset], original: bool, public: dict[int, str] | None = None) -> list[PhotoView]:
    """The photos as PhotoViews: the consent covering each, the patient's public id (unless the caller read them
    with the photos), the encounter's visit. Two or three statements: each costs ~0.3-0.6 ms of SQLAlchemy beside
    its ~0.05 ms in SQLite (bench/fhir_search.py), so the consents and their links to these photos come together."""
    if not assets:
        return []
    ids = [a.id for a in assets]
    patients = {a.patient_id for a in assets}
    # the patients' consents and those linked to these photos, as a UNION: an OR of the two made PostgreSQL scan
    # every consent (117,776 in bench/fhir_search.py: 25 ms a search instead of 3)
    wanted = union(select(Consent.id).where(Consent.patient_id.in_(patients)),
                   select(ConsentAsset.consent_id).where(ConsentAsset.asset_id.in_(ids))).subquery()
    found = session.execute(
        select(Consent, ConsentAsset.asset_id)
        .outerjoin(ConsentAsset, and_(ConsentAsset.consent_id == Consent.id, ConsentAsset.asset_id.in_(ids)))
        .where(Consent.id.in_(select(wanted.c[0]))))
    by_id: dict[str, Consent] = {}
    links: dict[str, set[str]] = {}
    for consent, asset_id in found:
        by_id[consent.id] = consent
        if asset_id is not None:
            links.setdefault(asset_id, set()).add(consent.id)
    consents = list(by_id.values())
    if public is None:
        public = {pid: public_id for pid, public_id in session.execute(select(Patient.id, Patient.public_id)
                                                                        .where(Patient.id.in_(patients)))}
    encounter_ids = {a.encounter_id for a in assets if a.encounter_id is not None}
    visits: dict[int, tuple[str, str]] = {}
    if encounter_ids:
        for eid, system, number in session.execute(select(Encounter.id, Encounter.visit_system, Encounter.visit_number)
                                                   .where(Encounter.id.in_(sorted(encounter_ids)))):
            if number:
                visits[eid] = (system, number)
    return [PhotoView(a, consent_summary(a, consents, links.get(a.id, set())), original, public[a.patient_id],
                      visits.get(a.encounter_id) if a.encounter_id is not None else None,
                      care_only(a, consents, links.get(a.id, set())))
            for a in assets]


# -- the read workflow ------------------------------------------------------------------------------------


def search(
    gw: Gateway,
    ctx: AccessContext,
    *,
    patient: tuple[str, str],
    query: str,
    site: str | None = None,
    laterality: str | None = None,
    limit: int = 50,
    offset: int = 0,
    channel: str = "rest",
) -> SearchResult:
    """The photos of one patient (system, value) the caller may see, newest first, paged; the total counts only
    those. An unknown patient gives an empty result, like one whose photos are all hidden."""
    require_scope(gw, ctx, "Media", SEARCH_SCOPE, query)
    patient_id = patient_of(gw, ctx, patient, query)
    where = filter_for(ctx, gw.settings.policy)
    with gw.db.read() as session:
        if patient_id is None:
            total, views = 0, []
        else:
            scope: list[ColumnElement[bool]] = [Asset.patient_id == patient_id, where]
            if site:
                scope.append(Asset.body_site_code == site)
            if laterality:
                scope.append(Asset.laterality == laterality)
            total = session.scalar(select(func.count()).select_from(Asset).where(*scope)) or 0
            assets = list(session.scalars(select(Asset).where(*scope).order_by(*newest_first()).limit(limit).offset(offset)))
            views = views_of(session, assets, may_see_original(ctx.subject, gw.settings.policy))
        session.expunge_all()  # the rows stay readable after the read transaction ends
    results = {patient_id: [v.asset.id for v in views]} if patient_id is not None and views else {}
    access_audit.record_search(gw, ctx, query=query, results=results, channel=channel)
    return SearchResult(total=total, photos=views, patient_id=patient_id)


def patient_of(gw: Gateway, ctx: AccessContext, patient: tuple[str, str], what: str) -> int | None:
    """The live patient a reference names, None when nobody registered it (the caller answers that like a hidden
    patient); a reference in a system no patient has is a mistake, refused and audited."""
    with gw.db.read() as session:
        try:
            found = patient_refs.find(session, *patient)
        except patient_refs.BadPatientRef as exc:
            problem = str(exc)
        else:
            return found.id if found is not None else None
    raise access_audit.refuse(gw, ctx, what, Refused(Kind.BAD_REQUEST, f"patient: {problem}"))


def _visible(gw: Gateway, ctx: AccessContext, photo_id: str, what: str, within_patient: int | None = None) -> PhotoView:
    """The photo if the caller may see it (the policy inside the query) and, when `within_patient` is given, it is
    that patient's (a viewer launched for one patient); else the denial is audited and NOT_FOUND raised, the same
    for a hidden photo and a missing one."""
    policy = gw.settings.policy
    with gw.db.read() as session:
        asset = session.scalars(select(Asset).where(Asset.id == photo_id, filter_for(ctx, policy))).first()
        if asset is not None and within_patient is not None and asset.patient_id != within_patient:
            session.expunge_all()
            access_audit.record_read(gw, ctx, asset_id=photo_id, patient_id=asset.patient_id, permitted=False,
                                     reasons=["outside the patient this viewer was launched for"], what=what)
            raise Refused(Kind.NOT_FOUND, NOT_FOUND)
        if asset is not None:
            view = views_of(session, [asset], may_see_original(ctx.subject, policy))[0]
            session.expunge_all()
            return view
        decision = decide_in(session, ctx, policy, photo_id)
        row = session.get(Asset, photo_id)
        patient_id = row.patient_id if row is not None else None
        status = row.status if row is not None else None
    access_audit.record_read(gw, ctx, asset_id=photo_id, patient_id=patient_id, permitted=False,
                             reasons=decision.reasons, what=what)
    if status == ENTERED_IN_ERROR and decision.denied_by == ["status"]:
        # every other rule lets this caller see it: saying it was taken out of the record tells them nothing new
        raise Refused(Kind.GONE, "this photo was taken out of the record (entered in error)")
    raise Refused(Kind.NOT_FOUND, NOT_FOUND)


def read(gw: Gateway, ctx: AccessContext, photo_id: str) -> PhotoView:
    """One photo's details, audited as a read."""
    view = _visible(gw, ctx, photo_id, "read")
    access_audit.record_read(gw, ctx, asset_id=view.asset.id, patient_id=view.asset.patient_id, permitted=True, what="read")
    return view


def image(gw: Gateway, ctx: AccessContext, photo_id: str, rendition: Rendition, what: str,
          within_patient: int | None = None) -> StoredImage:
    """A photo's image file: the original as received (only for the roles allowed originals), or a rendition."""
    policy = gw.settings.policy
    view = _visible(gw, ctx, photo_id, "retrieve", within_patient)
    asset = view.asset
    detail = {"rendition": rendition}
    if rendition == "original" and not view.original_allowed:
        roles = ", ".join(policy.original_roles) or "none"
        reason = f"rendition: DENIED - originals are only for roles {roles}"
        access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=False, reasons=[reason],
                                 what="retrieve", detail=detail)
        raise Refused(Kind.FORBIDDEN, f"the original is only for roles {roles}; ask for a preview")
    if rendition == "original":
        sha, media_type = (asset.sha256 if asset.original_kept else None), asset.media_type
    else:
        preview, thumbnail, state = asset.preview_sha256, asset.thumbnail_sha256, asset.rendition_state
        if state == DUE:  # a received object answered before it was rendered: made now, not "not ready"
            try:
                made = deferred.make(gw, asset.id)
            except Exception as exc:
                _served_nothing(gw, ctx, asset, detail, f"its {rendition} could not be made ({type(exc).__name__})",
                                audit.SERIOUS_FAILURE)
                raise
            preview, thumbnail, state = made.preview_sha256, made.thumbnail_sha256, made.state
        if state == FAILED:
            refusal = Refused(Kind.NOT_FOUND, "this photo's pixel data did not decode when it was stored, so it has no "
                              f"{rendition}; its DICOM object is kept as it was sent")
            _served_nothing(gw, ctx, asset, detail, refusal.reason)
            raise refusal
        sha, media_type = (preview if rendition == "preview" else thumbnail), "image/jpeg"
    if not sha:
        kept = " (the original was not kept)" if rendition == "original" else ""
        refusal = Refused(Kind.NOT_FOUND, f"this photo has no {rendition} rendition{kept}")
        _served_nothing(gw, ctx, asset, detail, refusal.reason)
        raise refusal
    path = gw.blobs.path(sha)
    if not path.is_file():
        log.error("blob %s of photo %s (%s) is missing from the blob store", sha, asset.id, rendition)
        fault = StoreFault(f"the stored {rendition} of this photo is missing; run `clinphoto store check`")
        _served_nothing(gw, ctx, asset, detail, str(fault), audit.SERIOUS_FAILURE)
        raise fault
    access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="retrieve",
                             detail=detail)
    return StoredImage(path=path, media_type=media_type, rendition=rendition, asset=asset, sha256=sha)


def _served_nothing(gw: Gateway, ctx: AccessContext, asset: Asset, detail: dict[str, Any], why: str,
                    outcome: str = audit.MINOR_FAILURE) -> None:
    """A retrieve the policy allowed that served nothing is still an access: audited with why, before the answer."""
    access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="retrieve",
                             detail=detail, failure=why, failure_outcome=outcome)


@dataclass(frozen=True)
class RenderedSource:
    """One instance's stored rendition for a rendered retrieve of a set (WADO-RS study/series /rendered), with the
    patient module the patient index holds now (what an annotation may show: the caller already sees the photo)."""

    image: StoredImage
    patient: PatientInfo


def images_matching(gw: Gateway, ctx: AccessContext, q: study_query.StudyQuery, rendition: Literal["preview", "thumbnail"], *,
                    query: str, channel: str, type_code: str = audit.INSTANCES_TRANSFERRED,
                    detail: dict[str, Any] | None = None) -> list[RenderedSource]:
    """The stored renditions of the instances a query names (any level), in the query's order, for a rendered retrieve
    (one instance, a series, a study): hidden instances are left out as the query leaves them out, and the query and
    every retrieve go to the audit trail in one commit before any image is sent (as dicom_objects_matching).
    `detail` goes into each retrieve's record (e.g. that the patient's details are burned into the image)."""
    matches, results = study_query.search(gw, ctx, replace(q, level="IMAGE"))
    patient_of = {m.asset_id: m.patient for m in matches if m.asset_id}
    ids = list(patient_of)
    with gw.db.read() as session:
        found = {a.id: a for a in session.scalars(select(Asset).where(Asset.id.in_(ids), filter_for(ctx, gw.settings.policy)))}
        session.expunge_all()
    out: list[RenderedSource] = []
    entries: list[audit.AuditEntry] = []
    for asset in (found[i] for i in ids if i in found):
        preview, thumbnail, state = asset.preview_sha256, asset.thumbnail_sha256, asset.rendition_state
        if state == DUE:  # a received object answered before it was rendered: made now, as image() does
            try:
                made = deferred.make(gw, asset.id)
            except Exception as exc:
                # the request fails, but the query and this retrieve happened: in the trail before the error goes out
                # (the renditions gathered so far are not sent, so they are not recorded as retrieved)
                failed = access_audit.read_entries(
                    ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="retrieve",
                    type_code=type_code, detail={"rendition": rendition, **(detail or {})},
                    failure=f"its {rendition} could not be made ({type(exc).__name__})", failure_outcome=audit.SERIOUS_FAILURE)
                access_audit.write(gw, study_query.query_entries(ctx, results, query=query, channel=channel) + failed)
                raise
            preview, thumbnail, state = made.preview_sha256, made.thumbnail_sha256, made.state
        if state == FAILED:
            continue  # its pixels did not decode: it has no rendered image (its DICOM object is kept as sent)
        sha = preview if rendition == "preview" else thumbnail
        path = gw.blobs.path(sha or "")
        if not sha or not path.is_file():
            log.error("the %s of photo %s is missing from the blob store", rendition, asset.id)
            continue
        out.append(RenderedSource(StoredImage(path=path, media_type="image/jpeg", rendition=rendition, asset=asset),
                                  patient_of[asset.id]))
        entries += access_audit.read_entries(ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="retrieve",
                                             type_code=type_code, detail={"rendition": rendition, **(detail or {})})
    access_audit.write(gw, study_query.query_entries(ctx, results, query=query, channel=channel) + entries)
    return out


@dataclass(frozen=True)
class DicomObject:
    """A photo's DICOM object as served: `served.chunks()` streams it, `served.transfer_syntax` names its encoding."""

    served: Served
    asset: Asset


def dicom_object(gw: Gateway, ctx: AccessContext, photo_id: str, type_code: str = audit.REST) -> DicomObject:
    """A photo's DICOM object, as the DICOM doors (WADO-RS, C-GET, C-MOVE) send it: the stored object (received,
    or built at ingest) with the Patient Module the patient index holds now, Pixel Data byte for byte.

    Visibility exactly as image(): the policy inside the query, NOT_FOUND for a hidden photo as for a missing
    one, every access audited."""
    view = _visible(gw, ctx, photo_id, "retrieve")
    asset = view.asset
    if not asset.dicom_sha256:
        raise Refused(Kind.NOT_FOUND, "this photo has no DICOM object")
    path = gw.blobs.path(asset.dicom_sha256)
    if not path.is_file():
        log.error("blob %s of photo %s (DICOM object) is missing from the blob store", asset.dicom_sha256, asset.id)
        raise StoreFault("the stored DICOM object of this photo is missing; run `clinphoto store check`")
    with gw.db.read() as session:
        # the patient of today: a merge may have moved the photo, an update changed the name
        patient = survivor(session, session.get_one(Patient, asset.patient_id))
        info = patient_info(session, patient)
    try:
        served = coerce(path, info, laterality=asset.laterality, uid_root=gw.settings.uid_root)
    except Part10Error as exc:
        log.error("the DICOM object of photo %s cannot be read: %s", asset.id, exc)
        raise StoreFault("the stored DICOM object of this photo cannot be read; run `clinphoto store check`") from None
    access_audit.record_read(gw, ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=True, what="retrieve",
                             type_code=type_code, detail={"rendition": "dicom", "transfer_syntax": served.transfer_syntax})
    return DicomObject(served=served, asset=asset)


def dicom_objects(gw: Gateway, ctx: AccessContext, photo_ids: list[str], type_code: str = audit.REST) -> list[DicomObject]:
    """The DICOM objects of several photos for one retrieve (C-GET, C-MOVE; a study), in the order asked: the policy
    inside one query, each patient's module read once, and one audit commit for them all (a record per instance)
    before any is sent, where dicom_object() costs a query round and a commit per photo (on SQLite with full sync,
    most of a 10-photo C-GET's time). A photo hidden or missing is left out, as a query would leave it out."""
    served, entries = _served_objects(gw, ctx, photo_ids, type_code)
    access_audit.write(gw, entries)
    return served


def dicom_objects_matching(gw: Gateway, ctx: AccessContext, q: study_query.StudyQuery, *, query: str, channel: str,
                           type_code: str = audit.INSTANCES_TRANSFERRED, unreadable: list[Asset] | None = None,
                           prefetch: Callable[[list[DicomObject]], None] | None = None,
                           recipient: AccessContext | None = None) -> list[DicomObject]:
    """The DICOM objects of the instances a query names (any level), for a retrieve by UIDs (WADO-RS): the query and
    the retrieve in one audit commit, before any object is sent. Each commit is an fsync (SQLite, full sync): find()
    then dicom_objects() took 42-52 ms for one 12-MP instance on a loaded 2-core machine, this 27-38 ms (A/B, same run).
    The query's rows are the retrieve's (study_query.instances), read with today's patient modules in one session.

    A visible photo whose stored object cannot be read is left out (logged); `unreadable`, if given, is told of
    each, for a caller that reports what it could not send (C-GET and C-MOVE count it failed).

    `prefetch`, if given, is handed the objects before the audit commits, for a caller to start reading them
    meanwhile (the commit is an fsync): it must send nothing before this function returns.

    `recipient` (recipient_context()): the party the objects are sent to when it is not the caller, a C-MOVE's
    destination: only the instances its own identity may see as well are served, as routing sends a destination
    only what its identity may see; the transfer's records name it."""
    with gw.db.read() as session:
        rows, results = study_query.instances(session, ctx, gw.settings.policy, replace(q, level="IMAGE"), recipient=recipient)
        with_object = [a for a, _ in rows if a.dicom_sha256]
        infos = _live_patient_infos(session, {a.patient_id: p for a, p in rows if a.dicom_sha256})
        denied = _named_but_hidden(session, ctx, recipient, gw.settings.policy, q.sop_uids, {a.sop_instance_uid for a, _ in rows},
                                   type_code)
        session.expunge_all()
    served, entries = _coerced(gw, ctx, with_object, infos, type_code)
    entries += denied
    if recipient is not None:
        for entry in entries:
            if entry.type_code == type_code:
                entry.detail = {**(entry.detail or {}), "destination": access_list_name(recipient.subject)}
    if unreadable is not None:
        sent = {o.asset.id for o in served}
        unreadable += [a for a in with_object if a.id not in sent]
    if prefetch is not None:
        prefetch(served)
    access_audit.write(gw, study_query.query_entries(ctx, results, query=query, channel=channel) + entries)
    return served


def _named_but_hidden(session: Session, ctx: AccessContext, recipient: AccessContext | None, policy: PolicySettings,
                      named: Sequence[str] | None, answered: set[str], type_code: str) -> list[audit.AuditEntry]:
    """A denied read, with the rules that denied it, of each stored instance the request named by its SOP Instance
    UID and the policy left out: as the REST and FHIR doors record a hidden photo asked for by its id (the answer
    stays that of an absent one). Without it a retrieve reaching for a patient's hidden photo by UID was on the trail
    as a query that found nothing, against no patient. One indexed statement, only when some named were left out."""
    missing = sorted(set(named or ()) - answered)
    if not missing:
        return []
    entries: list[audit.AuditEntry] = []
    for asset in session.scalars(select(Asset).where(Asset.sop_instance_uid.in_(missing))):
        decision = decide_in(session, ctx, policy, asset)
        reasons = decision.reasons
        if decision.permit:  # the caller may see it: another key left it out (a study UID not its own), or the
            if recipient is None:  # C-MOVE's destination may not see it
                continue
            for_recipient = decide_in(session, recipient, policy, asset)
            if for_recipient.permit:
                continue
            reasons = [f"the destination: {r}" for r in for_recipient.reasons]
        entries += access_audit.read_entries(ctx, asset_id=asset.id, patient_id=asset.patient_id, permitted=False,
                                             reasons=reasons, what="retrieve", type_code=type_code)
    return entries


def recipient_context(gw: Gateway, subject: Subject) -> AccessContext:
    """A party objects are sent to at another's request (a C-MOVE's destination peer), as the policy reads its own
    identity (purpose, sensitivities, specialties, access lists): what it may see bounds what is sent to it. A
    recipient whose role may not act for its purpose sees nothing, so nothing is sent."""
    return resolve(subject, gw.settings.policy, interaction="read")


def _served_objects(gw: Gateway, ctx: AccessContext, photo_ids: list[str], type_code: str) -> tuple[list[DicomObject], list[audit.AuditEntry]]:
    policy = gw.settings.policy
    with gw.db.read() as session:
        found = {a.id: a for a in session.scalars(select(Asset).where(Asset.id.in_(photo_ids), filter_for(ctx, policy),
                                                                     Asset.dicom_sha256.is_not(None)))}
        infos = _live_patient_infos(session, {pid: session.get_one(Patient, pid) for pid in {a.patient_id for a in found.values()}})
        session.expunge_all()
    return _coerced(gw, ctx, [found[i] for i in photo_ids if i in found], infos, type_code)


def _live_patient_infos(session: Session, patients: dict[int, Patient]) -> dict[int, PatientInfo]:
    """The Patient Module each photo row's patient (the record it names, by id) is served with: the patient of today
    (a merge may have moved a photo since: its row still names the old record)."""
    live = {pid: survivor(session, p) for pid, p in patients.items()}
    by_live = patient_infos(session, {p.id: p for p in live.values()}.values())
    return {pid: by_live[p.id] for pid, p in live.items()}


def _coerced(gw: Gateway, ctx: AccessContext, assets: list[Asset], infos: dict[int, PatientInfo],
             type_code: str) -> tuple[list[DicomObject], list[audit.AuditEntry]]:
    """Each photo's object as served (a photo whose stored object cannot be read is left out, logged) and the
    retrieve's audit records (access_audit.transfer_entries)."""
    served: list[DicomObject] = []
    for asset in assets:
        path = gw.blobs.path(asset.dicom_sha256 or "")
        try:
            if not path.is_file():
                raise Part10Error("missing from the blob store")
            obj = coerce(path, infos[asset.patient_id], laterality=asset.laterality, uid_root=gw.settings.uid_root)
        except Part10Error as exc:
            log.error("the DICOM object of photo %s cannot be served: %s", asset.id, exc)
            continue
        served.append(DicomObject(served=obj, asset=asset))
    sent: dict[int, list[str]] = {}
    for o in served:
        sent.setdefault(o.asset.patient_id, []).append(o.asset.id)
    entries = access_audit.transfer_entries(ctx, sent=sent, type_code=type_code,
                                            syntaxes={o.asset.id: o.served.transfer_syntax for o in served})
    return served, entries


# -- governance: sensitivity and access lists (medical illustration staff) --------------------------------


def governor(gw: Gateway, subject: Subject, what: str) -> AccessContext:
    """Governance roles with an update scope on Media; every refusal audited."""
    policy = gw.settings.policy
    ctx = resolve(subject, policy)
    if subject.role not in policy.governance_roles:
        raise access_audit.refuse(gw, ctx, what, Refused(
            Kind.FORBIDDEN, f"only roles {', '.join(policy.governance_roles) or 'none'} may change who sees a photo"))
    require_scope(gw, ctx, "Media", MANAGE_SCOPE, what)
    return ctx


def _govern(gw: Gateway, ctx: AccessContext, photo_id: str, what: str, change: Callable[[Session, Asset], T]) -> T:
    """change(session, asset) in one write transaction, on a photo the caller may manage (the policy's governance
    reading); a hidden or missing photo is NOT_FOUND, its denial committed with the transaction."""
    try:
        with gw.db.write() as session:
            query = select(Asset).where(Asset.id == photo_id, governance_filter(ctx, gw.settings.policy))
            asset = session.scalars(query.with_for_update()).first()
            if asset is None:
                row = session.get(Asset, photo_id)
                access_audit.append(session, access_audit.refusal_entries(
                    ctx, what, reason="governance: photo not found or not manageable by the caller",
                    patient_id=row.patient_id if row is not None else None, entities=[{"type": "asset", "id": photo_id}],
                ))
                result: T | None = None
            else:
                result = change(session, asset)
    except PhotoNotFound:
        raise Refused(Kind.NOT_FOUND, NOT_FOUND) from None
    except ConsentError as exc:
        raise Refused(Kind.INVALID, str(exc)) from None
    if result is None:
        raise Refused(Kind.NOT_FOUND, NOT_FOUND)
    return result


def access_subjects(gw: Gateway, ctx: AccessContext, photo_id: str, what: str) -> list[AssetAccess]:
    """Who is named on the photo's access list (the read is audited)."""
    patient_id, rows = _govern(gw, ctx, photo_id, what, lambda s, a: (a.patient_id, access_list(s, a.id)))
    access_audit.write(gw, [access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="access-list",
                                                    patient_id=patient_id, entities=[{"type": "asset", "id": photo_id}])])
    return rows


def grant(gw: Gateway, ctx: AccessContext, photo_id: str, grantee: str, what: str) -> tuple[bool, list[AssetAccess]]:
    """Name a person (user id, or a DICOM peer as ae:AETITLE) on the photo's access list; (added, the list)."""
    subject = ctx.subject

    def change(session: Session, asset: Asset) -> tuple[bool, list[AssetAccess]]:
        added = grant_access(session, asset.id, grantee, granted_by=subject.sub, actor_role=subject.role,
                             actor_network=access_audit.source_of(subject))
        if added and asset.sensitivity == "V" and grantee.strip() == subject.sub:
            # staff opening a very restricted photo to themselves: legitimate at times, always worth a look
            access_audit.append(session, [access_audit.make_entry(
                ctx, type_code=audit.SECURITY_ALERT, action="E", subtype="self-grant",
                outcome_desc=f"{subject.sub} put themselves on the access list of a very restricted (V) photo",
                patient_id=asset.patient_id, entities=[{"type": "asset", "id": asset.id}, {"type": "patient", "id": asset.patient_id}],
            )])
        return added, access_list(session, asset.id)

    return _govern(gw, ctx, photo_id, what, change)


def revoke(gw: Gateway, ctx: AccessContext, photo_id: str, grantee: str, what: str) -> None:
    """Take a person off the photo's access list, effective at once on every door."""
    subject = ctx.subject
    removed = _govern(gw, ctx, photo_id, what, lambda session, asset: (revoke_access(
        session, asset.id, grantee, revoked_by=subject.sub, actor_role=subject.role,
        actor_network=access_audit.source_of(subject)),))
    if not removed[0]:
        raise Refused(Kind.NOT_FOUND, f"{grantee} is not on this photo's access list")


def reclassify(gw: Gateway, ctx: AccessContext, photo_id: str, sensitivity: str, what: str) -> str:
    """Set the photo's sensitivity (N, R or V); returns it."""
    subject = ctx.subject
    return _govern(gw, ctx, photo_id, what, lambda session, asset: set_sensitivity(
        session, asset.id, sensitivity, changed_by=subject.sub, actor_role=subject.role,
        actor_network=access_audit.source_of(subject)).sensitivity)
