"""Append-only, hash-chained audit trail.

Each record's hash is a keyed SHA-256 (HMAC-SHA256) of its canonical content
plus the previous record's hash, so editing, deleting, inserting or reordering
records breaks the chain at the first touched sequence number. The key lives
outside the database (a file in DATA_DIR by default), so someone who can write
to the database cannot recompute the chain after changing it; the head row
(last seq and hash, also keyed) catches records cut off the end. Records are
appended inside the caller's write transaction: the audit record commits with
the change it records or not at all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pathlib import Path

from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from store.models import AuditEvent, AuditHead

GENESIS_HASH = "0" * 64
_HEAD_ID = 1


class AuditKeyMissing(RuntimeError):
    pass


def load_or_create_key(path: Path) -> bytes:
    """The audit key from its file, made (random, mode 0600) on first use. Back it up with the database."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
    text_key = path.read_text().strip()
    if len(text_key) < 32:
        raise AuditKeyMissing(f"audit key file {path} is too short")
    return text_key.encode()


def _key(session: Session) -> bytes:
    key = session.info.get("audit_key")
    if not key:
        raise AuditKeyMissing("no audit key on this session: open the Database with audit_key=...")
    return key

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


def _hash_fields(fields: dict, prev_hash: str, key: bytes) -> str:
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
    return hmac.new(key, canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def record_hash(row: AuditEvent, prev_hash: str, key: bytes) -> str:
    """The hash a stored record must carry, given the previous record's hash."""
    return _hash_fields({name: getattr(row, name) for name in _HASHED_FIELDS}, prev_hash, key)


def _head_mac(key: bytes, seq: int, last_hash: str) -> str:
    return hmac.new(key, f"head:{seq}:{last_hash}".encode(), hashlib.sha256).hexdigest()


def _locked_head(session: Session) -> tuple[int, str]:
    """(seq, hash) of the chain's end, with the head row locked until commit so appenders queue.

    PostgreSQL: FOR UPDATE on the head row. SQLite: the write transaction began IMMEDIATE
    and already holds the database's write lock."""
    query = select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == _HEAD_ID).with_for_update()
    head = session.execute(query).first()
    if head is None:
        dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(
            dialect_insert(AuditHead).values(id=_HEAD_ID, seq=0, hash=GENESIS_HASH, mac="").on_conflict_do_nothing()
        )
        head = session.execute(query).first()
    return head.seq, head.hash


def append_many(session: Session, entries: Iterable[AuditEntry]) -> list[int]:
    """Append records to the chain in the caller's transaction; returns their sequence numbers.

    A Core insert rather than ORM objects: this runs on every HL7 message and
    every access, and the ORM unit of work tripled its cost."""
    entries = list(entries)
    if not entries:
        return []
    key = _key(session)
    seq, prev = _locked_head(session)
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
        row["hash"] = prev = _hash_fields(row, prev, key)
        rows.append(row)
    session.execute(insert(AuditEvent.__table__), rows)
    session.execute(update(AuditHead).where(AuditHead.id == _HEAD_ID).values(seq=seq, hash=prev, mac=_head_mac(key, seq, prev)))
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
    """Walk the whole chain in order, then check the head; report the first record that does not fit."""
    key = _key(session)
    expected_seq, prev = 1, GENESIS_HASH
    checked = 0
    stream = session.execute(select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=batch)).scalars()
    for row in stream:
        if row.seq != expected_seq:
            return VerifyReport(False, checked, expected_seq, f"sequence {expected_seq} missing (next is {row.seq})")
        if row.prev_hash != prev:
            return VerifyReport(False, checked, row.seq, "previous-hash link broken (record deleted, inserted or reordered)")
        if record_hash(row, prev, key) != row.hash:
            return VerifyReport(False, checked, row.seq, "content does not match its keyed hash (record edited, or a different audit key)")
        prev = row.hash
        expected_seq += 1
        checked += 1
    last_seq = expected_seq - 1
    head = session.execute(select(AuditHead).where(AuditHead.id == _HEAD_ID)).scalar_one_or_none()
    if head is None:
        if last_seq == 0:
            return VerifyReport(True, 0)
        return VerifyReport(False, checked, last_seq, "chain head missing")
    if head.seq == 0 and last_seq == 0 and head.hash == GENESIS_HASH:
        return VerifyReport(True, 0)
    if not hmac.compare_digest(head.mac, _head_mac(key, head.seq, head.hash)):
        return VerifyReport(False, checked, head.seq, "chain head does not match its keyed hash (head edited)")
    if head.seq > last_seq:
        return VerifyReport(False, checked, last_seq + 1, f"records {last_seq + 1}..{head.seq} cut off the end of the chain")
    if head.seq < last_seq or head.hash != prev:
        return VerifyReport(False, checked, head.seq + 1, "records after the chain head were added without the audit key")
    return VerifyReport(True, checked)
