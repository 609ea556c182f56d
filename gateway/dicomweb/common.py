"""What the DICOMweb routes share: the caller, the base URL, the door's refusals, JSON answers."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response

from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.dicomweb import nativexml
from gateway.dicomweb.media import DICOM_JSON, MULTIPART, Part, multipart, multipart_type, new_boundary, parse_accept
from gateway.http.security import gateway_of, require_subject
from gateway.http.security import what as what  # re-exported: the request as audit records name it

CHANNEL = "dicomweb"
Caller = Annotated[Subject, Depends(require_subject)]


class DicomwebError(Exception):
    """A refusal of this door: an HTTP status and a message saying what was wrong and what would work."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def base_url(request: Request) -> str:
    """This door's root as clients reach it (RetrieveURLs and BulkDataURIs are built on it): the configured public URL,
    else as the request names it."""
    public: str | None = getattr(request.app.state, "public_url", None)
    if public:
        return public.rstrip("/")
    return str(request.base_url).rstrip("/") + str(request.scope.get("root_path", "")).rstrip("/")


def dicom_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers=headers, media_type="application/dicom+json")


def answer_format(request: Request, what: str) -> str:
    """The media type data sets are answered in (QIDO-RS, /metadata): DICOM JSON, or the Native DICOM Model as
    multipart/related; type="application/dicom+xml" (PS3.18 8.7.3, PS3.19 A.1); 406 naming both otherwise."""
    for r in parse_accept(request.headers.get("accept")):
        if r.covers(DICOM_JSON) or r.media == "application/json":
            return DICOM_JSON
        if r.media == MULTIPART and r.part_type == nativexml.MEDIA:
            return nativexml.MEDIA
    raise DicomwebError(406, f'{what} are sent as {DICOM_JSON} (or application/json), or as {MULTIPART}; '
                             f'type="{nativexml.MEDIA}"')


def data_sets(body: list[dict[str, Any]], media: str, headers: dict[str, str] | None = None) -> Response:
    """Data sets as DICOM JSON (one array), or as XML: one NativeDicomModel document per part."""
    if media == DICOM_JSON:
        return dicom_json(body, headers=headers)
    boundary = new_boundary()
    parts = (Part(nativexml.MEDIA, [nativexml.document(data)]) for data in body)
    return Response(b"".join(multipart(parts, boundary)), headers=headers, media_type=multipart_type(nativexml.MEDIA, boundary))


def gw_of(request: Request) -> Gateway:
    """The running gateway (this door's app state)."""
    return gateway_of(request)
