"""What the people who run the gateway see and do (console_roles: integration engineer, admin), through any door.

Received HL7 messages (their status, ACK and error; a raw message on request), applying a stored message again,
the DICOM peers and the routing outbox, recent audit records and the chain's check, and live counters worked out
by SQL over the stored messages and the audit trail (nothing kept in a process's memory, so every process of the
gateway answers the same). Never a photo: these roles see no clinical image.

Every view and every change is audited (subtypes `console-...`) under the purpose HSYSADMIN; a role outside
console_roles is refused and the refusal audited. What is HL7-specific (re-applying a message with the mapping) is
handed in by the wiring as a callable, so this module stays protocol-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from gateway.core import access_audit, audit_views, routing
from gateway.core.access_audit import Entity
from gateway.core.context import Gateway
from gateway.core.identity import Subject, dicom_peers
from gateway.core.ingest.renditions import DUE, FAILED
from gateway.core.photo_search import utc
from gateway.core.policy.rules import AccessContext, resolve
from gateway.core.policy.settings import DicomPeer
from gateway.core.refusals import Kind, Refused
from store import audit
from store.audit import AuditEntry, VerifyReport
from store.models import Asset, AuditEvent, Hl7Message, OutboxItem, Patient

# HL7 v3 ActReason "health system administration": why an operator looks (no clinical purpose)
HSYSADMIN = "HSYSADMIN"
MESSAGE_STATUSES = ("applied", "ignored", "error", "rejected")
OUTBOX_STATUSES = ("pending", "delivered", "committed", "dead", "cancelled")
MAX_PAGE = 200


def operator(gw: Gateway, subject: Subject, what: str) -> AccessContext:
    """The context every console action runs in; a role outside console_roles is refused (audited)."""
    ctx = replace(resolve(subject, gw.settings.policy), purpose=HSYSADMIN, break_glass_reason=None, breaking_glass=False)
    roles = gw.settings.policy.console_roles
    if subject.role not in roles:
        raise access_audit.refuse(gw, ctx, what, Refused(
            Kind.FORBIDDEN, f"only roles {', '.join(roles) or 'none'} may use the console"))
    return ctx


def entry(ctx: AccessContext, subtype: str, *, what: str, action: str = "R", type_code: str = audit.APPLICATION_ACTIVITY,
          outcome: str = audit.SUCCESS, outcome_desc: str | None = None, patient_id: int | None = None,
          entities: Sequence[Entity] = (), detail: Entity | None = None) -> AuditEntry:
    """One console action as an audit record: the request as an entity, the subtype `console-...`."""
    return access_audit.make_entry(ctx, type_code=type_code, action=action, subtype=f"console-{subtype}", outcome=outcome,
                                   outcome_desc=outcome_desc, patient_id=patient_id,
                                   entities=[{"type": "request", "id": what}, *entities], detail=detail)


def record(gw: Gateway, ctx: AccessContext, subtype: str, *, what: str, **kw: Any) -> None:
    """Audit a console view or action in a transaction of its own, committed before the door answers."""
    access_audit.write(gw, [entry(ctx, subtype, what=what, **kw)])


# -- received HL7 messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageCriteria:
    statuses: Sequence[str] = ()
    message_type: str | None = None  # "ADT" or "ADT^A01"
    received_from: datetime | None = None
    received_before: datetime | None = None
    control_id: str | None = None


@dataclass(frozen=True)
class MessageRow:
    """A stored message as an operator lists it: nothing from its body, so no patient names or numbers."""

    id: int
    received_at: datetime | None
    sender: str
    control_id: str
    message_type: str
    event: str
    status: str
    ack: bytes | None
    error: str | None


@dataclass(frozen=True)
class MessagePage:
    rows: list[MessageRow]
    next_before: int | None  # keyset cursor: the next (older) page starts below this id


@dataclass(frozen=True)
class StoredMessage:
    """One message whole: its raw text holds patient data, so reading it is audited against the patient."""

    row: MessageRow
    raw: bytes
    peer: str | None
    event_time: datetime | None
    patient: str | None  # the patient's public id, when the message was applied to one
    duplicate_of: int | None


T = Hl7Message


def _message_where(c: MessageCriteria) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if c.statuses:
        where.append(T.status.in_(sorted(set(c.statuses))))
    if c.message_type:
        kind, _, event = c.message_type.strip().upper().partition("^")
        where.append(T.message_type == kind)
        if event:
            where.append(T.trigger_event == event)
    if c.received_from is not None:
        where.append(T.received_at >= utc(c.received_from))
    if c.received_before is not None:
        where.append(T.received_at < utc(c.received_before))
    if c.control_id:
        where.append(T.control_id == c.control_id)
    return where


_ROW_COLUMNS = (T.id, T.received_at, T.sending_application, T.sending_facility, T.control_id, T.message_type,
                T.trigger_event, T.status, T.ack, T.error)


def _row(r: Any) -> MessageRow:
    app, facility = r.sending_application or "", r.sending_facility or ""
    return MessageRow(id=r.id, received_at=r.received_at, sender=f"{app}/{facility}" if facility else app,
                      control_id=r.control_id, message_type=r.message_type or "", event=r.trigger_event or "",
                      status=r.status, ack=bytes(r.ack) if r.ack is not None else None, error=r.error)


def messages(gw: Gateway, ctx: AccessContext, criteria: MessageCriteria, *, count: int, before_id: int | None,
             what: str) -> MessagePage:
    """Stored messages matching every criterion, newest first, `count` below the keyset `before_id`."""
    count = max(1, min(count, MAX_PAGE))
    with gw.db.read() as session:
        query = select(*_ROW_COLUMNS).where(*_message_where(criteria))
        if before_id is not None:
            query = query.where(T.id < before_id)
        found = [_row(r) for r in session.execute(query.order_by(T.id.desc()).limit(count + 1))]
    page = found[:count]
    record(gw, ctx, "messages", what=what, action="E", type_code=audit.QUERY, detail={"returned": len(page)})
    return MessagePage(page, page[-1].id if len(found) > count else None)


def message(gw: Gateway, ctx: AccessContext, message_id: int, *, what: str) -> StoredMessage:
    """One stored message with its raw text; audited as a read of the patient's record when it names one."""
    with gw.db.read() as session:
        found = session.execute(select(*_ROW_COLUMNS, T.raw, T.peer, T.event_time, T.patient_id, T.duplicate_of,
                                       Patient.public_id).outerjoin(Patient, Patient.id == T.patient_id)
                                .where(T.id == message_id)).first()
    if found is None:
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.NOT_FOUND, f"no stored HL7 message with id {message_id}"))
    record(gw, ctx, "message", what=what, type_code=audit.PATIENT_RECORD, patient_id=found.patient_id,
           entities=[{"type": "hl7-message", "id": message_id},
                     *([{"type": "patient", "id": found.patient_id}] if found.patient_id else [])])
    return StoredMessage(row=_row(found), raw=bytes(found.raw), peer=found.peer, event_time=found.event_time,
                         patient=str(found.public_id) if found.public_id is not None else None,
                         duplicate_of=found.duplicate_of)


