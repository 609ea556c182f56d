"""REST door for consent records: capture apps record consent at the moment of the photo.

POST /api/v1/consents                      record (patient, level, given_by, scope, photos, ...)
POST /api/v1/consents/{id}/withdraw        withdraw at once
GET  /api/v1/consents?patient=system|value a patient's consents, newest first

Only roles in policy.consent_roles, with a SMART scope on Consent; role and
scope are checked before anything is looked up, and every refusal is audited.
Photos named in a photo-scoped consent must be visible to the caller by every
rule except the consent rule (else "photo not found").

Refusals are audited in a transaction of their own, so lookups that may refuse
run in a read transaction before the write one (SQLite has one writer).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select

from gateway import access_audit
from gateway.api.params import no_nul, parse_patient
from gateway.auth import Subject, require_subject
from gateway.consents import ConsentError, ConsentNotFound, list_consents, record_consent, withdraw_consent
from gateway.policy import AccessContext, filter_except_consent, knows_patient, resolve, scope_context, utc
from store import audit
from store.models import Asset, Consent
from store.patients import find_patient

router = APIRouter(prefix="/api/v1/consents", tags=["consents"])

Text = Annotated[str, AfterValidator(no_nul)]


class ConsentIn(BaseModel):
    # the upload metadata's consent keys (givenBy, capturedBy, date) work here too
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    patient: Text = Field(..., description="The patient, as identifier system|value")
    level: Literal["record", "teaching", "publication"]
    given_by: Literal["patient", "parent", "best-interests"] = Field(..., alias="givenBy")
    captured_by: Text | None = Field(None, max_length=200, alias="capturedBy", description="Who took the consent; default the caller")
    consent_date: date | None = Field(None, alias="date")
    scope: Literal["patient", "encounter", "photos"] = "patient"
    encounter_id: int | None = Field(None, ge=1, le=2**31 - 1, alias="encounterId")
    photos: list[Annotated[Text, Field(max_length=32)]] = Field(default_factory=list, max_length=500)
    purpose_note: Text | None = Field(None, max_length=4000, alias="purposeNote", description="For publication: the specific use consented to")


def consent_json(c: Consent) -> dict:
    return {
        "id": c.id, "patient": c.patient_id, "level": c.level, "given_by": c.given_by, "captured_by": c.captured_by,
        "consent_date": c.consent_date.isoformat() if c.consent_date else None, "status": c.status,
        "withdrawn_at": utc(c.withdrawn_at).isoformat().replace("+00:00", "Z") if c.withdrawn_at else None,
        "scope": c.scope, "encounter_id": c.encounter_id, "purpose_note": c.purpose_note,
    }


def _refuse(request: Request, ctx: AccessContext, status: int, message: str, headers: dict | None = None,
            patient_id: int | None = None) -> HTTPException:
    """Audit the refusal, and give the exception to raise."""
    access_audit.record_refusal(request.app.state.gw, ctx, f"{request.method} {request.url.path}", reason=message, patient_id=patient_id)
    return HTTPException(status, message, headers=headers)


def _allowed(request: Request, ctx: AccessContext, perm: str) -> str:
    """Role and scope, checked before anything is looked up (so a refusal reveals nothing about the
    patient or consent named); returns the scope's context, 'any' or 'patient'."""
    subject = ctx.subject
    gw = request.app.state.gw
    if subject.role not in gw.settings.policy.consent_roles:
        raise _refuse(request, ctx, 403, f"role {subject.role} may not handle consent records")
    context = scope_context(subject.scopes, "Consent", perm)
    if context is None:
        realm = gw.settings.auth.realm
        raise _refuse(request, ctx, 403, f"the token's scopes do not allow '{perm}' on Consent",
                      headers={"WWW-Authenticate": f'Bearer realm="{realm}", error="insufficient_scope"'})
    return context


def _in_context(request: Request, ctx: AccessContext, context: str, patient_id: int | None) -> None:
    """A patient/ scope covers only the token's patient; an unknown patient is 'another patient' too."""
    token_patient = str(ctx.subject.patient or "").removeprefix("Patient/")
    if context == "patient" and (patient_id is None or str(patient_id) != token_patient):
        raise _refuse(request, ctx, 403, "the token's patient/ scope is for another patient", patient_id=patient_id)


