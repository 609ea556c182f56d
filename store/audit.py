"""Append-only, hash-chained audit trail.

Each record's hash is the SHA-256 of its canonical content plus the previous
record's hash, so editing, deleting, inserting or reordering records breaks the
chain at the first touched sequence number. Records are appended inside the
caller's write transaction: the audit record commits with the change it records
or not at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from store.models import AuditEvent

GENESIS_HASH = "0" * 64
# pg_advisory_xact_lock key: serialises appenders so the chain never forks
_PG_CHAIN_LOCK = 0x636C696E70686F74  # "clinphot"

# AuditEvent.type codes (DICOM PS3.15 / DCM code system) and FHIR rest
APPLICATION_ACTIVITY = "110100"
INSTANCES_ACCESSED = "110103"
INSTANCES_TRANSFERRED = "110104"
EXPORT = "110106"
IMPORT = "110107"
LOGIN = "110114"
PATIENT_RECORD = "110110"
QUERY = "110112"
SECURITY_ALERT = "110113"
EMERGENCY_OVERRIDE = "110127"
REST = "rest"

# AuditEvent.outcome
SUCCESS = "0"
MINOR_FAILURE = "4"
SERIOUS_FAILURE = "8"
MAJOR_FAILURE = "12"


@dataclass
class AuditEntry:
    type_code: str
    action: str  # C R U D E
    outcome: str = SUCCESS
    subtype: str | None = None
    outcome_desc: str | None = None
    agent_who: str | None = None
    agent_role: str | None = None
    agent_network: str | None = None
    purpose_of_use: str | None = None
    patient_id: int | None = None
    entities: list[dict] = field(default_factory=list)
    detail: dict = field(default_factory=dict)
    recorded_at: datetime | None = None


def _utc_text(moment: datetime) -> str:
    # SQLite hands back naive datetimes; every time we store is UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_HASHED_FIELDS = (
    "seq", "recorded_at", "type_code", "subtype", "action", "outcome", "outcome_desc", "agent_who", "agent_role",
    "agent_network", "purpose_of_use", "patient_id", "entities", "detail",
)


def _hash_fields(fields: dict, prev_hash: str) -> str:
    content = {
        "seq": fields["seq"],
        "recorded_at": _utc_text(fields["recorded_at"]),
        "type": fields["type_code"],
        "subtype": fields["subtype"],
        "action": fields["action"],
        "outcome": fields["outcome"],
        "outcome_desc": fields["outcome_desc"],
        "agent_who": fields["agent_who"],
        "agent_role": fields["agent_role"],
        "agent_network": fields["agent_network"],
        "purpose_of_use": fields["purpose_of_use"],
        "patient_id": fields["patient_id"],
        "entities": fields["entities"] or [],
        "detail": fields["detail"] or {},
        "prev": prev_hash,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record_hash(row: AuditEvent, prev_hash: str) -> str:
    """The hash a stored record must carry, given the previous record's hash."""
    return _hash_fields({name: getattr(row, name) for name in _HASHED_FIELDS}, prev_hash)


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CHAIN_LOCK})
    # SQLite: the caller's write transaction began IMMEDIATE and already holds the write lock.


def _chain_head(session: Session) -> tuple[int, str]:
    last = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return (last.seq, last.hash) if last else (0, GENESIS_HASH)


def append_many(session: Session, entries: Iterable[AuditEntry]) -> list[int]:
    """Append records to the chain in the caller's transaction; returns their sequence numbers.

    A Core insert rather than ORM objects: this runs on every HL7 message and
    every access, and the ORM unit of work tripled its cost."""
    entries = list(entries)
    if not entries:
        return []
    _lock_chain(session)
    seq, prev = _chain_head(session)
    now = datetime.now(timezone.utc)
    rows = []
    for entry in entries:
        seq += 1
        row = {
            "seq": seq,
            "recorded_at": entry.recorded_at or now,
            "type_code": entry.type_code,
            "subtype": entry.subtype,
            "action": entry.action,
            "outcome": entry.outcome,
            "outcome_desc": entry.outcome_desc,
            "agent_who": entry.agent_who,
            "agent_role": entry.agent_role,
            "agent_network": entry.agent_network,
            "purpose_of_use": entry.purpose_of_use,
            "patient_id": entry.patient_id,
            "entities": list(entry.entities),
            "detail": dict(entry.detail),
            "prev_hash": prev,
        }
        row["hash"] = prev = _hash_fields(row, prev)
        rows.append(row)
    session.execute(insert(AuditEvent.__table__), rows)
    return [row["seq"] for row in rows]


def append(session: Session, entry: AuditEntry) -> int:
    return append_many(session, [entry])[0]


@dataclass
class VerifyReport:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None


def verify(session: Session, batch: int = 5000) -> VerifyReport:
    """Walk the whole chain in order; report the first record that does not fit."""
    expected_seq, prev = 1, GENESIS_HASH
    checked = 0
    stream = session.execute(select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=batch)).scalars()
    for row in stream:
        if row.seq != expected_seq:
            return VerifyReport(False, checked, expected_seq, f"sequence {expected_seq} missing (next is {row.seq})")
        if row.prev_hash != prev:
            return VerifyReport(False, checked, row.seq, "previous-hash link broken (record deleted, inserted or reordered)")
        if record_hash(row, prev) != row.hash:
            return VerifyReport(False, checked, row.seq, "content does not match its hash (record edited)")
        prev = row.hash
        expected_seq += 1
        checked += 1
    return VerifyReport(True, checked)
