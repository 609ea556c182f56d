"""REST patients door: find a patient by identifier, read one by id (gateway/core/patient_views.py decides).

GET /api/v1/patients?identifier=system|value    (aliases nhs|..., mrn|...)
GET /api/v1/patients/{id}

Under the need-to-know rule: a patient the caller may not know answers 404 exactly like one nobody
registered. Patients are named by their opaque id, never the database key.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request

from gateway.api.json import iso, patient_link
from gateway.api.params import parse_patient
from gateway.api.schemas import PatientList, PatientOut, errors
from gateway.core import patient_views
from gateway.core.identity import Subject
from gateway.core.patient_views import PatientView
from gateway.core.policy.rules import resolve
from gateway.core.refusals import Kind, Refused
from gateway.http.errors import http_error
from gateway.http.security import gateway_of, require_subject, what

router = APIRouter(prefix="/api/v1/patients", tags=["patients"])


def patient_json(p: PatientView) -> dict[str, Any]:
    encounter = p.current_encounter
    return {
        "id": p.id,
        "name": {"family": p.family_name, "given": p.given_names, "prefix": p.name_prefix},
        "birthDate": p.birth_date.isoformat() if p.birth_date else None,
        "sex": p.sex,
        "deceasedAt": iso(p.deceased_at),
        "nhsNumberStatus": p.nhs_number_status,
        "identifiers": [{"system": i.system, "value": i.value, "type": i.type_code, "assigner": i.assigner}
                        for i in p.identifiers],
        "mergedInto": patient_link(p.merged_into) if p.merged_into else None,
        "mergedAt": iso(p.merged_at),
        "currentEncounter": {
            "visitNumber": encounter.visit_number, "class": encounter.class_code, "status": encounter.status,
            "location": encounter.location, "specialty": encounter.specialty, "attending": encounter.attending,
            "admittedAt": iso(encounter.admitted_at),
        } if encounter else None,
        "links": {"self": f"/api/v1/patients/{p.id}",
                  **({"photos": f"/api/v1/photos?patient={quote(first.system, safe=':/')}|{quote(first.value)}"}
                     if (first := next(iter(p.identifiers), None)) else {})},
    }


@router.get("", summary="Find a patient by identifier", response_model=PatientList, responses=errors(400, 401, 403))
def find_patient(
    request: Request,
    subject: Annotated[Subject, Depends(require_subject)],
    identifier: Annotated[str, Query(description="system|value, e.g. nhs|9449305552 or mrn|D100001")],
) -> dict[str, Any]:
    """The patient an identifier names, if the caller has a need to know them; nobody, and a patient the caller
    may not know, give the same empty answer."""
    gw = gateway_of(request)
    try:
        view = patient_views.by_identifier(gw, resolve(subject, gw.settings.policy), parse_patient(identifier, "identifier"),
                                           what(request))
    except Refused as refused:
        if refused.kind == Kind.NOT_FOUND:
            return {"total": 0, "items": []}
        raise http_error(refused, gw.settings.auth.realm) from None
    return {"total": 1, "items": [patient_json(view)]}


@router.get("/{patient_id}", summary="Read a patient", response_model=PatientOut, responses=errors(401, 403, 404))
def read_patient(request: Request, patient_id: str, subject: Annotated[Subject, Depends(require_subject)]) -> dict[str, Any]:
    """Demographics, identifiers, the record merged into (if any) and the current encounter."""
    gw = gateway_of(request)
    try:
        return patient_json(patient_views.by_id(gw, resolve(subject, gw.settings.policy), patient_id, what(request)))
    except Refused as refused:
        raise http_error(refused, gw.settings.auth.realm) from None

