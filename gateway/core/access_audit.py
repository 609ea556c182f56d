"""Access audit: every read, search, retrieve, upload, export and denial goes into the hash-chained trail.

The doors call these helpers; they build store.audit entries the same way for
every protocol (IHE BALP shapes); stored photos are recorded by the ingest
pipeline itself (gateway/core/ingest/pipeline.py), in the transaction that stores them:
- a search is action E with the query as an entity and one record per patient
  returned (one record without a patient when nothing was found);
- a read/retrieve is action R with the photo as an entity;
- a denial is recorded with outcome 4 and the reasons, but the caller is only
  told "not found";
- a break-glass access adds a Security Alert (110113) and an Emergency
  Override Started (110127) record carrying the reason.

The source is the caller's IP address, or "AE@address" for DICOM peers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import String
from sqlalchemy.orm import Session

from gateway.core.refusals import Refused
from store import audit
from store.audit import AuditEntry
from store.db import WriterBusy
from store.models import AuditEvent

if TYPE_CHECKING:  # the ingest pipeline records its refusals here: no run-time import back into the core's upper parts
    from gateway.core.context import Gateway
    from gateway.core.identity import Subject
    from gateway.core.policy.rules import AccessContext

log = logging.getLogger("clinphoto.audit")

DENIED = audit.MINOR_FAILURE
Entity = dict[str, Any]  # an audit record's entity or detail: JSON

# widths of the audit table's short text columns: a caller-supplied value (purpose header, token sub)
# longer than its column must be cut to fit, or PostgreSQL refuses the insert and the denial goes unrecorded
_WIDTHS = {
    column.name: column.type.length
    for column in AuditEvent.__table__.columns
    if isinstance(column.type, String) and column.type.length and column.name in AuditEntry.__dataclass_fields__
}
_TEXT_FIELDS = tuple(_WIDTHS) + ("outcome_desc",)


def _clean(value: Any) -> Any:
    """NUL cannot be stored in PostgreSQL text (nor inside its JSON): replace it, recursively."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def fit(entry: AuditEntry) -> AuditEntry:
    """The entry with every text value storable in its column: NUL replaced, over-long values cut (marked with an ellipsis)."""
    changes = {}
    for name in _TEXT_FIELDS:
        value = getattr(entry, name)
        if not isinstance(value, str):
            continue
        clean = _clean(value)
        width = _WIDTHS.get(name)
        if width and len(clean) > width:
            clean = clean[: width - 1] + "\u2026"
        if clean != value:
            changes[name] = clean
    entities, detail = _clean(list(entry.entities)), _clean(dict(entry.detail))
    if entities != entry.entities:
        changes["entities"] = entities
    if detail != entry.detail:
        changes["detail"] = detail
    return replace(entry, **changes) if changes else entry


def source_of(subject: Subject | None) -> str | None:
    ae = subject.peer.ae_title if subject is not None and subject.peer is not None else None
    address = getattr(subject, "network_address", None)
    if ae:
        return f"{ae}@{address}" if address else ae
    return address


def make_entry(ctx: AccessContext, *, type_code: str, action: str, subtype: str | None = None, outcome: str = audit.SUCCESS,
           outcome_desc: str | None = None, patient_id: int | None = None, entities: Sequence[Entity] | None = None,
           detail: Entity | None = None) -> AuditEntry:
    s = ctx.subject
    detail = dict(detail or {})
    if ctx.break_glass_reason:
        detail["break_glass_reason"] = ctx.break_glass_reason
    if getattr(s, "name", None):
        detail.setdefault("agent_name", s.name)
    return AuditEntry(
        type_code=type_code,
        action=action,
        subtype=subtype,
        outcome=outcome,
        outcome_desc=outcome_desc,
        agent_who=s.sub,
        agent_role=s.role,
        agent_network=source_of(s),
        purpose_of_use=ctx.purpose,
        patient_id=patient_id,
        entities=list(entities or []),
        detail=detail,
    )


