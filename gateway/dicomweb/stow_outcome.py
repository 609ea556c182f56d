"""STOW-RS: each instance through the core ingest on its own, and the answer (PS3.18 10.5.3): ReferencedSOPSequence
(with RetrieveURLs) and FailedSOPSequence with FailureReason codes from the core's refusal codes. 200 all stored, 202
some (or stored with a warning: an image already stored as another instance is answered by that instance,
WarningReason 0xB000), 409 none (400 when none could be read or a required attribute was missing; 409 as well for
a study mismatch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastapi.responses import Response
from pydicom import Dataset

from gateway.core.context import Gateway
from gateway.core.ingest import errors
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest
from gateway.core.objects.text import words
from gateway.dicomweb.common import dicom_json

log = logging.getLogger("clinphoto.dicomweb")

# FailureReason (0008,1197): PS3.18 10.5.3 and the storage statuses of PS3.4 B.2.3
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # also: an instance of another study than the URL names
CANNOT_UNDERSTAND = 0xC000
COERCED = 0xB000  # WarningReason: Coercion of Data Elements
REASON = {
    errors.SOP_CLASS_NOT_SUPPORTED: SOP_CLASS_NOT_SUPPORTED,
    errors.INVALID_OBJECT: DOES_NOT_MATCH,
    errors.NOT_FAITHFUL: DOES_NOT_MATCH,
    errors.TRANSFER_SYNTAX_NOT_SUPPORTED: CANNOT_UNDERSTAND,
    errors.UNSUPPORTED_TYPE: CANNOT_UNDERSTAND,
    errors.CORRUPT: CANNOT_UNDERSTAND,
    errors.BAD_METADATA: CANNOT_UNDERSTAND,
    errors.TOO_LARGE: OUT_OF_RESOURCES,
    errors.TOO_MANY_PIXELS: OUT_OF_RESOURCES,
    errors.PATIENT_MERGED: OUT_OF_RESOURCES,  # the patient changed while storing: the same request again will file right
    errors.DUPLICATE_INSTANCE: DUPLICATE_SOP_INSTANCE,
    errors.FORBIDDEN: NOT_AUTHORIZED,
    errors.INSUFFICIENT_SCOPE: NOT_AUTHORIZED,
    errors.UNKNOWN_PATIENT: PROCESSING_FAILURE,
}


@dataclass
class Outcome:
    stored: list[tuple[str, str, str, str]] = field(default_factory=list)  # class, instance, study, series
    warnings: dict[str, str] = field(default_factory=dict)  # stored instance -> why it differs from what was sent
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # class, instance, reason, why
    malformed: int = 0  # failures the request itself caused (unreadable, required attributes missing)
    mismatched: int = 0  # instances of another study than the URL names

    def fail(self, sop_class: str, sop: str, reason: int, why: str, *, malformed: bool = False) -> None:
        self.failed.append((sop_class, sop, reason, why))
        self.malformed += malformed


def ingest_one(gw: Gateway, out: Outcome, request: CaptureRequest, sop_class: str, sop: str) -> None:
    try:
        result = ingest(gw, request)  # returns after the commit: nothing is acknowledged before
    except IngestRejected as exc:  # audited by the core
        out.fail(sop_class, sop, REASON.get(exc.code, PROCESSING_FAILURE), exc.message)
        return
    except Exception as exc:  # our failure, not the sender's
        log.error("STOW-RS: an instance could not be stored: %s", type(exc).__name__)
        log.debug("STOW-RS failure", exc_info=True)
        out.fail(sop_class, sop, PROCESSING_FAILURE, f"not stored ({type(exc).__name__}); send it again")
        return
    photo = result.photos[0]
    out.stored.append((sop_class, photo.sop_instance_uid, photo.study_uid, photo.series_uid))
    if sop and photo.sop_instance_uid != sop:
        # the same image of the same patient is kept once (the core's rule): say where it is, not where it was asked
        out.warnings[photo.sop_instance_uid] = f"this image is already stored as instance {photo.sop_instance_uid}, not {sop}"


def response(out: Outcome, base: str, study: str | None) -> Response:
    ds = Dataset()
    if study is not None or len({s[2] for s in out.stored}) == 1:
        ds.RetrieveURL = f"{base}/studies/{study or out.stored[0][2]}"
    referenced = []
    for sop_class, sop, st, se in out.stored:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        item.RetrieveURL = f"{base}/studies/{st}/series/{se}/instances/{sop}"
        if sop in out.warnings:
            item.WarningReason = COERCED
            item.add_new(0x00000902, "LO", words(out.warnings[sop]))
        referenced.append(item)
    failed = []
    for sop_class, sop, reason, why in out.failed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        item.FailureReason = reason
        item.add_new(0x00000902, "LO", words(why))  # ErrorComment: why, in words
        failed.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    if not out.failed and not out.warnings:
        status = 200
    elif out.stored:
        status = 202  # stored, with failures or warnings
    elif out.malformed == len(out.failed) and not out.mismatched:
        status = 400
    else:
        status = 409
    return dicom_json(ds.to_json_dict(), status)
