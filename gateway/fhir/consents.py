"""FHIR Consent onto the core's consent records (gateway/core/consents.py, the one consent writer).

A consent's level is what it permits: record permits care (TREAT, ETREAT), teaching adds TRAIN and HRESCH,
publication adds publishing, which has no standard purpose code and so is a code of ours. Who gave it and the
publication's named use are ours too, as extensions. A consent's terms are never edited after the fact: an
update may only withdraw it (status inactive); anything else is a new consent."""

from __future__ import annotations

from datetime import date
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.core import consents
from gateway.core.consents import ConsentView
from gateway.core.patient_refs import PUBLIC_ID
from gateway.core.refusals import Kind, Refused
from gateway.fhir.body import json_body
from gateway.fhir.common import Caller, base_url, fhir_response, gateway_of, query, what
from gateway.fhir.outcome import FhirError
from gateway.fhir.params import reference_id, split_or
from gateway.fhir.render import bundle, instant

router = APIRouter()

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
LOCAL_PURPOSE = "https://clinphoto.local/fhir/CodeSystem/purpose-of-use"
GIVEN_BY_URL = "https://clinphoto.local/fhir/StructureDefinition/consent-given-by"
PURPOSE_NOTE_URL = "https://clinphoto.local/fhir/StructureDefinition/consent-publication-use"
LEVEL_PURPOSES = {
    "record": [(ACT_REASON, "TREAT"), (ACT_REASON, "ETREAT")],
    "teaching": [(ACT_REASON, "TREAT"), (ACT_REASON, "ETREAT"), (ACT_REASON, "TRAIN"), (ACT_REASON, "HRESCH")],
    "publication": [(ACT_REASON, "TREAT"), (ACT_REASON, "ETREAT"), (ACT_REASON, "TRAIN"), (ACT_REASON, "HRESCH"),
                    (LOCAL_PURPOSE, "PUBLISH")],
}
STATUS = {"active": "active", "withdrawn": "inactive"}
PARAMS = {"patient", "status", "_id"}


def resource(view: ConsentView) -> dict[str, Any]:
    provision: dict[str, Any] = {
        "type": "permit",
        "purpose": [{"system": s, "code": c} for s, c in LEVEL_PURPOSES.get(view.level, [])],
    }
    period = {k: v for k, v in (("start", view.consent_date.isoformat() if view.consent_date else None),
                                ("end", instant(view.withdrawn_at))) if v}
    if period:
        provision["period"] = period
    data = [{"meaning": "related", "reference": {"reference": f"Media/{p}"}} for p in view.photos]
    if view.encounter:
        data.append({"meaning": "related", "reference": {"type": "Encounter", "identifier": {"value": view.encounter}}})
    if data:
        provision["data"] = data
    extensions = [{"url": GIVEN_BY_URL, "valueCode": view.given_by}]
    if view.purpose_note:
        extensions.append({"url": PURPOSE_NOTE_URL, "valueString": view.purpose_note})
    out: dict[str, Any] = {
        "resourceType": "Consent",
        "id": view.id,
        "meta": {"versionId": version_of(view)},
        "extension": extensions,
        "status": STATUS.get(view.status, view.status),
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}],
                      "text": f"Clinical photography consent ({view.level})"}],
        "patient": {"reference": f"Patient/{view.patient}"},
        "policyRule": {"text": f"IMI consent level {view.level}, scope {view.scope}"},
        "provision": provision,
    }
    if view.consent_date:
        out["dateTime"] = view.consent_date.isoformat()
    if view.captured_by:
        out["performer"] = [{"display": view.captured_by}]
    return out


def version_of(view: ConsentView) -> str:
    # a consent changes once at most (withdrawal): its version says which state it is in
    return "2" if view.status == "withdrawn" else "1"


def _extension(body: dict[str, Any], url: str, key: str) -> Any:
    return next((e.get(key) for e in body.get("extension", []) if isinstance(e, dict) and e.get("url") == url), None)