def break_glass_entries(ctx: AccessContext, what: str, patient_ids: Iterable[int | None] = ()) -> list[AuditEntry]:
    """Security Alert + Emergency Override Started for an access under break-glass."""
    if not ctx.breaking_glass:
        return []
    patients = sorted({p for p in patient_ids if p is not None})
    entities = [{"type": "patient", "id": p} for p in patients] + [{"type": "request", "id": what}]
    desc = f"break-glass by {ctx.subject.sub}: {ctx.break_glass_reason}"
    return [
        make_entry(ctx, type_code=audit.SECURITY_ALERT, action="E", subtype="emergency-override", outcome_desc=desc, entities=entities,
               patient_id=patients[0] if len(patients) == 1 else None),
        make_entry(ctx, type_code=audit.EMERGENCY_OVERRIDE, action="E", subtype="started", outcome_desc=desc, entities=entities,
               patient_id=patients[0] if len(patients) == 1 else None),
    ]


def search_entries(ctx: AccessContext, *, query: str, results: Mapping[int, Sequence[str]], type_code: str = audit.REST,
                   subtype: str = "search", channel: str = "rest") -> list[AuditEntry]:
    """One record per patient in the results (IHE BALP), listing the photos returned of that patient."""
    query_entity: Entity = {"type": "query", "query": query, "channel": channel}
    if not results:
        entries = [make_entry(ctx, type_code=type_code, action="E", subtype=subtype, entities=[query_entity],
                          detail={"returned": 0})]
    else:
        entries = [
            make_entry(
                ctx, type_code=type_code, action="E", subtype=subtype, patient_id=patient_id,
                entities=[query_entity, {"type": "patient", "id": patient_id},
                          *({"type": "asset", "id": a, "role": "returned"} for a in asset_ids)],
                detail={"returned": len(asset_ids)},
            )
            for patient_id, asset_ids in sorted(results.items())
        ]
    return entries + break_glass_entries(ctx, query, results.keys())


def read_entries(ctx: AccessContext, *, asset_id: str, patient_id: int | None, permitted: bool, reasons: Sequence[str] = (),
                 what: str = "read", type_code: str = audit.REST, detail: Entity | None = None,
                 failure: str | None = None, failure_outcome: str = audit.MINOR_FAILURE) -> list[AuditEntry]:
    """A read or retrieve of one photo; a denial keeps its reasons here (the caller only sees 404). `failure`: the
    caller could see the photo but nothing was served (no such rendition, a blob missing), and why."""
    detail = dict(detail or {})
    if not permitted:
        detail["reasons"] = list(reasons)
    entities = [{"type": "asset", "id": asset_id, "role": what}] + ([{"type": "patient", "id": patient_id}] if patient_id else [])
    outcome_desc = failure if permitted else "denied: " + "; ".join([r for r in reasons if "DENIED" in r] or list(reasons))
    entries = [
        make_entry(
            ctx, type_code=type_code, action="R", subtype=what,
            outcome=(failure_outcome if failure else audit.SUCCESS) if permitted else DENIED,
            outcome_desc=outcome_desc,
            patient_id=patient_id,
            entities=entities,
            detail=detail,
        )
    ]
    if permitted:
        return entries + break_glass_entries(ctx, f"{what} {asset_id}", [patient_id])
    if ctx.breaking_glass:
        # a break-glass that still did not open the photo (e.g. V): someone reached for it in an emergency
        entries.append(make_entry(ctx, type_code=audit.SECURITY_ALERT, action="E", subtype="emergency-override-denied",
                                  outcome=DENIED, outcome_desc=f"break-glass by {ctx.subject.sub} denied: {outcome_desc}",
                                  patient_id=patient_id, entities=entities))
    return entries