def _patient_id(request: Request, ctx: AccessContext, context: str, text: str) -> int:
    """The patient named system|value, within the token's patient/ scope; 404 if unknown."""
    system, value = parse_patient(text)
    with request.app.state.gw.db.read() as session:
        found = find_patient(session, system, value)
        patient_id = found.id if found is not None else None
    _in_context(request, ctx, context, patient_id)  # outside the read transaction: a refusal writes its audit record
    if patient_id is None:
        raise HTTPException(404, "patient not found")
    return patient_id


@router.post("", status_code=201)
def create(request: Request, body: ConsentIn, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    gw = request.app.state.gw
    ctx = resolve(subject, gw.settings.policy, interaction="read")
    context = _allowed(request, ctx, "c")
    patient_id = _patient_id(request, ctx, context, body.patient)
    hidden = []
    with gw.db.read() as session:
        if body.photos:
            # the photos must be ones the caller could see, by every rule but the consent rule: a photo
            # without consent yet is hidden by that rule, and this consent is what will cover it
            where = filter_except_consent(ctx, gw.settings.policy)
            seen = set(session.scalars(select(Asset.id).where(Asset.id.in_(body.photos), where)))
            hidden = [p for p in body.photos if p not in seen]
    if hidden:
        access_audit.record_refusal(gw, ctx, f"{request.method} {request.url.path}", reason=f"photo not visible to the caller: {hidden[0]}",
                                    patient_id=patient_id, entities=[{"type": "asset", "id": p} for p in hidden])
        raise HTTPException(404, f"photo not found: {hidden[0]}")
    with gw.db.write() as session:
        try:
            consent = record_consent(
                session, patient_id=patient_id, level=body.level, given_by=body.given_by,
                captured_by=body.captured_by or subject.sub, consent_date=body.consent_date, scope=body.scope,
                encounter_id=body.encounter_id, asset_ids=body.photos, purpose_note=body.purpose_note,
                actor=subject.sub, actor_role=subject.role, actor_network=access_audit.source_of(subject),
            )
        except ConsentError as exc:
            raise HTTPException(400, str(exc)) from None
        return consent_json(consent)  # committed when the block ends, before the answer goes out


@router.post("/{consent_id}/withdraw")
def withdraw(request: Request, consent_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    gw = request.app.state.gw
    ctx = resolve(subject, gw.settings.policy)
    context = _allowed(request, ctx, "u")
    with gw.db.read() as session:
        consent = session.get(Consent, consent_id) if len(consent_id) <= 32 else None
        owner = consent.patient_id if consent is not None else None
    if context == "patient":
        # before "not found", so a patient/ token learns nothing of other patients' consents
        _in_context(request, ctx, context, owner)
    if consent is None:
        raise HTTPException(404, "consent not found")
    with gw.db.write() as session:
        try:
            consent = withdraw_consent(session, consent_id, withdrawn_by=subject.sub, actor_role=subject.role,
                                       actor_network=access_audit.source_of(subject))
        except ConsentNotFound:
            raise HTTPException(404, "consent not found") from None
        except ConsentError as exc:
            raise HTTPException(409, str(exc)) from None
        return consent_json(consent)


@router.get("")
def read(request: Request, subject: Annotated[Subject, Depends(require_subject)],
         patient: Annotated[str, Query(description="The patient, as identifier system|value")]) -> dict:
    """A patient's consents, for callers with a need to know the patient (the specialty rule, as for photos);
    a patient the caller may not know answers exactly like an unknown one."""
    gw = request.app.state.gw
    ctx = resolve(subject, gw.settings.policy)
    context = _allowed(request, ctx, "r")
    system, value = parse_patient(patient)
    with gw.db.read() as session:
        found = find_patient(session, system, value)
        patient_id = found.id if found is not None else None
        known = patient_id is not None and bool(session.scalar(select(knows_patient(ctx, gw.settings.policy, patient_id))))
        items = [consent_json(c) for c in list_consents(session, patient_id)] if known else []
    _in_context(request, ctx, context, patient_id)
    if not known:
        reason = "no such patient" if patient_id is None else "no need to know this patient (specialty rule)"
        # the reason goes to the trail only: the caller cannot tell a hidden patient from an unknown one
        access_audit.record_refusal(gw, ctx, f"{request.method} {request.url.path}", reason=reason, patient_id=patient_id)
        raise HTTPException(404, "patient not found")
    entry = access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="consent", patient_id=patient_id,
                                    entities=[{"type": "patient", "id": patient_id}] + [{"type": "consent", "id": c["id"]} for c in items])
    access_audit.write(gw, [entry])
    return {"total": len(items), "items": items}