@dataclass(frozen=True)
class Reapplied:
    """What applying a stored message again did, as the door that knows the message's protocol says."""

    status: str
    previous_status: str | None
    ack_code: str
    error: str | None
    patient_id: int | None = None
    audit: Sequence[AuditEntry] = field(default_factory=list)  # the records of the change itself


# applies stored message `id` again inside the session's transaction; LookupError when there is none
Reapply = Callable[[Session, int], Reapplied]


def reprocess(gw: Gateway, ctx: AccessContext, message_id: int, reapply: Reapply, *, what: str) -> Reapplied:
    """Apply a stored message again; the change, its audit records and the operator's action commit together."""
    try:
        with gw.db.write() as session:
            result = reapply(session, message_id)
            access_audit.append(session, [*result.audit, entry(
                ctx, "reprocess", what=what, action="U", patient_id=result.patient_id,
                outcome_desc=f"{result.previous_status} -> {result.status} ({result.ack_code})",
                entities=[{"type": "hl7-message", "id": message_id}])])
    except LookupError as exc:
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.NOT_FOUND, str(exc))) from None
    except Refused as refused:  # e.g. the mapping does not validate: nothing was applied
        raise access_audit.refuse(gw, ctx, what, refused, entities=[{"type": "hl7-message", "id": message_id}]) from None
    return result


# -- live counters ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """Per minute (UTC, "YYYY-MM-DDTHH:MM") over the last `minutes`: messages by status, photos stored, refusals."""

    since: datetime
    minutes: int
    messages: dict[str, dict[str, int]]  # minute -> status -> count
    uploads: dict[str, int]  # minute -> photos stored (audit: import, success)
    refusals: dict[str, int]  # minute -> refusals of any kind (audit: outcome not success)
    totals: dict[str, int]  # every stored message by status
    renditions: dict[str, int]  # photos waiting for their preview ("due") and whose pixels did not decode ("failed")