def parse_new(body: dict[str, Any]) -> dict[str, Any]:
    """A Consent to record, as the core's record() arguments; what does not fit is 400 or 422 naming the element."""
    if body.get("resourceType") != "Consent":
        raise FhirError(400, "the body must be a Consent resource")
    if body.get("status", "active") != "active":
        raise FhirError(422, "Consent.status: a new consent is recorded as active")
    patient = (body.get("patient") or {}).get("reference")
    if not patient:
        raise FhirError(422, "Consent.patient: the patient reference is required (Patient/<id>)")
    provision = body.get("provision") or {}
    purposes = {p.get("code") for p in provision.get("purpose", []) if isinstance(p, dict)}
    level = "publication" if "PUBLISH" in purposes else "teaching" if purposes & {"TRAIN", "HRESCH"} else "record"
    given_by = _extension(body, GIVEN_BY_URL, "valueCode")
    if not given_by:
        raise FhirError(422, f"Consent.extension {GIVEN_BY_URL}: who gave the consent is required "
                             f"(valueCode {', '.join(consents.GIVEN_BY)})")
    photos, encounter = [], None
    for d in provision.get("data", []):
        ref = (d.get("reference") or {}) if isinstance(d, dict) else {}
        if str(ref.get("reference", "")).startswith("Media/") or str(ref.get("reference", "")).startswith("DocumentReference/"):
            photos.append(str(ref["reference"]).split("/", 1)[1])
        elif ref.get("type") == "Encounter" and (ref.get("identifier") or {}).get("value"):
            encounter = ref["identifier"]["value"]
        else:
            raise FhirError(422, "Consent.provision.data: each entry names a Media/<id> or an Encounter by identifier")
    try:
        consent_date = date.fromisoformat(str(body["dateTime"])[:10]) if body.get("dateTime") else None
    except ValueError:
        raise FhirError(400, f"Consent.dateTime: {body.get('dateTime')!r} is not a date") from None
    return {
        "patient": (PUBLIC_ID, reference_id(patient, "Patient", "Consent.patient")),
        "level": level, "given_by": given_by, "captured_by": None, "consent_date": consent_date,
        "scope": "photos" if photos else "encounter" if encounter else "patient", "encounter": encounter,
        "photos": photos, "purpose_note": _extension(body, PURPOSE_NOTE_URL, "valueString"),
    }


@router.post("/Consent")
async def create(request: Request, subject: Caller) -> JSONResponse:
    gw = gateway_of(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise FhirError(400, "the body must be a Consent resource")
    args = parse_new(body)
    who = await run_in_threadpool(consents.caller, gw, subject, "c", what(request))
    view = await run_in_threadpool(lambda: consents.record(gw, who, what=what(request), **args))
    location = f"{base_url(request)}/Consent/{view.id}/_history/{version_of(view)}"
    return fhir_response(resource(view), 201, {"Location": location, "ETag": f'W/"{version_of(view)}"'})


@router.get("/Consent/{consent_id}")
async def read(request: Request, consent_id: str, subject: Caller) -> JSONResponse:
    gw = gateway_of(request)
    who = await run_in_threadpool(consents.caller, gw, subject, "r", what(request))
    view = await run_in_threadpool(consents.one, gw, who, consent_id, what(request))
    return fhir_response(resource(view), headers={"ETag": f'W/"{version_of(view)}"'})


@router.put("/Consent/{consent_id}")
async def update(request: Request, consent_id: str, subject: Caller) -> JSONResponse:
    """Only a withdrawal: the same consent with status inactive. If-Match (a version this server gave) guards
    against withdrawing a consent someone else has changed meanwhile."""
    gw = gateway_of(request)
    body = await json_body(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Consent" or body.get("id") != consent_id:
        raise FhirError(400, "the body must be the Consent with this id")
    who = await run_in_threadpool(consents.caller, gw, subject, "u", what(request))
    current = await run_in_threadpool(consents.one, gw, who, consent_id, what(request))
    match = request.headers.get("if-match")
    if match is not None and match.strip().removeprefix("W/").strip('"') != version_of(current):
        raise FhirError(412, f"If-Match {match}: the consent is at version {version_of(current)}")
    if body.get("status") != "inactive":
        raise FhirError(422, "Consent: only a withdrawal (status inactive) may change a recorded consent; "
                             "record a new consent for new terms")
    if current.status == "withdrawn":
        return fhir_response(resource(current), headers={"ETag": f'W/"{version_of(current)}"'})
    view = await run_in_threadpool(consents.withdraw, gw, who, consent_id, what(request))
    return fhir_response(resource(view), headers={"ETag": f'W/"{version_of(view)}"'})


@router.get("/Consent")
async def search(request: Request, subject: Caller) -> JSONResponse:
    gw = gateway_of(request)
    q = query(request)
    q.check_known(PARAMS)
    patients = [v for g in split_or(q.get("patient")) for v in g]
    if len(patients) != 1:
        raise FhirError(400, "Consent search needs one patient (patient=Patient/<id>)")
    statuses = {v for g in split_or(q.get("status")) for v in g}
    unknown = statuses - set(STATUS.values())
    if unknown:
        raise FhirError(400, f"status={', '.join(sorted(unknown))}: one of active, inactive")
    who = await run_in_threadpool(consents.caller, gw, subject, "s", what(request))
    ref = (PUBLIC_ID, reference_id(patients[0], "Patient", "patient"))
    try:
        found = await run_in_threadpool(consents.for_patient, gw, who, ref, what(request))
    except Refused as refused:
        if refused.kind != Kind.NOT_FOUND:
            raise
        found = []  # a patient unknown or not known to the caller: an empty search (the refusal is audited)
    shown = [c for c in found if not statuses or STATUS.get(c.status) in statuses]
    return fhir_response(bundle([(resource(c), "match") for c in shown], base=base_url(request), total=len(shown),
                                links={"self": str(request.url)}))
