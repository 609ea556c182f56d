"""The console's JSON: camelCase, times UTC ISO 8601 with Z, patients by their public id (never a row id)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from gateway.console.tools import Bench, MappingCheck
from gateway.core.audit_views import AuditView
from gateway.core.operations import Counters, MessagePage, MessageRow, StoredMessage
from gateway.core.policy.settings import DicomPeer
from gateway.core.routing import RoutingSettings
from gateway.http.session import BrowserSession
from mapping.message import Hl7Error, parse
from store.audit import VerifyReport
from store.audit_read import OUTCOME_NAMES, TYPE_NAMES
from store.models import OutboxItem


def when(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def text(raw: bytes | None) -> str | None:
    """A message as a person reads it: one segment a line (HL7 separates them with CR)."""
    if raw is None:
        return None
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n").strip("\n\x0b\x1c")


def ack_code(ack: bytes | None) -> str | None:
    """MSA-1 of a stored ACK (AA, AE, AR, or CA/CE/CR in enhanced mode)."""
    if not ack:
        return None
    try:
        msa = parse(ack).segment("MSA")
    except (Hl7Error, ValueError):
        return None
    return msa.get(1) if msa is not None else None


def session(s: BrowserSession, csrf: str) -> dict[str, Any]:
    return {"sub": s.sub, "role": s.role, "name": s.name, "csrf": csrf,
            "expires": datetime.fromtimestamp(s.expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def message_row(r: MessageRow) -> dict[str, Any]:
    return {"id": r.id, "receivedAt": when(r.received_at), "sender": r.sender, "controlId": r.control_id,
            "type": f"{r.message_type}^{r.event}".strip("^"), "status": r.status, "ack": ack_code(r.ack), "error": r.error}


def message_page(page: MessagePage) -> dict[str, Any]:
    return {"items": [message_row(r) for r in page.rows], "nextBefore": page.next_before}


def stored_message(m: StoredMessage) -> dict[str, Any]:
    return {**message_row(m.row), "raw": text(m.raw), "ackText": text(m.row.ack), "peer": m.peer,
            "eventTime": when(m.event_time), "patient": m.patient, "duplicateOf": m.duplicate_of}


def bench(b: Bench) -> dict[str, Any]:
    return {"report": b.report, "ack": b.ack.replace("\r", "\n").strip() if b.ack else None, "ok": b.ok}


def mapping(m: MappingCheck) -> dict[str, Any]:
    return {"path": m.path, "default": m.default, "name": m.name, "valid": m.valid, "problems": m.problems,
            "summary": m.summary, "sha256": m.sha256, "text": m.text}


def peers(found: Sequence[DicomPeer], routing: RoutingSettings) -> dict[str, Any]:
    routes: dict[str, list[dict[str, Any]]] = {}
    for r in routing.routes:
        routes.setdefault(r.destination, []).append({"specialties": r.specialties, "sensitivities": r.sensitivities,
                                                     "storageCommitment": r.storage_commitment})
    return {"peers": [{"aeTitle": p.ae_title, "name": p.name, "hosts": p.hosts, "port": p.port, "purposeOfUse": p.purpose_of_use,
                       "sensitivities": p.sensitivities, "specialties": p.specialties, "allow": p.allow,
                       "routes": routes.get(p.ae_title, [])} for p in found],
            "maxAttempts": routing.max_attempts}


def outbox_item(i: OutboxItem) -> dict[str, Any]:
    return {"id": i.id, "photo": i.asset_id, "destination": i.destination, "status": i.status, "attempts": i.attempts,
            "nextAttemptAt": when(i.next_attempt_at), "lastError": i.last_error, "deliveredAt": when(i.delivered_at),
            "committedAt": when(i.committed_at), "createdAt": when(i.created_at), "updatedAt": when(i.updated_at)}


def _entity(e: Any, patients: dict[int, str]) -> Any:
    if isinstance(e, dict) and e.get("type") == "patient" and isinstance(e.get("id"), int):
        return {**e, "id": patients.get(e["id"], "?")}
    return e


def audit_page(total: int, views: Sequence[AuditView], count: int) -> dict[str, Any]:
    items = [{
        "seq": v.event.seq, "recordedAt": when(v.event.recorded_at), "type": v.event.type_code,
        "typeName": TYPE_NAMES.get(v.event.type_code, v.event.type_code), "subtype": v.event.subtype, "action": v.event.action,
        "outcome": v.event.outcome, "outcomeName": OUTCOME_NAMES.get(v.event.outcome, v.event.outcome),
        "outcomeDescription": v.event.outcome_desc, "agent": v.event.agent_who, "agentRole": v.event.agent_role,
        "agentNetwork": v.event.agent_network, "purposeOfUse": v.event.purpose_of_use, "patient": v.patient,
        "entities": [_entity(e, v.entity_patients) for e in v.event.entities or []],
    } for v in views]
    return {"total": total, "items": items, "nextBefore": items[-1]["seq"] if len(items) == count else None}


def verify(r: VerifyReport) -> dict[str, Any]:
    return {"ok": r.ok, "checked": r.checked, "firstBadSeq": r.first_bad_seq, "reason": r.reason, "anchoredSeq": r.anchored_seq}


def counters(c: Counters) -> dict[str, Any]:
    return {"since": when(c.since), "minutes": c.minutes, "messages": c.messages, "uploads": c.uploads, "refusals": c.refusals,
            "totals": c.totals, "renditions": c.renditions}
