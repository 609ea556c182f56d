"""The viewer door's HTTP routes.

Launch (each ends in a viewer session cookie and a redirect to the page; the bearer token is read once, here):
  POST /api/v1/viewer/launch                    bearer; {patient, lowerDateTime?, upperDateTime?, studyUid?, mostRecent?}
                                                -> a single-use launch link for this user and patient
  GET  /viewer/launch/{secret}                  the link: opens the viewer once
  GET  /IHEInvokeImageDisplay?requestType=PATIENT&patientID=<id>^^^<issuer>[&lowerDateTime&upperDateTime&mostRecentResults]
  GET  /IHEInvokeImageDisplay?requestType=STUDY&studyUID=<uid>          (IHE IID, with Authorization: Bearer)
  GET  /viewer/smart/launch?iss=&launch=        SMART on FHIR EHR launch (smart.py), back at /viewer/smart/callback
The page and what it reads (the session cookie only):
  GET  /viewer/  /viewer/static/*               the page, its script and style (served here: no CDN)
  GET  /viewer/api/session                      the user, the patient banner, break-glass state, the watermark text
  GET  /viewer/api/photos                       the launch's photos the policy lets this user see
  GET  /viewer/img/{photo}/{rendition}          thumbnail | preview | original; R and V photos watermarked
  POST /viewer/api/break-glass                  {reason}: emergency access, audited; POST /viewer/api/sign-out
Every rule, refusal and audit record is the core's; this module parses, calls it and renders.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.core import access, launches, patient_refs, patient_views, watermark
from gateway.core.identity import AuthError, Subject
from gateway.core.photo_search import PhotoCriteria, TimeRange, search_photos
from gateway.core.refusals import Refused
from gateway.http.errors import http_error
from gateway.http.security import gateway_of, require_subject, verifier_for, what
from gateway.viewer import session as sessions
from gateway.viewer import smart
from gateway.viewer.session import ViewerSession
from gateway.viewer.settings import ViewerSettings

log = logging.getLogger("clinphoto.viewer")

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
NHS_ISSUERS = {"NHS", "2.16.840.1.113883.2.1.4.1"}  # the NHS number's issuer, by name or by its OID (IID: &OID&ISO)
MAX_PHOTOS = 500  # a patient's photos in one list; the page groups them (a photography record is rarely larger)
CSRF_HEADER = "x-clinphoto-viewer"  # a custom header a cross-site form cannot send: state changes need it
# a launch for a patient nobody registered opens an empty viewer, as one the policy hides does (the REST list
# answers both with an empty page): a launch must not tell who is in the index
NOBODY = 0
OPENING = ('<!doctype html><html lang="en"><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=/viewer/">'
           '<title>Clinical photos</title><main><p><a href="/viewer/">Open the clinical photos</a></p></main></html>')
NOT_SIGNED_IN = "the viewer session has ended or was never opened: open the viewer from the patient record again"


class LaunchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    patient: str = Field(..., max_length=200, description="The patient, as identifier system|value (aliases nhs|, mrn|)")
    lower: datetime | None = Field(None, alias="lowerDateTime")
    upper: datetime | None = Field(None, alias="upperDateTime")
    study: str | None = Field(None, alias="studyUid", max_length=64)
    most_recent: int | None = Field(None, alias="mostRecent", ge=1, le=MAX_PHOTOS)


class BreakGlassRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(..., max_length=500)


def create_router(settings: ViewerSettings, data_dir: Path) -> APIRouter:
    router = APIRouter(tags=["viewer"])
    key = sessions.key_for(data_dir)
    frame_ancestors = " ".join(["'self'", *settings.frame_ancestors])
    # the page's own policy: nothing but this gateway, no inline script, framed only by the EPRs configured
    page_csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
                f"base-uri 'none'; form-action 'none'; frame-ancestors {frame_ancestors}")

    def start_session(request: Request, subject: Subject, patient_id: int, first: launches.FirstView) -> Response:
        expires = time.time() + settings.session_minutes * 60
        viewer = ViewerSession(subject=subject, patient_id=patient_id, first=first, expires=expires)
        # a page of our own that moves on to the viewer, not a redirect: the launch usually comes from the EPR's site,
        # and a browser does not send a SameSite=Strict cookie on a redirect chain another site started; the next
        # navigation starts here, so it does
        response = Response(OPENING, media_type="text/html", headers=_page_headers("default-src 'none'; frame-ancestors "
                                                                                      + frame_ancestors))
        _set_cookie(request, response, sessions.seal(key, viewer), settings)
        return response

    def current(request: Request) -> ViewerSession:
        viewer = sessions.unseal(key, request.cookies.get(sessions.COOKIE))
        if viewer is None:
            raise HTTPException(401, NOT_SIGNED_IN)
        return viewer

    def refused(request: Request, refusal: Refused) -> HTTPException:
        return http_error(refusal, gateway_of(request).settings.auth.realm)

    # -- launch ---------------------------------------------------------------------------------------------

    @router.post("/api/v1/viewer/launch", responses={400: {}, 401: {}, 403: {}, 404: {}})
    def issue_launch(request: Request, body: LaunchRequest, subject: Annotated[Subject, Depends(require_subject)]) -> dict[str, Any]:
        """A single-use link that opens the viewer on one patient for the calling user (an EPR asks for it and opens
        it in the user's browser); it lives `viewer.launch_seconds`."""
        gw = gateway_of(request)
        ref = _patient_ref(body.patient)
        try:
            ctx = access.photo_request(gw, subject, "search", what(request))
            patient_id = access.patient_of(gw, ctx, ref, what(request))
            first = launches.FirstView(lower=body.lower, upper=body.upper, study_uid=body.study, most_recent=body.most_recent)
            secret = launches.issue(gw, ctx, patient_id, first, settings.launch_seconds)
        except Refused as refusal:
            raise refused(request, refusal) from None
        return {"url": f"/viewer/launch/{secret}", "expiresIn": settings.launch_seconds}

    @router.get("/viewer/launch/{secret}", include_in_schema=False)
    def open_launch(request: Request, secret: str) -> Response:
        gw = gateway_of(request)
        if not re.fullmatch(r"[A-Za-z0-9_-]{20,100}", secret):
            return _page_error(404, launches.NOT_USABLE)
        try:
            launch = launches.redeem(gw, secret, request.client.host if request.client else None)
        except Refused as refusal:
            return _page_error(404, refusal.reason)
        return start_session(request, launch.subject, launch.patient_id or NOBODY, launch.first)

    @router.get("/IHEInvokeImageDisplay", include_in_schema=False)
    def invoke_image_display(
        request: Request,
        subject: Annotated[Subject, Depends(require_subject)],
        request_type: Annotated[str, Query(alias="requestType")],
        patient_id: Annotated[str | None, Query(alias="patientID", max_length=200)] = None,
        study_uid: Annotated[str | None, Query(alias="studyUID", max_length=64)] = None,
        lower: Annotated[str | None, Query(alias="lowerDateTime", max_length=40)] = None,
        upper: Annotated[str | None, Query(alias="upperDateTime", max_length=40)] = None,
        most_recent: Annotated[int | None, Query(alias="mostRecentResults", ge=1, le=MAX_PHOTOS)] = None,
    ) -> Response:
        """IHE Invoke Image Display (ITI/RAD IID): the patient's photos, or one study's, in the viewer."""
        gw = gateway_of(request)
        try:
            ctx = access.photo_request(gw, subject, "search", what(request))
            if request_type == "PATIENT":
                if not patient_id:
                    raise HTTPException(400, "requestType=PATIENT needs patientID=<id>^^^<issuer>")
                row_id = access.patient_of(gw, ctx, _iid_patient(patient_id), what(request)) or NOBODY
                first = launches.FirstView(lower=_iid_time(lower, "lowerDateTime"), upper=_iid_time(upper, "upperDateTime"),
                                           most_recent=most_recent)
            elif request_type == "STUDY":
                if not study_uid or not re.fullmatch(r"[0-9.]{1,64}", study_uid):
                    raise HTTPException(400, "requestType=STUDY needs studyUID=<a DICOM UID>")
                row_id = launches.patient_of_study(gw, ctx, study_uid, what(request))
                first = launches.FirstView(study_uid=study_uid)
            else:
                raise HTTPException(400, f"requestType {request_type!r} is not supported here: PATIENT or STUDY")
        except Refused as refusal:
            raise refused(request, refusal) from None
        return start_session(request, subject, row_id, first)

    @router.get("/viewer/smart/launch", include_in_schema=False)
    def smart_launch(request: Request, iss: Annotated[str, Query(max_length=500)], launch: Annotated[str, Query(max_length=500)]) -> Response:
        """SMART EHR launch: off to the authorization server the (allowed) FHIR server names."""
        if not settings.smart_client_id:
            return _page_error(404, "SMART launch is not configured on this gateway (viewer.smart_client_id)")
        if iss.rstrip("/") not in {i.rstrip("/") for i in settings.smart_issuers}:
            log.warning("SMART launch from a FHIR server not in viewer.smart_issuers refused")
            return _page_error(400, "this FHIR server (iss) may not launch the viewer: ask for it to be added to viewer.smart_issuers")
        try:
            url, flow = smart.start(iss, launch, settings.smart_client_id, settings.smart_scope, _callback_uri(request))
        except smart.SmartError as exc:
            return _page_error(502, str(exc))
        response = RedirectResponse(url, status_code=302)
        response.set_cookie(smart.COOKIE, smart.seal(key, flow), max_age=smart.FLOW_SECONDS, path=smart.PATH, httponly=True,
                            samesite="lax", secure=_https(request))
        return response

    @router.get("/viewer/smart/callback", include_in_schema=False)
    def smart_callback(request: Request, state: Annotated[str, Query(max_length=200)] = "",
                       code: Annotated[str | None, Query(max_length=2000)] = None,
                       error: Annotated[str | None, Query(max_length=200)] = None) -> Response:
        gw = gateway_of(request)
        flow = smart.unseal(key, request.cookies.get(smart.COOKIE))
        if flow is None or not state or not secrets.compare_digest(flow.state, state):
            return _page_error(400, "this sign-in did not start here, or took too long: open the viewer from the patient record again")
        if error or not code:
            return _page_error(403, f"the sign-in was not completed ({error or 'no code'})")
        try:
            answer = smart.exchange(flow, code, settings.smart_client_id or "", _callback_uri(request))
            subject = verifier_for(request.app.state, gw.settings).verify(str(answer["access_token"]),
                                                                           request.client.host if request.client else None)
        except smart.SmartError as exc:
            return _page_error(502, str(exc))
        except AuthError as exc:
            return _page_error(401, f"the access token was not accepted: {exc}")
        patient = str(answer.get("patient") or "")
        try:
            ctx = access.photo_request(gw, subject, "search", what(request))
            rows = patient_views.row_ids_of(gw, ctx, [patient]) if patient else []
        except Refused as refusal:
            return _page_error(403, refusal.reason)
        if not rows:
            return _page_error(400, "the launch named no patient this gateway knows: open the viewer from the patient record again")
        response = start_session(request, subject, rows[0], launches.FirstView())
        response.delete_cookie(smart.COOKIE, path=smart.PATH)
        return response

    # -- the page -------------------------------------------------------------------------------------------

    @router.get("/viewer", include_in_schema=False)
    def page_root() -> Response:
        return RedirectResponse("/viewer/", status_code=308)

    @router.get("/viewer/", include_in_schema=False)
    def page(request: Request) -> Response:
        if sessions.unseal(key, request.cookies.get(sessions.COOKIE)) is None:
            return _page_error(401, NOT_SIGNED_IN, page_csp)
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=_page_headers(page_csp))

    @router.get("/viewer/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "no such file")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache",
                                                                                  "X-Content-Type-Options": "nosniff"})

    # -- what the page reads --------------------------------------------------------------------------------

    @router.get("/viewer/api/session", include_in_schema=False)
    def session_info(request: Request) -> JSONResponse:
        viewer = current(request)
        gw = gateway_of(request)
        subject = viewer.subject
        try:
            ctx = access.photo_request(gw, subject, "read", what(request))
        except Refused as refusal:
            raise refused(request, refusal) from None
        try:
            public_id = patient_views.public_id_of(gw, viewer.patient_id) if viewer.patient_id != NOBODY else ""
            shown = patient_views.by_id(gw, ctx, public_id, what(request)) if public_id else None
        except Refused:
            shown = None  # no need to know this patient's record (audited by the core): photos only, as the policy lets
        return _private({
            "user": {"name": subject.name or subject.sub, "role": subject.role},
            "patient": _banner(shown),
            "breakGlass": subject.break_glass_reason,
            "expiresAt": datetime.fromtimestamp(viewer.expires, timezone.utc).isoformat(),
            "first": {"studyUid": viewer.first.study_uid, "mostRecent": viewer.first.most_recent,
                      "lower": viewer.first.lower.isoformat() if viewer.first.lower else None,
                      "upper": viewer.first.upper.isoformat() if viewer.first.upper else None},
        })

    @router.get("/viewer/api/photos", include_in_schema=False)
    def photos(request: Request) -> JSONResponse:
        viewer = current(request)
        gw = gateway_of(request)
        first = viewer.first
        criteria = PhotoCriteria(patients=[viewer.patient_id], studies=[first.study_uid] if first.study_uid else None,
                                 taken=[TimeRange(first.lower, first.upper)] if first.lower or first.upper else ())
        try:
            ctx = access.photo_request(gw, viewer.subject, "search", what(request))
            found = search_photos(gw, ctx, criteria, query=f"viewer: photos of the launch ({what(request)})",
                                  count=first.most_recent or MAX_PHOTOS, channel="viewer")
        except Refused as refusal:
            raise refused(request, refusal) from None
        return _private({"total": found.total, "items": [_photo(v) for v in found.photos]})

    @router.get("/viewer/img/{photo_id}/{rendition}", include_in_schema=False)
    def image(request: Request, photo_id: str, rendition: Literal["thumbnail", "preview", "original"]) -> Response:
        viewer = current(request)
        gw = gateway_of(request)
        try:
            ctx = access.photo_request(gw, viewer.subject, "read", what(request))
            found = access.image(gw, ctx, photo_id, rendition, what(request), within_patient=viewer.patient_id)
        except Refused as refusal:
            raise refused(request, refusal) from None
        except access.StoreFault as fault:
            raise HTTPException(500, str(fault)) from None
        headers = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}
        if watermark.needed(found.asset.sensitivity) and rendition != "thumbnail" and found.media_type == "image/jpeg":
            stamp = f"{viewer.subject.name or viewer.subject.sub} {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
            return Response(watermark.burn(found.path, stamp), media_type="image/jpeg", headers=headers)
        return FileResponse(found.path, media_type=found.media_type, headers=headers)

    @router.post("/viewer/api/break-glass", include_in_schema=False)
    def break_glass(request: Request, body: BreakGlassRequest) -> JSONResponse:
        viewer = current(request)
        _require_same_page(request)
        reason = body.reason.strip()
        if not reason:
            raise HTTPException(400, "break-glass needs a reason: say why this emergency access is needed")
        gw = gateway_of(request)
        opened = viewer.with_break_glass(reason)
        try:
            access.screen(gw, opened.subject, what(request))  # a role that may not break glass is refused (audited)
        except Refused as refusal:
            raise refused(request, refusal) from None
        response = _private({"breakGlass": reason})
        _set_cookie(request, response, sessions.seal(key, opened), settings)
        return response

    @router.post("/viewer/api/sign-out", include_in_schema=False)
    def sign_out(request: Request) -> Response:
        _require_same_page(request)
        response = Response(status_code=204)
        response.delete_cookie(sessions.COOKIE, path=sessions.PATH)
        return response

    return router


