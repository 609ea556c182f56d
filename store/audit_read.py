"""Reading the audit trail for people: filtered, newest first, one record in full.

The trail is written by store.audit (hash-chained, keyed); this module only reads it, for the
operator commands `clinphoto audit list` and `clinphoto audit show` (and later the console).
Records hold ids, never names: a patient is its row id, a person their token subject.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import AuditEvent

# DICOM PS3.16 CID 400 event IDs and FHIR's rest type, as a person reads them
TYPE_NAMES = {
    "110100": "Application Activity",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110106": "Export",
    "110107": "Import",
    "110110": "Patient Record",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
    "110127": "Emergency Override Started",
    "rest": "RESTful Operation",
}
OUTCOME_NAMES = {"0": "success", "4": "minor failure", "8": "serious failure", "12": "major failure"}
FAILURES = ("4", "8", "12")


@dataclass(frozen=True)
class Filters:
    patient_id: int | None = None
    agent: str | None = None  # the token subject or AE title that acted
    type_code: str | None = None
    outcome: str | None = None  # "success", "failure", or one outcome code
    since: datetime | None = None
    limit: int = 50


def type_code_of(text: str) -> str | None:
    """A type given as its code (110113, rest) or its name (security alert), case-insensitive."""
    text = text.strip()
    if text in TYPE_NAMES:
        return text
    wanted = text.lower().replace("-", " ")
    return next((code for code, name in TYPE_NAMES.items() if name.lower() == wanted), None)


def find(session: Session, f: Filters) -> list[AuditEvent]:
    """The records matching every filter given, newest first."""
    query = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(f.limit)
    if f.patient_id is not None:
        query = query.where(AuditEvent.patient_id == f.patient_id)
    if f.agent:
        # a DICOM peer's imports are recorded as "ae:TITLE", its queries and retrieves as "TITLE": either finds both
        query = query.where(AuditEvent.agent_who.in_(sorted({f.agent, f.agent.removeprefix("ae:"), "ae:" + f.agent.removeprefix("ae:")})))
    if f.type_code:
        query = query.where(AuditEvent.type_code == f.type_code)
    if f.outcome == "success":
        query = query.where(AuditEvent.outcome == "0")
    elif f.outcome == "failure":
        query = query.where(AuditEvent.outcome.in_(FAILURES))
    elif f.outcome:
        query = query.where(AuditEvent.outcome == f.outcome)
    if f.since is not None:
        query = query.where(AuditEvent.recorded_at >= f.since)
    return list(session.scalars(query))


def one(session: Session, seq: int) -> AuditEvent | None:
    return session.get(AuditEvent, seq)


def utc_text(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite hands back naive datetimes; every stored time is UTC)."""
    if moment is None:
        return None
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def as_dict(event: AuditEvent) -> dict[str, object]:
    """Every field of a record, as JSON (times in UTC, ISO 8601)."""
    return {
        "seq": event.seq,
        "recordedAt": utc_text(event.recorded_at),
        "type": event.type_code,
        "typeName": TYPE_NAMES.get(event.type_code, event.type_code),
        "subtype": event.subtype,
        "action": event.action,
        "outcome": event.outcome,
        "outcomeName": OUTCOME_NAMES.get(event.outcome, event.outcome),
        "outcomeDescription": event.outcome_desc,
        "agent": event.agent_who,
        "agentRole": event.agent_role,
        "agentNetwork": event.agent_network,
        "purposeOfUse": event.purpose_of_use,
        "patientId": event.patient_id,
        "entities": event.entities,
        "detail": event.detail,
        "hash": event.hash,
        "previousHash": event.prev_hash,
    }
