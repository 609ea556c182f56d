"""The EPR door: a FHIR R4 server for the governed photos, mounted at /fhir.

It parses FHIR requests into core calls and renders what comes back; the policy, paging, audit and refusals are
the core's (gateway/core/access.py, photo_search.py, patient_views.py). Every error is an OperationOutcome."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from gateway.core import access, patient_refs, patient_views
from gateway.core.access import PhotoView
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.patient_refs import NHS_SYSTEM
from gateway.core.photo_search import Cursor, Order, PhotoCriteria, PhotoPage, search_photos
from gateway.core.policy.rules import resolve
from gateway.core.refusals import Refused
from gateway.fhir import audit_events, capability, consents, ingest, render
from gateway.fhir.common import Caller, JsonOnly, base_url, fhir_response, query, what
from gateway.fhir.outcome import FHIR_JSON, FhirError, operation_outcome
from gateway.fhir.params import Query, birth_date, count_of, date_range, reference_id, split_or, token
from gateway.http.errors import BodyTooLarge

log = logging.getLogger(__name__)

MEDIA_PARAMS = {"patient", "patient.identifier", "subject", "identifier", "created", "site", "modality", "view", "encounter",
                "status", "_id"}
DOCUMENT_PARAMS = {"patient", "patient.identifier", "subject", "identifier", "date", "type", "category", "encounter", "status", "_id"}
PATIENT_PARAMS = {"_id", "identifier", "family", "given", "birthdate"}
# a FHIR status asked for as the photo statuses it stands for
STATUS_OF: dict[str, dict[str, list[str]]] = {
    "media": {v: [k] for k, v in render.MEDIA_STATUS.items()},
    "document": {"current": ["active", "quarantined"], "entered-in-error": ["entered-in-error"]},
}


def create_fhir_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="clinphoto FHIR R4", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gw = gw

    @app.exception_handler(FhirError)
    async def fhir_error(_request: Request, exc: FhirError) -> JSONResponse:
        return fhir_response(operation_outcome([("error", exc.code, exc.diagnostics)]), exc.status, exc.headers)

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        err = FhirError.of(exc)
        return fhir_response(operation_outcome([("error", err.code, err.diagnostics)]), err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        err = FhirError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return fhir_response(operation_outcome([("error", err.code, err.diagnostics)]), err.status, err.headers)

    @app.exception_handler(404)
    async def no_route(request: Request, _exc: Exception) -> JSONResponse:
        return fhir_response(operation_outcome([("error", "not-supported", f"{request.url.path}: no such FHIR interaction here "
                                                                          "(see /fhir/metadata)")]), 404)

    @app.exception_handler(405)
    async def no_method(request: Request, _exc: Exception) -> JSONResponse:
        return fhir_response(operation_outcome([("error", "not-supported", f"{request.method} is not supported on "
                                                                          f"{request.url.path} (see /fhir/metadata)")]), 405)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return fhir_response(operation_outcome([("error", "invalid", text)]), 400)

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, BodyTooLarge):  # the caller's body over its limit: the edge answers 413
            log.error("FHIR %s %s failed: %s", request.method, request.url.path, type(exc).__name__)
            log.debug("FHIR failure", exc_info=True)
        return fhir_response(operation_outcome([("fatal", "exception", f"the server failed ({type(exc).__name__}); "
                                                                       "the failure is logged")]), 500)

    app.add_middleware(JsonOnly)

    @app.get("/metadata")
    def metadata(request: Request) -> JSONResponse:
        return fhir_response(capability.statement(base_url(request), gw.settings.auth))

    @app.get("/.well-known/smart-configuration")
    def smart_configuration() -> JSONResponse:
        return JSONResponse(capability.smart_configuration(gw.settings.auth))

    app.include_router(consents.router)
    app.include_router(audit_events.router)
    app.include_router(ingest.router)

    # -- Patient ------------------------------------------------------------------------------------------

    @app.get("/Patient/{patient_id}")
    async def read_patient(request: Request, patient_id: str, subject: Caller) -> JSONResponse:
        ctx = resolve(subject, gw.settings.policy)
        view = await run_in_threadpool(patient_views.by_id, gw, ctx, patient_id, f"GET {request.url.path}")
        return fhir_response(render.patient(view))

    @app.get("/Patient")
    async def search_patients(request: Request, subject: Caller) -> JSONResponse:
        q = query(request)
        q.check_known(PATIENT_PARAMS)
        count = count_of(q)
        criteria = patient_views.PatientCriteria(
            public_ids=[v for group in split_or(q.get("_id")) for v in group] or None,
            identifier=_identifier(q.one("identifier")),
            family=q.one("family"), given=q.one("given"),
            birth_date=birth_date(b) if (b := q.one("birthdate")) else None,
        )
        ctx = resolve(subject, gw.settings.policy)
        views = await run_in_threadpool(patient_views.search, gw, ctx, criteria, limit=count, query=what(request))
        base = base_url(request)
        entries = [(render.patient(v), "match") for v in views]
        body = render.bundle(entries, base=base, total=len(views) if len(views) < count else None,
                             links={"self": str(request.url)})
        return _with_warnings(body, q)

    # -- Media and DocumentReference: one photo, two views ---------------------------------------------

    @app.get("/Media/{photo_id}")
    async def read_media(request: Request, photo_id: str, subject: Caller) -> JSONResponse:
        view = await run_in_threadpool(_read, gw, subject, photo_id, "Media", what(request))
        return fhir_response(render.media(view, base_url(request)))

    @app.get("/DocumentReference/{photo_id}")
    async def read_document(request: Request, photo_id: str, subject: Caller) -> JSONResponse:
        view = await run_in_threadpool(_read, gw, subject, photo_id, "DocumentReference", what(request))
        return fhir_response(render.document_reference(view, base_url(request)))

    @app.get("/Media")
    async def search_media(request: Request, subject: Caller) -> JSONResponse:
        return await _photo_search(request, subject, "Media")

    @app.get("/DocumentReference")
    async def search_documents(request: Request, subject: Caller) -> JSONResponse:
        return await _photo_search(request, subject, "DocumentReference")

    async def _photo_search(request: Request, subject: Caller, resource: str) -> JSONResponse:
        q = query(request)
        q.check_known(MEDIA_PARAMS if resource == "Media" else DOCUMENT_PARAMS)
        includes = q.get("_include")
        for inc in includes:
            if inc not in (f"{resource}:patient", f"{resource}:subject"):
                raise FhirError(400, f"_include {inc!r} is not supported (supported: {resource}:patient)")
        summary = q.one("_summary")
        if summary not in (None, "count", "false"):
            raise FhirError(400, f"_summary={summary} is not supported (count, false)")
        sort = q.one("_sort") or ("-created" if resource == "Media" else "-date")
        order_by: dict[str, Order] = {"created": "oldest", "-created": "newest", "date": "oldest", "-date": "newest"}
        if sort not in order_by:
            raise FhirError(400, f"_sort={sort} is not supported (created, -created for Media; date, -date for DocumentReference)")
        cursor = Cursor.parse(c) if (c := q.one("_cursor")) else None
        count = count_of(q)
        total_mode = q.one("_total") or "accurate"
        if total_mode not in ("none", "estimate", "accurate"):
            raise FhirError(400, f"_total={total_mode}: one of none, estimate, accurate")
        elements = elements_of(q, resource)

        def work() -> PhotoPage:
            # one hop to a worker thread for the whole search (each hop costs ~0.3 ms; bench/fhir_search.py)
            criteria = _photo_criteria(gw, subject, q, resource)
            ctx = access.photo_request(gw, subject, "search", what(request), resource)
            return search_photos(gw, ctx, criteria, query=what(request), count=0 if summary == "count" else count,
                                 order=order_by[sort], cursor=cursor, channel="fhir", include_patients=bool(includes),
                                 with_total=summary == "count" or total_mode != "none")

        page = await run_in_threadpool(work)
        base = base_url(request)
        make = render.media if resource == "Media" else render.document_reference
        entries = [] if summary == "count" else [(render.only(make(v, base), elements), "match") for v in page.photos]
        entries += [(render.patient(p), "include") for p in page.included]
        links = {"self": str(request.url)}
        if summary != "count":
            for rel, at in (("next", page.next), ("previous", page.previous)):
                if at is not None:
                    links[rel] = _page_link(request, base, resource, at)
        return _with_warnings(render.bundle(entries, base=base, total=page.total, links=links), q)

    # -- Binary: the image -------------------------------------------------------------------------------

    @app.get("/Binary/{photo_id}")
    async def binary(request: Request, photo_id: str, subject: Caller) -> Response:
        asked = request.query_params.get("_rendition") or "original"
        renditions: dict[str, access.Rendition] = {"original": "original", "preview": "preview", "thumbnail": "thumbnail"}
        if asked not in renditions:
            raise FhirError(400, f"_rendition={asked}: one of preview, thumbnail (or none for the original)")
        rendition = renditions[asked]
        ctx = await run_in_threadpool(access.photo_request, gw, subject, "read", what(request), "Binary")
        stored = await run_in_threadpool(access.image, gw, ctx, photo_id, rendition, what(request))
        accept = request.headers.get("accept", "")
        # the content's hash too: a correction (pipeline._replace) gives the photo another original under the same id,
        # and a download resumed with If-Range against the old ETag must not be the new object's tail
        etag = f'"{photo_id}-{rendition}-{stored.sha256[:16]}"'
        headers = {"Cache-Control": "private, no-store", "ETag": etag, "X-Content-Type-Options": "nosniff"}
        if FHIR_JSON in accept or "application/json" in accept:
            import base64

            data = await run_in_threadpool(stored.path.read_bytes)
            return fhir_response({"resourceType": "Binary", "id": photo_id, "contentType": stored.media_type,
                                  "securityContext": {"reference": f"Media/{photo_id}"},
                                  "data": base64.b64encode(data).decode()}, headers=headers)
        # FileResponse answers Range requests (206) itself; image bytes are never compressed (no GZip middleware here)
        return FileResponse(stored.path, media_type=stored.media_type, headers=headers)

    return app


def _with_warnings(body: dict[str, Any], q: Query) -> JSONResponse:
    if q.ignored:
        outcome = operation_outcome([("warning", "not-supported", f"ignored unknown search parameter(s): {', '.join(q.ignored)}")])
        outcome["id"] = "ignored-parameters"
        body.setdefault("entry", []).append({"resource": outcome, "search": {"mode": "outcome"}})
    return fhir_response(body)


def _identifier(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    system, value = token(text)
    if not system or not value:
        raise FhirError(400, f"identifier: {text!r} needs system|value (e.g. {NHS_SYSTEM}|9990000018)")
    try:  # as every door reads it: the nhs alias expanded, an NHS number checked and written as 10 digits
        return patient_refs.normalise_identifier(system, value)
    except patient_refs.BadPatientRef as exc:
        raise FhirError(400, f"identifier: {exc}") from None


def _read(gw: Gateway, subject: Subject, photo_id: str, resource: str, asked: str) -> PhotoView:
    ctx = access.photo_request(gw, subject, "read", asked, resource)
    return access.read(gw, ctx, photo_id)


def _patient_ids(gw: Gateway, subject: Subject, q: Query) -> list[int] | None:
    """The patient criteria (patient, subject, patient.identifier) as the live patients' row ids; None: not asked."""
    wanted: list[set[int]] = []
    ctx = resolve(subject, gw.settings.policy)
    for name in ("patient", "subject"):
        for group in split_or(q.get(name)):
            found: set[int] = set()
            for value in group:
                found |= set(patient_views.row_ids_of(gw, ctx, [reference_id(value, "Patient", name)]))
            wanted.append(found)
    for group in split_or(q.get("patient.identifier")):
        found = set()
        for value in group:
            ident = _identifier(value)
            assert ident is not None
            found |= set(patient_views.row_ids_by_identifier(gw, ctx, ident, "patient.identifier"))
        wanted.append(found)
    if not wanted:
        return None
    result = wanted[0]
    for more in wanted[1:]:
        result &= more
    return sorted(result)


