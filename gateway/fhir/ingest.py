"""Photos in through FHIR, into the core ingest (the same checks, EXIF stripping, DICOM object, consent and audit
as every other way in):

- `POST /fhir` with a transaction Bundle in the shape of IHE MHD "Provide Document Bundle": Binary entries with
  the image bytes, and DocumentReference or Media entries whose attachment url names a Binary by its fullUrl; a
  SubmissionSet List is accepted and not kept. All of it is one capture request, stored whole or not at all.
- `POST /fhir/Media` with the image inline (content.data).

The photos of one request share one patient and one governance (body site, view, sensitivity, encounter...):
the core stores a capture session that way. A transaction mixing two is refused, naming the elements that differ.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.core import patient_views
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.ingest import errors
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import IngestResult, ingest, uncovered, uploader
from gateway.core.ingest.request import CaptureRequest, Channel, Governance, ImageFile, PatientRef, governance
from gateway.core.policy.rules import resolve
from gateway.fhir.body import json_body
from gateway.fhir.common import Caller, base_url, fhir_response, gateway_of
from gateway.fhir.outcome import FhirError, operation_outcome
from gateway.fhir.params import reference_id
from gateway.fhir.render import CONFIDENTIALITY, LATERALITY, LATERALITY_ATTRIBUTE, SNOMED

router = APIRouter()

# the core's refusal codes as HTTP statuses of this door (FHIR: 422 for what was understood and cannot be stored)
STATUS = {errors.UNSUPPORTED_TYPE: 415, errors.TOO_LARGE: 413, errors.FORBIDDEN: 403, errors.INSUFFICIENT_SCOPE: 403,
          errors.DUPLICATE_INSTANCE: 409, errors.PATIENT_MERGED: 409}
SIDES = {code: side for side, (code, _display) in LATERALITY.items()}
MAX_BODY = 64 * 1024 * 1024  # base64 of the upload door's largest photo, with room for the JSON around it (the edge enforces it)


@dataclass
class _Photo:
    """One photo of the request: its bytes' spool file and what its resource says about it."""

    path: Path
    filename: str | None
    patient: PatientRef
    governance: Governance
    resource_type: str  # Media or DocumentReference: the view the client asked to create


def _refused(exc: IngestRejected) -> FhirError:
    photo = f"photo {exc.item + 1}{f' ({exc.filename})' if exc.filename else ''}: " if exc.item is not None else ""
    field = f" ({exc.field})" if exc.field else ""
    status = STATUS.get(exc.code, 422)
    return FhirError(status, f"{photo}{exc.message}{field}", "processing" if status == 422 else None)


async def _json(request: Request) -> dict[str, Any]:
    body = await json_body(request)  # its size bounded by MAX_BODY at the edge (gateway/edge.py), before it is read
    if not isinstance(body, dict) or "resourceType" not in body:
        raise FhirError(400, "the body is not a FHIR resource")
    return body


