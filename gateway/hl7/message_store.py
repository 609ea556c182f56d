"""The HL7 message store: every message raw, with what was done with it and the ACK sent.

Plain SQL through gateway.core.patients.Sql: this runs twice for every message on the hot path. The
duplicate look-up is asked for ahead (`duplicate_lookup`) so it shares a round trip with the patient
index's reads; the insert is queued and goes with the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.patients import Sql
from store.models import Hl7Message
from store.statements import Pending

T = Hl7Message.__table__


@dataclass
class StoredAck:
    id: int
    status: str
    ack: bytes | None
    raw: bytes


def duplicate_lookup(session: Session, app: str, facility: str, control_id: str) -> Pending:
    """Ask for the message that owns this sender/control-id key (the first one sent under it); read the
    answer with `duplicate_found`."""
    return Sql.of(session).later(
        "SELECT id, status, ack, raw FROM hl7_messages WHERE sending_application = ? AND sending_facility = ? "
        "AND control_id = ? AND duplicate_of IS NULL",
        # uncut: a cut key would match a different, longer id (prepare refuses over-long ones anyway)
        (app, facility, control_id))


def duplicate_found(lookup: Pending) -> StoredAck | None:
    row = lookup.one()
    if not row:
        return None
    return StoredAck(row[0], row[1], bytes(row[2]) if row[2] is not None else None, bytes(row[3]))


def find_duplicate(session: Session, app: str, facility: str, control_id: str) -> StoredAck | None:
    """The message that owns this sender/control-id key, if any (one round trip)."""
    return duplicate_found(duplicate_lookup(session, app, facility, control_id))


def insert(session: Session, *, raw: bytes, app: str, facility: str, control_id: str, message_type: str | None,
           trigger_event: str | None, event_time: datetime | None, peer: str | None, status: str,
           ack: bytes | None, error: str | None, patient_id: int | None, duplicate_of: int | None = None) -> int:
    """Store a message; its id at once (the INSERT itself may wait in the pipeline for the next round trip)."""
    sql = Sql.of(session)
    return sql.insert("hl7_messages", {
        "sending_application": app[:200], "sending_facility": facility[:200], "control_id": control_id[:200],
        "message_type": (message_type or None) and message_type[:10],
        "trigger_event": (trigger_event or None) and trigger_event[:10], "event_time": sql.dt(event_time),
        "received_at": sql.dt(datetime.now(timezone.utc)), "peer": peer, "status": status, "ack": ack, "error": error,
        "patient_id": patient_id, "raw": raw, "duplicate_of": duplicate_of})


def record_outcome(session: Session, message_id: int, *, status: str, ack: bytes | None, error: str | None,
                   patient_id: int | None) -> None:
    """After a reprocess: the new status and ACK replace the old (a repeat then gets the new ACK)."""
    Sql.of(session).run("UPDATE hl7_messages SET status = ?, ack = ?, error = ?, patient_id = ? WHERE id = ?",
                        (status, ack, error, patient_id, message_id))


def get(session: Session, message_id: int):
    return session.execute(select(T).where(T.c.id == message_id)).first()


def ids_with_status(session: Session, status: str, limit: int | None = None) -> list[int]:
    q = select(T.c.id).where(T.c.status == status).order_by(T.c.id)
    if limit:
        q = q.limit(limit)
    return list(session.execute(q).scalars())


@dataclass
class Summary:
    """What an operator sees of a stored message: no raw content, so no patient names or numbers."""

    id: int
    received_at: datetime | None
    sender: str
    control_id: str
    type_event: str
    status: str
    error: str | None


_SUMMARY_COLUMNS = (T.c.id, T.c.received_at, T.c.sending_application, T.c.sending_facility, T.c.control_id,
                    T.c.message_type, T.c.trigger_event, T.c.status, T.c.error)


def _summary(row) -> Summary:
    app, facility = row.sending_application or "", row.sending_facility or ""
    return Summary(
        id=row.id, received_at=row.received_at, sender=f"{app}/{facility}" if facility else app,
        control_id=row.control_id, type_event=f"{row.message_type or ''}^{row.trigger_event or ''}".strip("^"),
        status=row.status, error=row.error)


def summary(session: Session, message_id: int) -> Summary | None:
    row = session.execute(select(*_SUMMARY_COLUMNS).where(T.c.id == message_id)).first()
    return _summary(row) if row is not None else None


def list_messages(session: Session, status: str | None = None, limit: int = 50) -> list[Summary]:
    """The most recent stored messages (newest first), optionally of one status."""
    q = select(*_SUMMARY_COLUMNS).order_by(T.c.id.desc()).limit(limit)
    if status:
        q = q.where(T.c.status == status)
    return [_summary(r) for r in session.execute(q)]
