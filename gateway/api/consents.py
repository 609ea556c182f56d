"""REST door for consent records: capture apps record consent at the moment of the photo.

POST /api/v1/consents                      record (patient, level, given_by, scope, photos, ...)
POST /api/v1/consents/{id}/withdraw        withdraw at once
GET  /api/v1/consents?patient=system|value a patient's consents, newest first

Who may handle consents, for which patients, and the one consent writer are the
core's (gateway/core/consents.py); this module parses and renders.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from gateway.api.json import iso, patient_link
from gateway.api.params import no_nul, parse_patient
from gateway.api.schemas import ConsentList, ConsentOut, errors
from gateway.core import consents
from gateway.core.consents import ConsentView
from gateway.core.identity import Subject
from gateway.core.refusals import Refused
from gateway.http.errors import http_error
from gateway.http.security import gateway_of, require_subject, what

router = APIRouter(prefix="/api/v1/consents", tags=["consents"])

Text = Annotated[str, AfterValidator(no_nul)]


class ConsentIn(BaseModel):
    """A consent as the caller records it (camelCase keys, as every REST request and answer here)."""

    model_config = ConfigDict(extra="forbid")

    patient: Text = Field(..., description="The patient: system|value, e.g. nhs|9449305552 or mrn|D100001")
    level: Literal["record", "teaching", "publication"]
    givenBy: Literal["patient", "parent", "best-interests"]
    capturedBy: Text | None = Field(None, max_length=200, description="Who took the consent; default the caller")
    date: dt.date | None = Field(None, description="When it was given; default today")
    scope: Literal["patient", "encounter", "photos"] = "patient"
    encounter: Text | None = Field(None, max_length=100, description="For scope encounter: the visit number")
    photos: list[Annotated[Text, Field(max_length=32)]] = Field(default_factory=list, max_length=500,
                                                                description="For scope photos: the photo ids")
    purposeNote: Text | None = Field(None, max_length=4000, description="For publication: the specific use consented to")


def consent_json(c: ConsentView) -> dict[str, Any]:
    return {
        "id": c.id, "patient": patient_link(c.patient), "level": c.level, "givenBy": c.given_by, "capturedBy": c.captured_by,
        "date": c.consent_date.isoformat() if c.consent_date else None, "status": c.status, "withdrawnAt": iso(c.withdrawn_at),
        "scope": c.scope, "encounter": c.encounter, "photos": c.photos, "purposeNote": c.purpose_note,
    }


@router.post("", status_code=201, response_model=ConsentOut, responses=errors(400, 401, 403, 404, 422))
def create(request: Request, body: ConsentIn, subject: Annotated[Subject, Depends(require_subject)]) -> dict[str, Any]:
    """Record a consent: for the patient, one encounter (visit number) or named photos."""
    gw = gateway_of(request)
    try:
        who = consents.caller(gw, subject, "c", what(request))
        consent = consents.record(
            gw, who, parse_patient(body.patient), level=body.level, given_by=body.givenBy, captured_by=body.capturedBy,
            consent_date=body.date, scope=body.scope, encounter=body.encounter, photos=body.photos,
            purpose_note=body.purposeNote, what=what(request))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None
    return consent_json(consent)  # committed before the answer goes out


@router.post("/{consent_id}/withdraw", response_model=ConsentOut, responses=errors(401, 403, 404, 409))
def withdraw(request: Request, consent_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict[str, Any]:
    """Withdraw a consent at once: teaching and publication use end now; care use of existing photos stays."""
    gw = gateway_of(request)
    try:
        who = consents.caller(gw, subject, "u", what(request))
        return consent_json(consents.withdraw(gw, who, consent_id, what(request)))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None


@router.get("", response_model=ConsentList, responses=errors(400, 401, 403, 404))
def read(request: Request, subject: Annotated[Subject, Depends(require_subject)],
         patient: Annotated[str, Query(description="The patient: system|value, e.g. nhs|9449305552")]) -> dict[str, Any]:
    """A patient's consents, for callers with a need to know the patient (the specialty rule, as for photos);
    a patient the caller may not know answers exactly like an unknown one."""
    gw = gateway_of(request)
    try:
        who = consents.caller(gw, subject, "r", what(request))
        found = consents.for_patient(gw, who, parse_patient(patient), what(request))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None
    return {"total": len(found), "items": [consent_json(c) for c in found]}