def _spool(gw: Gateway, data_b64: Any, where: str) -> Path:
    if not isinstance(data_b64, str) or not data_b64:
        raise FhirError(422, f"{where}: the image bytes are missing (base64 data)")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise FhirError(400, f"{where}: not valid base64") from None
    fd, path = gw.spool.new_file(prefix="fhir-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _patient(gw: Gateway, subject: Subject, ref: Any, where: str) -> PatientRef:
    if not isinstance(ref, dict):
        raise FhirError(422, f"{where}: the patient is required (Patient/<id> or an identifier)")
    if ref.get("reference"):
        ids = patient_views.row_ids_of(gw, resolve(subject, gw.settings.policy), [reference_id(str(ref["reference"]), "Patient", where)])
        if not ids:
            raise FhirError(422, f"{where}: no patient {ref['reference']} is known here", "processing")
        return PatientRef.internal(ids[0])
    ident = ref.get("identifier") or {}
    if ident.get("system") and ident.get("value"):
        try:
            return PatientRef.identifier(str(ident["system"]), str(ident["value"]))
        except IngestRejected as exc:
            raise _refused(exc) from None
    raise FhirError(422, f"{where}: name the patient by reference (Patient/<id>) or identifier (system and value)")


def _body_site(concept: Any) -> dict[str, Any] | None:
    if not isinstance(concept, dict):
        return None
    coding = next((c for c in concept.get("coding", []) if isinstance(c, dict) and c.get("system") == SNOMED), None)
    if coding is None:
        return None
    code = str(coding.get("code", ""))
    site: dict[str, Any] = {"code": code, "display": coding.get("display")}
    if f":{LATERALITY_ATTRIBUTE}=" in code:  # the post-coordinated form this server writes
        site["code"], side = code.split(f":{LATERALITY_ATTRIBUTE}=", 1)
        site["laterality"] = SIDES.get(side)
        if site["laterality"] is None:
            raise FhirError(422, f"bodySite: laterality {side!r} is not one of {', '.join(SIDES)}")
    return {k: v for k, v in site.items() if v is not None}


def _taken(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise FhirError(400, f"{where}: {value!r} is not a dateTime") from None


def _sensitivity(resource: dict[str, Any]) -> str:
    labels = [*((resource.get("meta") or {}).get("security") or []),
              *[c for label in resource.get("securityLabel") or [] for c in (label.get("coding") or [])]]
    codes = {c.get("code") for c in labels if isinstance(c, dict) and c.get("system") == CONFIDENTIALITY}
    for level in ("V", "R", "N"):
        if level in codes:
            return level
    return "N"


def _governance(resource: dict[str, Any]) -> Governance:
    """What a Media or DocumentReference says about its photo, as the core's governance (its checks refuse bad values)."""
    kind = resource["resourceType"]
    if kind == "Media":
        encounter = ((resource.get("encounter") or {}).get("identifier") or {}).get("value")
        site = _body_site(resource.get("bodySite"))
        values: dict[str, Any] = {
            "encounter": encounter, "body_site": site, "view": (resource.get("view") or {}).get("text"),
            "photographer": (resource.get("operator") or {}).get("display"), "device": resource.get("deviceName"),
            "taken_at": _taken(resource.get("createdDateTime"), "Media.createdDateTime"),
            "description": "\n".join(n.get("text", "") for n in resource.get("note") or [] if isinstance(n, dict)) or None,
        }
    else:
        context = resource.get("context") or {}
        encounters = [((e or {}).get("identifier") or {}).get("value") for e in context.get("encounter") or []]
        # R4 DocumentReference has no body site (R5 adds one): a photo's body site comes in through Media
        values = {
            "encounter": encounters[0] if encounters else None,
            "photographer": next((a.get("display") for a in resource.get("author") or [] if isinstance(a, dict)), None),
            "taken_at": _taken(_attachment(resource).get("creation"), "DocumentReference.content.attachment.creation"),
            "description": resource.get("description"),
        }
    values["sensitivity"] = _sensitivity(resource)
    try:
        return governance(**{k: v for k, v in values.items() if v is not None})
    except IngestRejected as exc:
        raise _refused(exc) from None


def _attachment(resource: dict[str, Any]) -> dict[str, Any]:
    if resource["resourceType"] == "Media":
        content = resource.get("content")
        return content if isinstance(content, dict) else {}
    contents = resource.get("content") or []
    first = contents[0] if contents and isinstance(contents[0], dict) else {}
    attachment = first.get("attachment")
    return attachment if isinstance(attachment, dict) else {}


def _subject(resource: dict[str, Any]) -> Any:
    return resource.get("subject")


async def _store(request: Request, subject: Subject, photos: list[_Photo]) -> tuple[IngestResult, bool]:
    gw = gateway_of(request)
    try:
        source = await run_in_threadpool(uploader, gw, subject, Channel.FHIR)
        first = photos[0]
        for p in photos[1:]:
            if p.patient != first.patient:
                raise FhirError(422, "the photos of one request must be of one patient (one submission per patient)")
            if p.governance != first.governance:
                raise FhirError(422, "the photos of one request must share body site, view, sensitivity, encounter and the "
                                     "rest of their description; send one request per capture")
        capture = CaptureRequest(source=source, items=[ImageFile(p.path, filename=p.filename) for p in photos],
                                 patient=first.patient, governance=first.governance,
                                 idempotency_key=request.headers.get("idempotency-key"))
        result = await run_in_threadpool(ingest, gw, capture)
    except IngestRejected as exc:  # audited by the core
        raise _refused(exc) from None
    hidden = await run_in_threadpool(uncovered, gw, result)
    return result, bool(hidden)


def _binary_key(entry: dict[str, Any], index: int) -> str:
    """How attachments name a Binary of the Bundle: its fullUrl (urn:uuid:...), else Binary/<id>."""
    return str(entry.get("fullUrl") or f"Binary/{(entry.get('resource') or {}).get('id', index)}")


def _cleanup(photos: list[_Photo]) -> None:
    for p in photos:
        p.path.unlink(missing_ok=True)


@router.post("/Media")
async def create_media(request: Request, subject: Caller) -> JSONResponse:
    body = await _json(request)
    if body["resourceType"] != "Media":
        raise FhirError(400, f"POST /Media takes a Media, not a {body['resourceType']}")
    gw = gateway_of(request)
    content = _attachment(body)
    photo = _Photo(path=Path(), filename=content.get("title"), patient=_patient(gw, subject, _subject(body), "Media.subject"),
                   governance=_governance(body), resource_type="Media")
    photo.path = _spool(gw, content.get("data"), "Media.content.data")
    try:
        result, hidden = await _store(request, subject, [photo])
    finally:
        _cleanup([photo])
    stored = result.photos[0]
    created = stored.status == "created"
    issues = [("information", "informational", f"{'stored' if created else 'already stored'} as Media/{stored.asset_id}")]
    if hidden:
        issues.append(("warning", "business-rule", "no consent covers this photo for care: it stays hidden until a consent is "
                                                   "recorded (POST /fhir/Consent)"))
    return fhir_response(operation_outcome(issues), 201 if created else 200,
                         {"Location": f"{base_url(request)}/Media/{stored.asset_id}"})


@router.post("/")
async def transaction(request: Request, subject: Caller) -> JSONResponse:
    body = await _json(request)
    if body["resourceType"] != "Bundle" or body.get("type") not in ("transaction", "batch"):
        raise FhirError(400, "POST /fhir takes a transaction Bundle")
    if body.get("type") == "batch":
        raise FhirError(422, "batch is not supported: send a transaction (the photos are stored together or not at all)")
    gw = gateway_of(request)
    entries = [e for e in body.get("entry") or [] if isinstance(e, dict)]
    binaries: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        res = e.get("resource") or {}
        if res.get("resourceType") == "Binary":
            binaries[_binary_key(e, i)] = res
    photos: list[_Photo] = []
    answers: list[tuple[str, int | None]] = []  # per entry: kind, index into photos
    named: dict[str, int] = {}  # a Binary's fullUrl -> the photo whose attachment names it
    try:
        for i, e in enumerate(entries):
            res = e.get("resource") or {}
            kind = res.get("resourceType")
            if (e.get("request") or {}).get("method", "POST") != "POST":
                raise FhirError(422, f"entry {i}: only POST (create) is supported in a transaction")
            if kind == "Binary" or kind == "List":
                answers.append((kind, None))
                continue
            if kind not in ("Media", "DocumentReference"):
                raise FhirError(422, f"entry {i}: {kind} is not accepted here (Binary, Media, DocumentReference, List)")
            attachment = _attachment(res)
            data = attachment.get("data")
            if data is None:
                binary = binaries.get(str(attachment.get("url", "")))
                if binary is None:
                    raise FhirError(422, f"entry {i}: the attachment names no Binary of this Bundle ({attachment.get('url')!r})")
                data = binary.get("data")
                named[str(attachment["url"])] = len(photos)
            where = f"entry {i} {kind}"
            photo = _Photo(path=Path(), filename=attachment.get("title"), patient=_patient(gw, subject, _subject(res), f"{where}.subject"),
                           governance=_governance(res), resource_type=kind)
            photo.path = _spool(gw, data, f"{where} image")
            photos.append(photo)
            answers.append((kind, len(photos) - 1))
        if not photos:
            raise FhirError(422, "the transaction holds no Media or DocumentReference with an image")
        orphans = sorted(set(binaries) - set(named))
        if orphans:
            raise FhirError(422, f"Binary {orphans[0]} is named by no Media or DocumentReference of this Bundle")
        result, hidden = await _store(request, subject, photos)
    finally:
        _cleanup(photos)
    base = base_url(request)
    out_entries: list[dict[str, Any]] = []
    for i, (kind, index) in enumerate(answers):
        if index is not None:
            stored = result.photos[index]
            status = "201 Created" if stored.status == "created" else "200 OK"
            out_entries.append({"response": {"status": status, "location": f"{kind}/{stored.asset_id}"}})
        elif kind == "Binary":
            # a Binary is the image of the photo that names it: it is read as Binary/<the photo's id>
            owner = result.photos[named[_binary_key(entries[i], i)]]
            status = "201 Created" if owner.status == "created" else "200 OK"
            out_entries.append({"response": {"status": status, "location": f"Binary/{owner.asset_id}"}})
        else:
            out_entries.append({"response": {"status": "200 OK", "outcome": operation_outcome(
                [("information", "informational", "the SubmissionSet List is accepted and not kept as a resource")])}})
    response: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction-response", "entry": out_entries}
    if hidden:
        response["entry"][0]["response"]["outcome"] = operation_outcome(
            [("warning", "business-rule", "no consent covers these photos for care: they stay hidden until a consent is "
                                          "recorded (POST /fhir/Consent)")])
    return fhir_response(response, 200, {"Content-Location": f"{base}/"})
