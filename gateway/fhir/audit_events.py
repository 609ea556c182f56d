"""FHIR AuditEvent: the audit trail for audit roles, shaped as IHE Basic Audit Log Patterns (BALP).

A search is type rest / subtype search with the query as an entity; a read names the data it read; agents carry
the user's id, role, network address and purpose of use."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.core import audit_views
from gateway.core.audit_views import AuditCriteria, AuditView
from gateway.fhir.common import Caller, base_url, fhir_response, gateway_of, query, what
from gateway.fhir.outcome import FhirError
from gateway.fhir.params import count_of, date_range, reference_id, split_or, token
from gateway.fhir.render import bundle, instant
from gateway.http.numbers import NotANumber, whole_number

router = APIRouter()

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
LOCAL_SUBTYPE = "https://clinphoto.local/fhir/CodeSystem/audit-subtype"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
RESTFUL_CODES = {"read", "vread", "update", "patch", "delete", "history", "create", "search", "capabilities", "transaction",
                 "batch", "operation"}
PARAMS = {"patient", "agent", "date", "entity", "type", "subtype", "outcome", "_id"}
ENTITY_RESOURCE = {"asset": "Media", "consent": "Consent"}


def _entity(e: dict[str, Any], view: AuditView) -> dict[str, Any]:
    kind, ident = str(e.get("type", "")), e.get("id")
    out: dict[str, Any] = {}
    if kind == "patient" and isinstance(ident, int) and ident in view.entity_patients:
        out["what"] = {"reference": f"Patient/{view.entity_patients[ident]}"}
        out["type"] = {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
    elif kind in ENTITY_RESOURCE and ident is not None:
        out["what"] = {"reference": f"{ENTITY_RESOURCE[kind]}/{ident}"}
        out["type"] = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
    elif kind == "query":
        out["type"] = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
        out["query"] = base64.b64encode(str(ident).encode()).decode()
    elif ident is not None:
        out["what"] = {"identifier": {"system": f"urn:clinphoto:{kind or 'entity'}", "value": str(ident)}}
    return out


def resource(view: AuditView) -> dict[str, Any]:
    e = view.event
    kind = {"system": AUDIT_TYPE, "code": "rest"} if e.type_code == "rest" else {"system": DCM, "code": e.type_code}
    agent: dict[str, Any] = {"requestor": True, "who": {"identifier": {"value": e.agent_who or "unknown"}}}
    if e.agent_role:
        agent["role"] = [{"text": e.agent_role}]
    if e.agent_network:
        agent["network"] = {"address": e.agent_network, "type": "2"}
    if e.purpose_of_use:
        agent["purposeOfUse"] = [{"coding": [{"system": ACT_REASON, "code": e.purpose_of_use}]}]
    out: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(e.seq),
        "type": kind,
        "action": e.action,
        "recorded": instant(e.recorded_at),
        "outcome": e.outcome,
        "agent": [agent],
        "source": {"observer": {"display": "clinphoto"}},
    }
    if e.subtype:
        out["subtype"] = [{"system": RESTFUL if e.subtype in RESTFUL_CODES else LOCAL_SUBTYPE, "code": e.subtype}]
    if e.outcome_desc:
        out["outcomeDesc"] = e.outcome_desc
    entities = [x for x in (_entity(x, view) for x in (e.entities or []) if isinstance(x, dict)) if x]
    if view.patient and not any(x.get("what", {}).get("reference") == f"Patient/{view.patient}" for x in entities):
        entities.insert(0, {"what": {"reference": f"Patient/{view.patient}"}, "type": {"system": ENTITY_TYPE, "code": "1"}})
    if entities:
        out["entity"] = entities
    return out


def _values(q: Any, name: str) -> list[str] | None:
    got = [v for g in split_or(q.get(name)) for v in g]
    return got or None


NO_EVENT = -1  # a sequence number no audit event has (they count up from 1)


def _seq(text: str) -> int | None:
    """An audit event's id (its sequence number, an int64 in the database), or None: no event has that id."""
    try:
        return whole_number(text, "id")
    except NotANumber:
        return None


@router.get("/AuditEvent/{seq}")
async def read(request: Request, seq: str, subject: Caller) -> JSONResponse:
    gw = gateway_of(request)
    ctx = await run_in_threadpool(audit_views.reader, gw, subject, what(request))
    number = _seq(seq)
    if number is None:
        raise FhirError(404, "audit event not found")
    _total, views = await run_in_threadpool(lambda: audit_views.search(gw, ctx, AuditCriteria(seq=number), count=1,
                                                                       before_seq=None, query=what(request)))
    if not views:
        raise FhirError(404, "audit event not found")
    return fhir_response(resource(views[0]))


@router.get("/AuditEvent")
async def search(request: Request, subject: Caller) -> JSONResponse:
    gw = gateway_of(request)
    q = query(request)
    q.check_known(PARAMS)
    ctx = await run_in_threadpool(audit_views.reader, gw, subject, what(request))
    patients = _values(q, "patient")
    types = _values(q, "type")
    subtypes = _values(q, "subtype")
    id_text = q.one("_id")
    # an _id that is no event's number matches none (it was ignored, and every event matched)
    seq = None if id_text is None else NO_EVENT if (n := _seq(id_text)) is None else n
    cursor_text = q.one("_cursor")
    cursor = None if cursor_text is None else _seq(cursor_text)
    if cursor_text is not None and cursor is None:
        raise FhirError(400, "the paging cursor is not one this server gave out")
    criteria = AuditCriteria(
        patient_public_ids=[reference_id(p, "Patient", "patient") for p in patients] if patients else None,
        agents=[token(a)[1] for a in _values(q, "agent") or []] or None,
        recorded=[date_range(v, "date") for v in q.get("date")],
        entity_ids=[v.rsplit("/", 1)[-1] for v in _values(q, "entity") or []] or None,
        type_codes=[token(t)[1] for t in types] if types else None,
        subtypes=[token(s)[1] for s in subtypes] if subtypes else None,
        outcomes=_values(q, "outcome"),
        seq=seq,
    )
    count = count_of(q)
    total, views = await run_in_threadpool(lambda: audit_views.search(
        gw, ctx, criteria, count=count, before_seq=cursor, query=what(request)))
    links = {"self": str(request.url)}
    if len(views) == count and views:
        items = [(k, v) for k, v in request.query_params.multi_items() if k != "_cursor"] + [("_cursor", str(views[-1].event.seq))]
        links["next"] = f"{base_url(request)}/AuditEvent?{urlencode(items)}"
    return fhir_response(bundle([(resource(v), "match") for v in views], base=base_url(request), total=total, links=links))