def _minute(gw: Gateway, column: Any) -> Any:
    """The minute a stored moment falls in, as text, by the database itself."""
    if gw.db.dialect == "postgresql":
        return func.to_char(func.date_trunc("minute", func.timezone("UTC", column)), 'YYYY-MM-DD"T"HH24:MI')
    return func.strftime("%Y-%m-%dT%H:%M", column)


def counters(gw: Gateway, ctx: AccessContext, *, minutes: int, what: str, now: datetime | None = None) -> Counters:
    minutes = max(1, min(minutes, 24 * 60))
    since = (now or datetime.now(timezone.utc)).replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    with gw.db.read() as session:
        per_message = _minute(gw, T.received_at)
        by_status: dict[str, dict[str, int]] = {}
        for minute, status, n in session.execute(
                select(per_message, T.status, func.count()).where(T.received_at >= since).group_by(per_message, T.status)):
            by_status.setdefault(str(minute), {})[str(status)] = int(n)
        per_event = _minute(gw, AuditEvent.recorded_at)
        uploads = {str(m): int(n) for m, n in session.execute(
            select(per_event, func.count()).where(AuditEvent.recorded_at >= since, AuditEvent.type_code == audit.IMPORT,
                                                  AuditEvent.outcome == audit.SUCCESS).group_by(per_event))}
        refusals = {str(m): int(n) for m, n in session.execute(
            select(per_event, func.count()).where(AuditEvent.recorded_at >= since, AuditEvent.outcome != audit.SUCCESS)
            .group_by(per_event))}
        totals = {str(s): int(n) for s, n in session.execute(select(T.status, func.count()).group_by(T.status))}
        renditions = {DUE: 0, FAILED: 0} | {str(s): int(n) for s, n in session.execute(
            select(Asset.rendition_state, func.count()).where(Asset.rendition_state.is_not(None))
            .group_by(Asset.rendition_state))}
    record(gw, ctx, "counters", what=what, action="E", type_code=audit.QUERY)
    return Counters(since, minutes, by_status, uploads, refusals, totals, renditions)


# -- DICOM peers and the routing outbox ---------------------------------------------------------------------


def peers(gw: Gateway, ctx: AccessContext, *, what: str) -> list[DicomPeer]:
    record(gw, ctx, "dicom-peers", what=what)
    return dicom_peers(gw.settings)


def outbox(gw: Gateway, ctx: AccessContext, status: str | None, *, count: int, what: str) -> list[OutboxItem]:
    """Routing outbox items, newest first: photos are named by their opaque id only (no image, no patient)."""
    rows = routing.items(gw, status, max(1, min(count, MAX_PAGE)))
    record(gw, ctx, "outbox", what=what, action="E", type_code=audit.QUERY, detail={"returned": len(rows)})
    return rows


def outbox_change(gw: Gateway, ctx: AccessContext, item_id: int, change: str, *, what: str) -> None:
    """Retry (a dead or cancelled item, due now) or cancel (a pending or dead one); a refusal says why."""
    act = {"retry": routing.retry, "cancel": routing.cancel}[change]
    if not act(gw, item_id):
        status = routing.status(gw, item_id)
        refusal = (Refused(Kind.NOT_FOUND, f"no outbox item {item_id}") if status is None else
                   Refused(Kind.CONFLICT, f"outbox item {item_id} is {status}: only "
                           + ("dead or cancelled items are retried" if change == "retry" else "pending or dead items are cancelled")))
        raise access_audit.refuse(gw, ctx, what, refusal, entities=[{"type": "outbox-item", "id": item_id}])
    record(gw, ctx, f"outbox-{change}", what=what, action="U", entities=[{"type": "outbox-item", "id": item_id}])


# -- the audit trail ----------------------------------------------------------------------------------------


def recent_audit(gw: Gateway, ctx: AccessContext, *, count: int, before_seq: int | None,
                 what: str) -> tuple[int, list[audit_views.AuditView]]:
    """The newest audit records (the search is itself audited, as every reading of the trail is)."""
    return audit_views.search(gw, ctx, audit_views.AuditCriteria(), count=max(1, min(count, MAX_PAGE)),
                              before_seq=before_seq, query=what)


def verify_audit(gw: Gateway, ctx: AccessContext, *, what: str) -> VerifyReport:
    """`clinphoto audit verify` for the console: the whole chain, its genesis, head and anchor."""
    with gw.db.read() as session:
        report = audit.verify(session)
    record(gw, ctx, "audit-verify", what=what, action="E", outcome=audit.SUCCESS if report.ok else audit.SERIOUS_FAILURE,
           outcome_desc=None if report.ok else f"audit trail broken at {report.first_bad_seq}: {report.reason}",
           detail={"checked": report.checked})
    return report

