"""The audit trail for the people who answer for it (audit_roles: admin, privacy officer), through any door.

Reading the trail is itself audited. Records name patients by row id inside the store; the views carry the
patient's public id, so a door never shows a row id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, cast, func, or_, select
from sqlalchemy.orm import Session

from gateway.core import access_audit
from gateway.core.context import Gateway
from gateway.core.criteria import one_of
from gateway.core.identity import Subject
from gateway.core.photo_search import TimeRange, utc
from gateway.core.policy.rules import AccessContext, resolve
from gateway.core.refusals import Kind, Refused
from store import audit
from store.models import AuditEvent, Patient


@dataclass(frozen=True)
class AuditCriteria:
    patient_public_ids: Sequence[str] | None = None
    agents: Sequence[str] | None = None
    recorded: Sequence[TimeRange] = ()
    entity_ids: Sequence[str] | None = None
    type_codes: Sequence[str] | None = None
    subtypes: Sequence[str] | None = None
    outcomes: Sequence[str] | None = None
    seq: int | None = None


@dataclass(frozen=True)
class AuditView:
    event: AuditEvent  # detached
    patient: str | None  # the public id of the patient the record is about
    entity_patients: dict[int, str]  # row id -> public id, for patient entities


def reader(gw: Gateway, subject: Subject, what: str) -> AccessContext:
    """Only audit roles read the trail; a refusal is audited like any other."""
    ctx = resolve(subject, gw.settings.policy)
    if subject.role not in gw.settings.policy.audit_roles:
        raise access_audit.refuse(gw, ctx, what, Refused(
            Kind.FORBIDDEN, f"only roles {', '.join(gw.settings.policy.audit_roles) or 'none'} may read the audit trail"))
    return ctx


def _where(session: Session, c: AuditCriteria) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if c.seq is not None:
        where.append(AuditEvent.seq == c.seq)
    if c.patient_public_ids is not None:
        ids = session.scalars(select(Patient.id).where(Patient.public_id.in_(sorted(set(c.patient_public_ids)))))
        where.append(AuditEvent.patient_id.in_(sorted(ids)))
    where += one_of([(AuditEvent.agent_who, c.agents), (AuditEvent.type_code, c.type_codes), (AuditEvent.subtype, c.subtypes),
                     (AuditEvent.outcome, c.outcomes)])
    for r in c.recorded:
        if r.lower is not None:
            where.append(AuditEvent.recorded_at >= utc(r.lower) if not r.outside else AuditEvent.recorded_at < utc(r.lower))
        if r.upper is not None:
            where.append(AuditEvent.recorded_at < utc(r.upper) if not r.outside else AuditEvent.recorded_at >= utc(r.upper))
    if c.entity_ids:
        # entities are stored as JSON text the same way on both backends (SQLAlchemy's json.dumps): an id is
        # found as its "id": "..." member (autoescape: a caller's id is never a pattern)
        where.append(or_(*(cast(AuditEvent.entities, String).contains(f'"id": "{e}"', autoescape=True) for e in c.entity_ids)))
    return where


def search(gw: Gateway, ctx: AccessContext, criteria: AuditCriteria, *, count: int, before_seq: int | None,
           query: str) -> tuple[int, list[AuditView]]:
    """Records matching every criterion, newest first, `count` after the keyset `before_seq`; the total of all."""
    with gw.db.read() as session:
        where = _where(session, criteria)
        total = session.scalar(select(func.count()).select_from(AuditEvent).where(*where)) or 0
        page = select(AuditEvent).where(*where)
        if before_seq is not None:
            page = page.where(AuditEvent.seq < before_seq)
        rows = list(session.scalars(page.order_by(AuditEvent.seq.desc()).limit(count)))
        views = _views(session, rows)
        session.expunge_all()
    access_audit.write(gw, [access_audit.make_entry(ctx, type_code=audit.QUERY,
                                                    action="E", subtype="audit-search",
                                                    entities=[{"type": "query", "id": query}])])
    return total, views


def _views(session: Session, rows: list[AuditEvent]) -> list[AuditView]:
    ids: set[int] = {r.patient_id for r in rows if r.patient_id is not None}
    for r in rows:
        for e in r.entities or []:
            if isinstance(e, dict) and e.get("type") == "patient" and isinstance(e.get("id"), int):
                ids.add(e["id"])
    public: dict[int, str] = {}
    if ids:
        public = {pid: str(pub) for pid, pub in session.execute(select(Patient.id, Patient.public_id).where(Patient.id.in_(sorted(ids))))}
    return [AuditView(r, public.get(r.patient_id) if r.patient_id is not None else None, public) for r in rows]


def recorded_at(view: AuditView) -> datetime:
    return view.event.recorded_at


def detail_of(view: AuditView) -> dict[str, Any]:
    return dict(view.event.detail or {})