def _photo_criteria(gw: Gateway, subject: Subject, q: Query, resource: str) -> PhotoCriteria:
    statuses: list[str] | None = None
    if q.get("status"):
        table = STATUS_OF["media" if resource == "Media" else "document"]
        statuses = []
        for value in [v for g in split_or(q.get("status")) for v in g]:
            mapped = table.get(value)
            if mapped is None:
                raise FhirError(400, f"status={value}: one of {', '.join(table)}")
            statuses.extend(mapped)
    sop_uids = None
    if q.get("identifier"):
        sop_uids = [token(v)[1].removeprefix("urn:oid:") for g in split_or(q.get("identifier")) for v in g]
    sites = [token(v)[1] for g in split_or(q.get("site")) for v in g] or None
    modalities = [token(v)[1] for g in split_or(q.get("modality")) for v in g]
    sop_classes = [uid for uid, (code, _d) in render.MODALITY.items() if code in modalities] if modalities else None
    date_param = "created" if resource == "Media" else "date"
    taken = [date_range(v, date_param) for v in q.get(date_param)]
    for name in ("type", "category"):
        for v in [v for g in split_or(q.get(name)) for v in g]:
            system, code = token(v)
            if name == "type" and code != render.PHOTO_TYPE["code"] or name == "category" and code not in ("XC", "DMS", "OT"):
                sop_uids = []  # nothing else is stored here: no match
    encounters = None
    if q.get("encounter"):
        ctx = resolve(subject, gw.settings.policy)
        encounters = patient_views.encounter_ids(gw, ctx, [reference_id(v, "Encounter", "encounter") if "/" in v else v
                                                           for g in split_or(q.get("encounter")) for v in g])
    return PhotoCriteria(
        patients=_patient_ids(gw, subject, q),
        ids=[v for g in split_or(q.get("_id")) for v in g] or None,
        sop_instance_uids=sop_uids,
        taken=taken,
        body_sites=sites,
        sop_classes=sop_classes,
        views=[v for g in split_or(q.get("view")) for v in g] or None,
        encounters=encounters,
        statuses=statuses,
    )


def elements_of(q: Query, resource: str) -> set[str] | None:
    """_elements: the top-level elements to keep (id, meta and resourceType always stay); None: all."""
    names = {v.strip() for g in split_or(q.get("_elements")) for v in g if v.strip()}
    if not names:
        return None
    return {n.split(".", 1)[1] if n.startswith(f"{resource}.") else n for n in names}


def _page_link(request: Request, base: str, resource: str, at: Cursor) -> str:
    items = [(k, v) for k, v in request.query_params.multi_items() if k != "_cursor"]
    items.append(("_cursor", at.token()))
    return f"{base}/{resource}?{urlencode(items)}"