def transfer_entries(ctx: AccessContext, *, sent: Mapping[int, Sequence[str]], type_code: str,
                     syntaxes: Mapping[str, str]) -> list[AuditEntry]:
    """DICOM objects retrieved (C-GET, C-MOVE, WADO-RS): one Instances Transferred record per patient naming every
    photo of theirs sent, as DICOM's audit message does (PS3.15 A.5.3.2: a participant object per study, listing its
    instances), the photos' transfer syntaxes (`syntaxes`, by photo) in its detail. One record per photo made a
    10-photo C-GET's audit eleven records, ~1 ms of the ~8 ms before its first photo went out (traced).
    `sent`: by patient, the photos sent."""
    entries: list[AuditEntry] = []
    for patient_id, asset_ids in sorted(sent.items()):
        used = sorted({syntaxes[a] for a in asset_ids})
        detail: Entity = {"rendition": "dicom", **({"transfer_syntax": used[0]} if len(used) == 1 else {"transfer_syntaxes": used})}
        if len(asset_ids) > 1:
            detail["count"] = len(asset_ids)
        entries.append(make_entry(ctx, type_code=type_code, action="R", subtype="retrieve", patient_id=patient_id,
                                  entities=[*({"type": "asset", "id": a, "role": "retrieve"} for a in asset_ids),
                                            {"type": "patient", "id": patient_id}],
                                  detail=detail))
    return entries + break_glass_entries(ctx, f"retrieve {', '.join(a for ids in sent.values() for a in ids)}"[:500], sent.keys())


def refusal_entries(ctx: AccessContext, what: str, *, reason: str | None = None, patient_id: int | None = None,
                    entities: Sequence[Entity] = ()) -> list[AuditEntry]:
    """A request refused (bad purpose, break-glass without reason or by a role not allowed, a role or
    scope that may not use the door); reason defaults to the policy's refusal."""
    type_code = audit.SECURITY_ALERT if (ctx.break_glass_reason or ctx.purpose == "ETREAT") else audit.REST
    return [make_entry(ctx, type_code=type_code, action="E", subtype="refused", outcome=DENIED,
                   outcome_desc=reason or ctx.refusal, patient_id=patient_id,
                   entities=[{"type": "request", "id": what}, *entities])]


# -- writing ------------------------------------------------------------------


def append(session: Session, entries: Sequence[AuditEntry]) -> None:
    """Inside the caller's write transaction (commits with the change it records)."""
    audit.append_many(session, [fit(e) for e in entries])


def write(gw: Gateway, entries: Sequence[AuditEntry]) -> None:
    """In a transaction of its own, committed before the caller answers: on the Database's kept audit connection
    when no other thread is using it (store.db.Database.audit_writer), else, or when that fails, in an ordinary
    transaction. A failure there is lost work, never a lost record: what failed rolled back (a commit whose outcome
    the connection could not report may leave the records twice, never none)."""
    if not entries:
        return
    try:
        try:
            with gw.db.audit_writer().transaction(wait=False) as session:
                append(session, entries)
            return
        except audit.AuditHeadMoved:
            # another writer appended since this connection's last commit: again, reading the head this time
            with gw.db.audit_writer().transaction(wait=False) as session:
                append(session, entries)
            return
    except WriterBusy:
        pass
    except Exception:
        log.debug("audit on the kept connection failed; in a transaction of its own", exc_info=True)
    with gw.db.write() as session:
        append(session, entries)


def record_search(gw: Gateway, ctx: AccessContext, *, query: str, results: Mapping[int, Sequence[str]], **kw: Any) -> None:
    write(gw, search_entries(ctx, query=query, results=results, **kw))


def record_read(gw: Gateway, ctx: AccessContext, *, asset_id: str, patient_id: int | None, permitted: bool, reasons: Sequence[str] = (),
                **kw: Any) -> None:
    write(gw, read_entries(ctx, asset_id=asset_id, patient_id=patient_id, permitted=permitted, reasons=reasons, **kw))


def record_refusal(gw: Gateway, ctx: AccessContext, what: str, **kw: Any) -> None:
    write(gw, refusal_entries(ctx, what, **kw))


def refuse(gw: Gateway, ctx: AccessContext, what: str, refusal: Refused, *, patient_id: int | None = None,
           entities: Sequence[Entity] = ()) -> Refused:
    """Audit a refusal with its real reason (a NOT_FOUND's cause stays here), and give it back to raise."""
    record_refusal(gw, ctx, what, reason=refusal.audit_reason, patient_id=patient_id, entities=entities)
    return refusal


def record_auth_failure(gw: Gateway, *, network: str | None, reason: str, what: str) -> None:
    """A bearer token that did not verify (User Authentication, failure): who is unknown, where from is not."""
    write(gw, [AuditEntry(type_code=audit.LOGIN, action="E", subtype="token", outcome=DENIED, outcome_desc=reason,
                          agent_network=network, entities=[{"type": "request", "id": what}])])
