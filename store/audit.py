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

from psycopg.types.json import Json
from sqlalchemy import select
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


_INSERT_COLUMNS = (
    "seq", "recorded_at", "type_code", "subtype", "action", "outcome", "outcome_desc", "agent_who", "agent_role",
    "agent_network", "purpose_of_use", "patient_id", "entities", "detail", "prev_hash", "hash",
)


# Audit must never fail because a caller's value is odd: texts are cut to their column's
# width and NUL (which PostgreSQL text refuses) is replaced, before hashing.
_TEXT_LIMITS = {
    column.name: getattr(column.type, "length", None)
    for column in AuditEvent.__table__.columns
    if column.name in ("type_code", "subtype", "action", "outcome", "outcome_desc", "agent_who", "agent_role", "agent_network", "purpose_of_use")
}


def _clean_text(value, limit: int | None):
    if value is None:
        return None
    value = str(value).replace("\x00", "\ufffd")
    return value[:limit] if limit else value


def _json_safe(value):
    # round-trip once so what is hashed is exactly what verify() reads back (NUL made visible)
    return json.loads(json.dumps(value, default=str).replace("\\u0000", "\\ufffd"))


def _sqlite_time(moment: datetime) -> str:
    # SQLAlchemy's SQLite DATETIME text form (what the ORM and verify() read back), in UTC
    if moment.tzinfo is not None and moment.utcoffset():
        moment = moment.astimezone(timezone.utc)
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second, moment.microsecond)


def append_many(session: Session, entries: Iterable[AuditEntry]) -> list[int]:
    """Append records to the chain in the caller's transaction; returns their sequence numbers.

    Plain DB-API statements on the session's own connection (same transaction): this runs on
    every HL7 message and every access, and three ORM-executed Core statements cost ~0.6 ms
    a call, about half of an ADT message's whole CPU budget; the cursor costs ~0.05 ms.
    The head row is locked until commit so appenders queue: FOR UPDATE on PostgreSQL; on
    SQLite the write transaction began IMMEDIATE and already holds the database's write lock."""
    entries = list(entries)
    if not entries:
        return []
    key = _key(session)
    conn = session.connection()
    pg = conn.dialect.name == "postgresql"
    cur = conn.connection.dbapi_connection.cursor()
    try:
        return _append_rows(cur, pg, key, entries)
    finally:
        cur.close()


def _append_rows(cur, pg: bool, key: bytes, entries: list[AuditEntry]) -> list[int]:
    mark = "%s" if pg else "?"
    cur.execute(f"SELECT seq, hash FROM audit_head WHERE id = {mark}" + (" FOR UPDATE" if pg else ""), (_HEAD_ID,))
    head = cur.fetchone()
    if head is None:
        cur.execute(f"INSERT INTO audit_head (id, seq, hash, mac) VALUES ({mark}, 0, {mark}, '') ON CONFLICT DO NOTHING",
                    (_HEAD_ID, GENESIS_HASH))
        cur.execute(f"SELECT seq, hash FROM audit_head WHERE id = {mark}" + (" FOR UPDATE" if pg else ""), (_HEAD_ID,))
        head = cur.fetchone()
    seq, prev = head
    now = datetime.now(timezone.utc)
    rows, seqs = [], []
    for entry in entries:
        seq += 1
        row = {name: _clean_text(getattr(entry, name), limit) for name, limit in _TEXT_LIMITS.items()}
        row.update({
            "seq": seq,
            "recorded_at": entry.recorded_at or now,
            "patient_id": entry.patient_id,
            "entities": _json_safe(list(entry.entities)),
            "detail": _json_safe(dict(entry.detail)),
            "prev_hash": prev,
        })
        row["hash"] = prev = _hash_fields(row, prev, key)
        values = [row[c] for c in _INSERT_COLUMNS]
        if pg:
            values[12], values[13] = Json(values[12]), Json(values[13])
        else:
            values[1] = _sqlite_time(values[1])
            values[12], values[13] = json.dumps(values[12], default=str), json.dumps(values[13], default=str)
        rows.append(values)
        seqs.append(seq)
    cur.executemany(f"INSERT INTO audit_events ({', '.join(_INSERT_COLUMNS)}) VALUES ({', '.join([mark] * len(_INSERT_COLUMNS))})",
                    rows)
    cur.execute(f"UPDATE audit_head SET seq = {mark}, hash = {mark}, mac = {mark} WHERE id = {mark}",
                (seq, prev, _head_mac(key, seq, prev), _HEAD_ID))
    return seqs


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
