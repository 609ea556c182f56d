"""REST door for consent records: capture apps record consent at the moment of the photo.

POST /api/v1/consents                      record (patient, level, given_by, scope, photos, ...)
POST /api/v1/consents/{id}/withdraw        withdraw at once
GET  /api/v1/consents?patient=system|value a patient's consents, newest first

Only roles in policy.consent_roles, with a SMART scope on Consent. Photos named
in a photo-scoped consent must be visible to the caller (else "photo not found").
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from gateway import access_audit
from gateway.auth import Subject, require_subject
from gateway.consents import ConsentError, list_consents, record_consent, withdraw_consent
from gateway.policy import filter_for, resolve, scope_context, utc
from store import audit
from store.models import Asset, Consent
from store.patients import find_patient

router = APIRouter(prefix="/api/v1/consents", tags=["consents"])


class ConsentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient: str = Field(..., description="The patient, as identifier system|value")
    level: Literal["record", "teaching", "publication"]
    given_by: Literal["patient", "parent", "best-interests"]
    captured_by: str | None = Field(None, max_length=200, description="Who took the consent; default the caller")
    consent_date: date | None = None
    scope: Literal["patient", "encounter", "photos"] = "patient"
    encounter_id: int | None = None
    photos: list[str] = Field(default_factory=list, max_length=500)
    purpose_note: str | None = Field(None, max_length=4000, description="For publication: the specific use consented to")


def consent_json(c: Consent) -> dict:
    return {
        "id": c.id, "patient": c.patient_id, "level": c.level, "given_by": c.given_by, "captured_by": c.captured_by,
        "consent_date": c.consent_date.isoformat() if c.consent_date else None, "status": c.status,
        "withdrawn_at": utc(c.withdrawn_at).isoformat().replace("+00:00", "Z") if c.withdrawn_at else None,
        "scope": c.scope, "encounter_id": c.encounter_id, "purpose_note": c.purpose_note,
    }


def _allowed(request: Request, subject: Subject, perm: str, patient_id: int | None = None) -> None:
    policy = request.app.state.gw.settings.policy
    if subject.role not in policy.consent_roles:
        raise HTTPException(403, f"role {subject.role} may not handle consent records")
    context = scope_context(subject.scopes, "Consent", perm)
    if context is None:
        realm = request.app.state.gw.settings.auth.realm
        raise HTTPException(403, f"the token's scopes do not allow '{perm}' on Consent",
                            headers={"WWW-Authenticate": f'Bearer realm="{realm}", error="insufficient_scope"'})
    if context == "patient" and patient_id is not None and str(patient_id) != str(subject.patient or "").removeprefix("Patient/"):
        raise HTTPException(403, "the token's patient/ scope is for another patient")


def _patient(session, text: str):
    system, sep, value = text.partition("|")
    if not sep or not system.strip() or not value.strip():
        raise HTTPException(400, "patient must be system|value, e.g. https://fhir.nhs.uk/Id/nhs-number|9449305552")
    found = find_patient(session, system.strip(), value.strip())
    if found is None:
        raise HTTPException(404, "patient not found")
    return found


@router.post("", status_code=201)
def create(request: Request, body: ConsentIn, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    gw = request.app.state.gw
    ctx = resolve(subject, gw.settings.policy, interaction="read")
    with gw.db.write() as session:
        patient = _patient(session, body.patient)
        _allowed(request, subject, "c", patient.id)
        if body.photos:
            seen = set(session.scalars(select(Asset.id).where(Asset.id.in_(body.photos), filter_for(ctx, gw.settings.policy))))
            hidden = [p for p in body.photos if p not in seen]
            if hidden:
                raise HTTPException(404, f"photo not found: {hidden[0]}")
        try:
            consent = record_consent(
                session, patient_id=patient.id, level=body.level, given_by=body.given_by,
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
    with gw.db.write() as session:
        consent = session.get(Consent, consent_id)
        if consent is None:
            raise HTTPException(404, "consent not found")
        _allowed(request, subject, "u", consent.patient_id)
        try:
            consent = withdraw_consent(session, consent_id, withdrawn_by=subject.sub, actor_role=subject.role,
                                       actor_network=access_audit.source_of(subject))
        except ConsentError as exc:
            raise HTTPException(409, str(exc)) from None
        return consent_json(consent)


@router.get("")
def read(request: Request, subject: Annotated[Subject, Depends(require_subject)],
         patient: Annotated[str, Query(description="The patient, as identifier system|value")]) -> dict:
    gw = request.app.state.gw
    ctx = resolve(subject, gw.settings.policy)
    with gw.db.read() as session:
        patient_id = _patient(session, patient).id
        _allowed(request, subject, "r", patient_id)
        items = [consent_json(c) for c in list_consents(session, patient_id)]
    entry = access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="consent", patient_id=patient_id,
                                    entities=[{"type": "patient", "id": patient_id}] + [{"type": "consent", "id": c["id"]} for c in items])
    access_audit.write(gw, [entry])
    return {"total": len(items), "items": items}
