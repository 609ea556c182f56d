"""REST door for consent records: capture apps record consent at the moment of the photo.

POST /api/v1/consents                      record (patient, level, given_by, scope, photos, ...)
POST /api/v1/consents/{id}/withdraw        withdraw at once
GET  /api/v1/consents?patient=system|value a patient's consents, newest first

Who may handle consents, for which patients, and the one consent writer are the
core's (gateway/core/consents.py); this module parses and renders.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from gateway.api.errors import http_error
from gateway.api.params import no_nul, parse_patient
from gateway.api.security import gateway_of, require_subject, what
from gateway.core import consents
from gateway.core.identity import Subject
from gateway.core.policy.rules import utc
from gateway.core.refusals import Refused
from store.models import Consent

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


@router.post("", status_code=201)
def create(request: Request, body: ConsentIn, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    gw = gateway_of(request)
    try:
        who = consents.caller(gw, subject, "c", what(request))
        consent = consents.record(
            gw, who, parse_patient(body.patient), level=body.level, given_by=body.given_by, captured_by=body.captured_by,
            consent_date=body.consent_date, scope=body.scope, encounter_id=body.encounter_id, photos=body.photos,
            purpose_note=body.purpose_note, what=what(request))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None
    return consent_json(consent)  # committed before the answer goes out


@router.post("/{consent_id}/withdraw")
def withdraw(request: Request, consent_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict:
    gw = gateway_of(request)
    try:
        who = consents.caller(gw, subject, "u", what(request))
        return consent_json(consents.withdraw(gw, who, consent_id, what(request)))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None


@router.get("")
def read(request: Request, subject: Annotated[Subject, Depends(require_subject)],
         patient: Annotated[str, Query(description="The patient, as identifier system|value")]) -> dict:
    """A patient's consents, for callers with a need to know the patient (the specialty rule, as for photos);
    a patient the caller may not know answers exactly like an unknown one."""
    gw = gateway_of(request)
    try:
        who = consents.caller(gw, subject, "r", what(request))
        _patient_id, found = consents.for_patient(gw, who, parse_patient(patient), what(request))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None
    items = [consent_json(c) for c in found]
    return {"total": len(items), "items": items}
