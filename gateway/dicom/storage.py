"""C-STORE SCP: a peer's object into the core ingest as a received DICOM object, answered only after the commit.

The object is written to the spool byte for byte as the association carried it (pynetdicom's encoded data set
behind its file meta: never decoded and re-encoded here), then stored through the one ingest pipeline, which
checks it, finds its patient by PatientID + IssuerOfPatientID, renders it and audits the store. The core's
refusal codes become C-STORE statuses (PS3.4 Annex B.2.3 and PS3.7 C) with an ErrorComment saying why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pynetdicom.dsutils import encode_file_meta

from gateway.core import access
from gateway.core.context import Gateway
from gateway.core.identity import Subject, peer_allows
from gateway.core.ingest import errors
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.incoming import OverLimit
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.received import SOP_CLASSES, TRANSFER_SYNTAXES
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from gateway.core.refusals import Kind, Refused
from gateway.dicom.command import COMMENT_MAX, error_comment
from gateway.dicom.spooled import SpooledDataSet, Unkept

log = logging.getLogger("clinphoto.dicom")

SUCCESS = 0x0000
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (the sender may try again later)
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand

# the core's ingest refusals as C-STORE statuses
STATUS = {
    errors.SOP_CLASS_NOT_SUPPORTED: SOP_CLASS_NOT_SUPPORTED,
    errors.INVALID_OBJECT: DOES_NOT_MATCH_SOP_CLASS,
    errors.NOT_FAITHFUL: DOES_NOT_MATCH_SOP_CLASS,
    errors.TRANSFER_SYNTAX_NOT_SUPPORTED: CANNOT_UNDERSTAND,
    errors.TOO_LARGE: OUT_OF_RESOURCES,
    errors.TOO_MANY_PIXELS: OUT_OF_RESOURCES,
    errors.FORBIDDEN: NOT_AUTHORIZED,
    errors.INSUFFICIENT_SCOPE: NOT_AUTHORIZED,
    errors.PATIENT_MERGED: OUT_OF_RESOURCES,  # the patient changed while storing: the same object again will file right
}
# what a refusal says in the 64 characters ErrorComment holds, when the core's own words are longer (they would be
# cut mid-sentence: "SOP Instance UID 2.25.3466...0619 is a"); the core's words stay in the audit record
SHORT = {
    errors.DUPLICATE_INSTANCE: "SOP Instance UID already stored here with other content",
    errors.UNKNOWN_PATIENT: "no patient with this PatientID/IssuerOfPatientID here",
    errors.SOP_CLASS_NOT_SUPPORTED: "SOP Class not kept here (VL Photographic, Dermoscopic, SC)",
    errors.TRANSFER_SYNTAX_NOT_SUPPORTED: "transfer syntax not kept here as it is",
    errors.INVALID_OBJECT: "object does not meet its IOD (see the gateway's audit)",
    errors.NOT_FAITHFUL: "pixel data cannot be kept and shown faithfully",
    errors.TOO_LARGE: "object over the size limit",
    errors.TOO_MANY_PIXELS: "image over the pixel limit",
    errors.CORRUPT: "pixel data damaged (a JPEG frame cut short?)",
    errors.PATIENT_MERGED: "patient merged while storing: send again",
}


@dataclass(frozen=True)
class StoreAnswer:
    status: int
    comment: str | None = None
    offending: str | None = None  # the keyword of the attribute at fault, as OffendingElement (PS3.7 C.4.2)

    def dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        if self.comment:
            ds.ErrorComment = error_comment(self.comment)
        tag = tag_for_keyword(self.offending) if self.offending else None
        if tag is not None:
            ds.OffendingElement = [tag]
        return ds


def _comment(exc: IngestRejected) -> str:
    """What a refusal says in ErrorComment's 64 characters: the core's words when they fit, else its short form,
    naming the attribute at fault when there is one (an invalid object's was only in the audit record)."""
    if len(exc.message) <= COMMENT_MAX:
        return exc.message
    short = SHORT.get(exc.code, exc.message)
    named = f"{short.split(' (')[0]}: {exc.field}" if exc.field else short
    return named if len(named) <= COMMENT_MAX else short


def store(gw: Gateway, subject: Subject | None, address: str | None, encoded: Sequence[bytes | memoryview] | SpooledDataSet) -> StoreAnswer:
    """One C-STORE: the peer's permission, the object through the ingest, the answer after the commit. `encoded`: the
    Part 10 object, already in the spool as it arrived (spooled.py), or its pieces one after the other (the file
    meta, then the data set as the association carried it)."""
    spooled = encoded if isinstance(encoded, SpooledDataSet) else None
    if subject is None or subject.peer is None or not peer_allows(subject, "store"):
        if spooled is not None:
            spooled.discard()
        if subject is not None and subject.peer is not None:  # on the trail, naming the peer, as other refusals are
            access.refuse(gw, subject, f"C-STORE {subject.peer.ae_title}",
                          Refused(Kind.FORBIDDEN, "this AE may not store here (store is not among its services)"))
        return StoreAnswer(NOT_AUTHORIZED, "this AE may not store here")
    source = Source.dicom_peer(subject.peer.ae_title, address, name=subject.name,
                               purpose_of_use=subject.purpose_of_use or "TREAT")
    path = spooled.path if spooled is not None else None
    try:
        if spooled is not None:
            try:
                item = ReceivedObject(spooled.path, spooled=True, sha256=spooled.finish())
            except OverLimit as over:  # nothing of it kept: the ingest refuses it for its size
                item = ReceivedObject(spooled.path, spooled=True, received_size=over.size)
        else:
            item = _spool(gw, cast(Sequence[bytes | memoryview], encoded))
            path = item.path
        # the spooled file becomes the blob (linked, not copied)
        result = ingest(gw, CaptureRequest(source=source, items=[item]))
    except IngestRejected as exc:  # audited by the core
        status = STATUS.get(exc.code, CANNOT_UNDERSTAND)
        # the code, never the message: it may name the patient the object gives
        log.warning("C-STORE from %s refused: %s (0x%04X)", subject.peer.ae_title, exc.code, status)
        return StoreAnswer(status, _comment(exc), exc.field if exc.code == errors.INVALID_OBJECT else None)
    except Exception as exc:  # our failure, not the sender's: it may send again
        log.error("C-STORE from %s could not be stored: %s", subject.peer.ae_title, type(exc).__name__)
        log.debug("C-STORE failure", exc_info=True)
        return StoreAnswer(OUT_OF_RESOURCES, f"not stored ({type(exc).__name__}); send again")
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    photo = result.photos[0]
    log.info("C-STORE from %s: %s photo %s", subject.peer.ae_title, photo.status, photo.asset_id)
    return StoreAnswer(SUCCESS)


def _spool(gw: Gateway, encoded: Sequence[bytes | memoryview]) -> ReceivedObject:
    """The object's pieces written to a spool file (hashed by the ingest while it reads the header)."""
    fd, path = gw.spool.new_file(prefix="cstore-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in encoded:
                f.write(piece)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ReceivedObject(path, spooled=True)


def contexts() -> list[tuple[str, list[str]]]:
    """The storage SOP classes and transfer syntaxes accepted: those the ingest keeps and serves as they are."""
    return [(uid, list(TRANSFER_SYNTAXES)) for uid in SOP_CLASSES]


def on_store(gw: Gateway, event: Any) -> Dataset:
    """pynetdicom's EVT_C_STORE handler. The data set is written from the association's own buffer, behind the file
    meta pynetdicom would put before it (its encoded_dataset(): the object joined, copied twice, ~1 ms of a 12-MP
    photo's C-STORE, traced)."""
    subject = getattr(event.assoc, "clinphoto_subject", None)
    address = event.assoc.requestor.address
    data_set = event.request.DataSet
    if isinstance(data_set, SpooledDataSet):  # written to the spool as it came (spooled.py)
        return store(gw, subject, address, data_set).dataset()
    if isinstance(data_set, Unkept):  # the spool had no file for it (pdata.py): the sender may try again later
        return StoreAnswer(OUT_OF_RESOURCES, "not stored: no room to receive it; send again").dataset()
    head = b"\0" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    with data_set.getbuffer() as view:
        return store(gw, subject, address, (head, view)).dataset()