def _patient_ref(text: str) -> tuple[str, str]:
    try:
        return patient_refs.parse(text)
    except patient_refs.BadPatientRef as exc:
        raise HTTPException(400, f"patient: {exc}") from None


def _iid_patient(text: str) -> tuple[str, str]:
    """IID's patientID, `value^^^issuer` (issuer a name, or `&OID&ISO`): the NHS number by either form, else a hospital
    number (MRN) of the index."""
    value, _, issuer = text.partition("^^^")
    value = value.strip()
    namespace, _, rest = issuer.partition("&")
    oid = rest.partition("&")[0]
    if not value or not issuer:
        raise HTTPException(400, "patientID must be <id>^^^<issuer>, e.g. 9434765919^^^NHS")
    system = "nhs" if (namespace or oid) in NHS_ISSUERS or oid in NHS_ISSUERS else "mrn"
    try:  # as every door reads `system|value`: the alias expanded, an NHS number checked and written as 10 digits
        return patient_refs.normalise_identifier(system, value)
    except patient_refs.BadPatientRef as exc:
        raise HTTPException(400, f"patientID: {exc}") from None


def _iid_time(text: str | None, name: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"{name} must be an ISO 8601 date-time, e.g. 2024-01-31T00:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _photo(view: access.PhotoView) -> dict[str, Any]:
    asset = view.asset
    base = f"/viewer/img/{asset.id}"
    return {
        "id": asset.id, "takenAt": _iso(asset.taken_at), "storedAt": _iso(asset.created_at),
        "encounter": view.encounter[1] if view.encounter else None, "studyUid": asset.study_uid,
        "bodySite": {"code": asset.body_site_code, "display": asset.body_site_display, "laterality": asset.laterality},
        "view": asset.view, "specialty": asset.specialty, "sensitivity": asset.sensitivity,
        "consent": {"level": view.consent.level, "status": view.consent.status} if view.consent else None,
        "careOnly": view.care_only, "photographer": asset.photographer, "device": asset.device,
        "description": asset.description, "width": asset.width, "height": asset.height,
        "thumbnail": f"{base}/thumbnail", "preview": f"{base}/preview",
        "original": f"{base}/original" if view.original_allowed and asset.original_kept and asset.media_type == "image/jpeg" else None,
    }


def _banner(shown: patient_views.PatientView | None) -> dict[str, Any] | None:
    if shown is None:
        return None
    nhs = next((i.value for i in shown.identifiers if i.system == patient_refs.NHS_SYSTEM), None)
    return {"id": shown.id, "familyName": shown.family_name, "givenNames": shown.given_names,
            "birthDate": shown.birth_date.isoformat() if shown.birth_date else None, "nhsNumber": nhs, "sex": shown.sex}


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def _private(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={"Cache-Control": "private, no-store"})


def _https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


def _callback_uri(request: Request) -> str:
    return str(request.url_for("smart_callback"))


def _set_cookie(request: Request, response: Response, value: str, settings: ViewerSettings) -> None:
    response.set_cookie(sessions.COOKIE, value, max_age=int(settings.session_minutes * 60), path=sessions.PATH,
                        httponly=True, samesite="strict", secure=_https(request))


def _require_same_page(request: Request) -> None:
    """State changes come from the viewer's own script: the custom header and, when the browser says, our origin."""
    origin = request.headers.get("origin")
    if request.headers.get(CSRF_HEADER) != "1" or (origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}"):
        raise HTTPException(403, "this request did not come from the viewer page")


def _page_headers(csp: str) -> dict[str, str]:
    return {"Content-Security-Policy": csp, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


def _page_error(status: int, message: str, csp: str = "default-src 'none'; frame-ancestors 'self'") -> Response:
    body = (f"<!doctype html><html lang=en><meta charset=utf-8><title>Clinical photos</title>"
            f"<main><h1>Clinical photos</h1><p role=alert>{escape(message)}</p></main></html>")
    return Response(body, status_code=status, media_type="text/html", headers=_page_headers(csp))

