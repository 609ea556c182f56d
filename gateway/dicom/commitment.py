"""Storage Commitment, push model (PS3.4 Annex J), as the requester: the N-ACTION the router sends to a destination
that commits, and the destination's N-EVENT-REPORT, which comes back on an association it opens to our listener
(or on the router's own, if still open); the report is translated here and recorded by the core
(routing.commitment_reported)."""

from __future__ import annotations

import logging
from typing import Any

from pydicom import Dataset
from pydicom.sequence import Sequence

from gateway.core import routing
from gateway.core.context import Gateway
from gateway.core.identity import Subject

log = logging.getLogger("clinphoto.dicom")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
COMMITMENT_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]  # Explicit, Implicit VR Little Endian
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs of the report (PS3.4 J.3.3)
# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8)
SUCCESS, NOT_AUTHORIZED, INVALID_ARGUMENT, NO_SUCH_EVENT_TYPE = 0x0000, 0x0124, 0x0115, 0x0113


def commitment_request(transaction_uid: str, sent: list[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information: the Transaction UID and each (SOP Class UID, SOP Instance UID) sent."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = Sequence([_reference(cls, uid) for cls, uid in sent])
    return ds


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_instance
    return ref


def report_of(destination: str, info: Dataset) -> routing.CommitmentReport:
    """The core's reading of an Event Information data set (raises ValueError when it names no transaction)."""
    transaction = str(info.get("TransactionUID", "") or "")
    if not transaction:
        raise ValueError("the report has no TransactionUID")
    committed = [str(item.get("ReferencedSOPInstanceUID", "")) for item in info.get("ReferencedSOPSequence", None) or []]
    failed = [(str(item.get("ReferencedSOPInstanceUID", "")), int(item.get("FailureReason", 0x0110) or 0x0110))
              for item in info.get("FailedSOPSequence", None) or []]
    return routing.CommitmentReport(destination=destination, transaction_uid=transaction,
                                    committed=[uid for uid in committed if uid], failed=[(uid, why) for uid, why in failed if uid])


def on_event_report(gw: Gateway, event: Any) -> tuple[int, Dataset | None]:
    """pynetdicom's EVT_N_EVENT_REPORT handler: a destination's commitment report, settled by the core."""
    subject: Subject | None = getattr(event.assoc, "clinphoto_subject", None)
    if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT:
        return NOT_AUTHORIZED, None
    if event.request.EventTypeID not in (ALL_COMMITTED, SOME_FAILED):
        return NO_SUCH_EVENT_TYPE, None
    # the report's sender: the peer of this association (our listener), or the destination we called (router)
    destination = subject.peer.ae_title if subject is not None and subject.peer is not None else str(event.assoc.acceptor.ae_title).strip()
    if not destination:
        return NOT_AUTHORIZED, None
    try:
        report = report_of(destination, event.event_information)
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("Storage Commitment report from %s not understood: %s", destination, exc)
        return INVALID_ARGUMENT, None
    settled = routing.commitment_reported(gw, gw.settings.routing, report)
    log.info("Storage Commitment report from %s: %d committed, %d failed, %d items settled", destination,
             len(report.committed), len(report.failed), settled)
    return SUCCESS, None
