"""Append-only, hash-chained audit trail, anchored inside and outside the database.

Each record's hash is a keyed SHA-256 (HMAC-SHA256) of its canonical content plus the
previous record's hash, so editing, deleting, inserting or reordering records breaks the
chain at the first touched sequence number. The key lives outside the database (a file in
DATA_DIR by default), so someone who can write to the database cannot recompute the chain.
Records are appended inside the caller's write transaction: the audit record commits with
the change it records or not at all. Three keyed marks guard the chain as a whole:

- genesis record (audit_head row 0), written with the trail's first records: a random
  trail id (the store's audit identity) with its HMAC. Record 1 chains from that id, so
  the trail cannot lose its start, and a trail started again after a wipe has another id.
  (A trail begun before genesis records existed chains from GENESIS_HASH and has none.)
- head (audit_head row 1): the last seq and hash with their HMAC. Catches records cut
  off the end (the head cannot be rewound without the key) and records added after it.
- anchor (store/audit_anchor.py): the trail id, last seq and hash in a keyed file beside
  the audit key, one per database, moved only after a commit. The database can be wiped
  whole (events, head and genesis); the file cannot be reached from it. It catches a wipe
  ("records 1..N missing"), a trail started afresh after a wipe (another genesis id),
  and a trail cut back to an older consistent state (a head row saved earlier, or just the
  genesis): fewer records than anchored, or, once the gateway has appended past the
  anchored seq, another hash there (the anchor only moves along the chain it holds).

An empty trail verifies only when there is no anchor, no head and no genesis: a store that
never started one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from store.audit_anchor import ANCHOR, PENDING, AnchorError, AnchorState, AnchorUpdate, AuditAnchor
from store.models import AuditEvent, AuditHead
from store.statements import PipelineFailed, Statements, statements_of

# what a trail from before genesis records chains from; also the head's "nothing yet" value
GENESIS_HASH = "0" * 64
_GENESIS_ID = 0  # audit_head row of the genesis record
_HEAD_ID = 1


class AuditKeyMissing(RuntimeError):
    pass


def load_or_create_key(path: Path) -> bytes:
    """The audit key from its file, made (random, mode 0600) on first use. Back it up with the database."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole under a name of its own, then linked in: a process starting beside this one either finds no
        # key or the whole key, never the empty file it read when the key was written in place ("too short", CI)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp's mode is 0600
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: its key is the one
                pass
            else:
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        finally:
            os.unlink(tmp)
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


def _genesis_mac(key: bytes, trail: str) -> str:
    return hmac.new(key, f"genesis:{trail}".encode(), hashlib.sha256).hexdigest()


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


def _json_text(value) -> str:
    # what is stored, NUL made visible; its json.loads is what is hashed: exactly what verify() reads back
    return json.dumps(value, default=str).replace("\\u0000", "\\ufffd")


def sqlite_time(moment: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text form (what the ORM and verify() read back), in UTC: for statements
    written by hand that bind datetimes as text."""
    if moment.tzinfo is not None and moment.utcoffset():
        moment = moment.astimezone(timezone.utc)
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} {moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}"


def append_many(session: Session, entries: Iterable[AuditEntry]) -> list[int]:
    """Append records to the chain in the caller's transaction; returns their sequence numbers.

    Plain DB-API statements on the session's own connection (same transaction, store.statements):
    this runs on every HL7 message and every access, and three ORM-executed Core statements cost
    ~0.6 ms a call, about half of an ADT message's whole CPU budget; the cursor costs ~0.05 ms.
    Two round trips at most: the head read (which also carries whatever the caller queued before it
    on a pipelined connection) and the inserts with the new head, which go with the caller's COMMIT
    when the connection is pipelined (store.db.Writer) and on their own otherwise. A pipelined
    writer that committed the head itself reads none: see HEAD below.
    The head row is locked until commit so appenders queue: FOR UPDATE on PostgreSQL; on
    SQLite the write transaction began IMMEDIATE and already holds the database's write lock.
    The new head goes to the anchor file when the transaction commits (store.audit_anchor);
    do not append inside a savepoint rolled back with raw SQL (SQLAlchemy's begin_nested is fine):
    the anchor would be told of records that are gone."""
    entries = list(entries)
    if not entries:
        return []
    key = _key(session)
    anchor: AuditAnchor | None = session.info.get(ANCHOR)
    known = anchor.known if anchor is not None else None
    st = statements_of(session)
    last: AnchorState | None = session.info.get(HEAD) if st.pipelined else None
    if last is not None:
        seqs, update = _append_expected(st, key, entries, known, last)
    else:
        seqs, update = _append_rows(st, key, entries, known)
    if anchor is not None:
        session.info[PENDING] = update  # the anchor hooks take it on commit, drop it on rollback
    if st.pipelined:
        session.info[HEAD_PENDING] = update.state
    return seqs


# A pipelined writer's kept session (store.db.Writer) remembers the head its last committed append left (HEAD).
# Its next append then computes the records from that head without reading it, and sends a guarded head update
# ahead of them (_GUARDED_HEAD) that takes the head's lock, as _LOCK_HEAD does, and aborts the transaction if the
# head, the genesis record or the anchored record is not what this session last saw: AuditHeadMoved, and the
# caller applies its work again on the reading path. A round trip less a group commit: two instead of three
# (one wait for the server and one wake-up of it less a batch). The head's lock is still taken after the batch's
# writes, so locks are ordered as before (taking it with the batch's first reads was tried and dropped: it would
# order it before the governance writers' row locks).
# When other writers are appending too, most guarded attempts would fail and be done twice: after one that
# failed, the next READ_AFTER_MOVE group commits read the head (one in 33 at most is then done twice).
HEAD = "clinphoto_audit_head"
HEAD_PENDING = "clinphoto_audit_head_pending"
HEAD_PAUSE = "clinphoto_audit_head_pause"
READ_AFTER_MOVE = 32


class AuditHeadMoved(PipelineFailed):
    """Someone else appended to the trail since this session's last commit (or the trail was tampered with):
    the transaction is lost; do its work again (the next append reads the head)."""


def transaction_ended(session: Session, committed: bool, moved: bool = False) -> None:
    """A pipelined writer's transaction is over: on commit the head it appended is the one to expect next;
    otherwise nothing is expected (the next append reads the head); `moved`: it failed with AuditHeadMoved."""
    info = session.info
    head = info.pop(HEAD_PENDING, None)
    if moved:
        info[HEAD_PAUSE] = READ_AFTER_MOVE
    if not committed:
        info.pop(HEAD, None)
    elif head is not None:
        pause = info.get(HEAD_PAUSE, 0)
        if pause:
            info[HEAD_PAUSE] = pause - 1
        else:
            info[HEAD] = head


_GUARDED_HEAD = (
    "WITH moved AS (UPDATE audit_head h SET seq = ?, hash = ?, mac = ? WHERE h.id = 1 AND h.seq = ? AND h.hash = ? "
    "AND (SELECT g.hash FROM audit_head g WHERE g.id = 0) IS NOT DISTINCT FROM ? "
    "AND (SELECT e.hash FROM audit_events e WHERE e.seq = ?) IS NOT DISTINCT FROM ? RETURNING 1) "
    "SELECT CAST(CASE WHEN count(*) = 1 THEN '1' ELSE 'audit head moved' END AS integer) FROM moved")


def _append_expected(st: Statements, key: bytes, entries: list[AuditEntry], known: AnchorState | None,
                     last: AnchorState) -> tuple[list[int], AnchorUpdate]:
    """Append after the head this session last committed, guarded (see HEAD)."""
    rows, seqs, seq, prev = _rows(st, key, entries, last.seq, last.hash if last.seq else last.trail)
    # with the anchor the record it holds must be there as anchored (so the update is `intact`); without, no check
    anchored_seq, anchored_hash = (known.seq, known.hash) if known is not None else (-1, None)
    genesis = last.trail if last.trail != GENESIS_HASH else None  # a trail begun before genesis records has none
    st.guard(_GUARDED_HEAD, (seq, prev, _head_mac(key, seq, prev), last.seq, last.hash, genesis, anchored_seq,
                             anchored_hash), AuditHeadMoved)
    st.insert_rows(_INSERT_HEAD, rows)
    return seqs, AnchorUpdate(AnchorState(last.trail, seq, prev), known, known is not None)


# The head, locked (appenders queue on it), with the genesis trail id and the anchored record's
# hash beside it, in one statement: the genesis and the anchor's continuity check cost the hot
# path ~1-2 us on SQLite and no extra round trip on PostgreSQL. Only the head row is locked
# (FOR UPDATE OF h): a second row lock would add a WAL record to every PostgreSQL commit.
_LOCK_HEAD = {
    False: "SELECT h.seq, h.hash, g.hash, (SELECT e.hash FROM audit_events e WHERE e.seq = ?) "
           "FROM audit_head h LEFT JOIN audit_head g ON g.id = 0 WHERE h.id = 1",
    True: "SELECT h.seq, h.hash, g.hash, (SELECT e.hash FROM audit_events e WHERE e.seq = ?) "
          "FROM audit_head h LEFT JOIN audit_head g ON g.id = 0 WHERE h.id = 1 FOR UPDATE OF h",
}
_LOCK_GENESIS = {
    False: "SELECT hash FROM audit_head WHERE id = 0",
    True: "SELECT hash FROM audit_head WHERE id = 0 FOR UPDATE",
}
_INSERT_HEAD = f"INSERT INTO audit_events ({', '.join(_INSERT_COLUMNS)})"


class _Marks(NamedTuple):
    head: tuple[int, str] | None  # (seq, hash); None when the head row is missing
    trail: str | None  # the genesis record's trail id; None when there is none
    anchored_hash: str | None  # the hash the record at the anchored seq has in this transaction's view


def _lock_marks(st: Statements, anchored_seq: int) -> _Marks:
    row = st.now(_LOCK_HEAD[st.pg], (anchored_seq,)).one()
    if row is not None:
        return _Marks((row[0], row[1]), row[2], row[3])
    # no head row (a new store, or the head deleted): the genesis row, if any, queues appenders
    row = st.now(_LOCK_GENESIS[st.pg]).one()
    return _Marks(None, row[0] if row is not None else None, None)


def _start_trail(st: Statements, key: bytes) -> None:
    """The genesis record (a new random trail id) and a head at it. DO NOTHING: a concurrent
    appender that started the trail first wins (PostgreSQL makes us wait for its commit)."""
    trail = secrets.token_hex(32)
    st.run("INSERT INTO audit_head (id, seq, hash, mac) VALUES (?, 0, ?, ?), (?, 0, ?, ?) ON CONFLICT DO NOTHING",
           (_GENESIS_ID, trail, _genesis_mac(key, trail), _HEAD_ID, trail, _head_mac(key, 0, trail)))


def _append_rows(st: Statements, key: bytes, entries: list[AuditEntry],
                 known: AnchorState | None) -> tuple[list[int], AnchorUpdate]:
    anchored_seq = known.seq if known is not None else -1
    marks = _lock_marks(st, anchored_seq)
    if marks.trail is None and (marks.head is None or marks.head == (0, GENESIS_HASH)):
        # no trail yet (or one wiped down to a bare head): start one. After a wipe this is a new
        # trail id, which the anchor of the old trail tells apart.
        _start_trail(st, key)
        marks = _lock_marks(st, anchored_seq)
    head = marks.head
    trail = marks.trail if marks.trail is not None else GENESIS_HASH
    seq, prev = head if head is not None else (0, trail)
    if seq == 0:
        prev = trail  # record 1 chains from the genesis record
    rows, seqs, seq, prev = _rows(st, key, entries, seq, prev)
    st.insert_rows(_INSERT_HEAD, rows)
    if head is not None:
        st.run("UPDATE audit_head SET seq = ?, hash = ?, mac = ? WHERE id = ?", (seq, prev, _head_mac(key, seq, prev), _HEAD_ID))
    else:  # head row deleted under a kept genesis: put it back (the gap shows in verify)
        st.run("INSERT INTO audit_head (id, seq, hash, mac) VALUES (?, ?, ?, ?)", (_HEAD_ID, seq, prev, _head_mac(key, seq, prev)))
    intact = known is not None and marks.anchored_hash == known.hash
    return seqs, AnchorUpdate(AnchorState(trail, seq, prev), known, intact)


def _rows(st: Statements, key: bytes, entries: list[AuditEntry], seq: int,
          prev: str) -> tuple[list[list], list[int], int, str]:
    """The records' insert parameters chained after (seq, prev), their seqs, and the new head."""
    now = datetime.now(timezone.utc)
    rows, seqs = [], []
    for entry in entries:
        seq += 1
        row = {name: _clean_text(getattr(entry, name), limit) for name, limit in _TEXT_LIMITS.items()}
        row.update({
            "seq": seq,
            "recorded_at": entry.recorded_at or now,
            "patient_id": entry.patient_id,
            "prev_hash": prev,
        })
        # the JSON columns are sent as the text that was hashed (loaded), not encoded again by the driver
        entities, detail = _json_text(list(entry.entities)), _json_text(dict(entry.detail))
        row["entities"], row["detail"] = json.loads(entities), json.loads(detail)
        row["hash"] = prev = _hash_fields(row, prev, key)
        values = [row[c] for c in _INSERT_COLUMNS]
        values[12], values[13] = entities, detail
        if not st.pg:
            values[1] = sqlite_time(values[1])
        rows.append(values)
        seqs.append(seq)
    return rows, seqs, seq, prev


def append(session: Session, entry: AuditEntry) -> int:
    return append_many(session, [entry])[0]


@dataclass
class VerifyReport:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    anchored_seq: int | None = None  # how far the anchor file vouches for the trail (None: no anchor)


_AUDIT_TABLES = ("audit_events", "audit_head")


def verify(session: Session, batch: int = 5000) -> VerifyReport:
    """Walk the whole chain in order, then check head, genesis and anchor; report the first thing that does not fit."""
    key = _key(session)
    # the anchor before anything from the database: it only ever trails the database, so what is
    # read after it reaches at least as far
    anchored, anchor_error = _read_anchor(session.info.get(ANCHOR))
    _consistent_snapshot(session)
    missing = [name for name in _AUDIT_TABLES if not inspect(session.connection()).has_table(name)]
    if missing:
        return VerifyReport(False, 0, None, f"table {', '.join(missing)} missing (dropped): the trail cannot be checked")
    if anchor_error is not None:
        return VerifyReport(False, 0, None, anchor_error)
    marks = session.execute(select(AuditHead).where(AuditHead.id.in_((_GENESIS_ID, _HEAD_ID)))).scalars()
    by_id = {row.id: row for row in marks}
    genesis, head = by_id.get(_GENESIS_ID), by_id.get(_HEAD_ID)
    walk = _walk(session, key, genesis, anchored, batch)
    if walk.failure is not None:
        return walk.failure
    return _check_marks(key, walk, genesis, head, anchored)


@dataclass
class _Walk:
    checked: int  # records 1..checked verified
    last_hash: str
    hash_at_anchor: str | None  # the hash of the record at the anchored seq, if reached
    failure: VerifyReport | None = None


def _walk(session: Session, key: bytes, genesis: AuditHead | None, anchored: AnchorState | None, batch: int) -> _Walk:
    anchored_seq = anchored.seq if anchored is not None else None
    prev = genesis.hash if genesis is not None else GENESIS_HASH
    checked, hash_at_anchor = 0, None
    stream = session.execute(select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=batch)).scalars()
    for row in stream:
        expected = checked + 1
        reason = None
        if row.seq != expected:
            reason = f"sequence {expected} missing (next is {row.seq})"
        elif row.prev_hash != prev:
            reason = _link_broken(row.seq, genesis, key)
        elif record_hash(row, prev, key) != row.hash:
            reason = "content does not match its keyed hash (record edited, or a different audit key)"
        if reason is not None:
            return _Walk(checked, prev, hash_at_anchor, VerifyReport(False, checked, expected, reason, anchored_seq))
        if row.seq == anchored_seq:
            hash_at_anchor = row.hash
        prev = row.hash
        checked += 1
    return _Walk(checked, prev, hash_at_anchor)


def _link_broken(seq: int, genesis: AuditHead | None, key: bytes) -> str:
    if seq != 1:
        return "previous-hash link broken (record deleted, inserted or reordered)"
    if genesis is None:
        return "genesis record missing: record 1 chains from a genesis record that is gone"
    if not hmac.compare_digest(genesis.mac, _genesis_mac(key, genesis.hash)):
        return "genesis record does not match its keyed hash (edited), so record 1 does not chain from it"
    return "record 1 does not chain from the genesis record (record replaced)"


def _check_marks(key: bytes, walk: _Walk, genesis: AuditHead | None, head: AuditHead | None,
                 anchored: AnchorState | None) -> VerifyReport:
    """After a sound walk: the chain must end at the head and reach the anchor, and only a store that
    never started a trail may have none."""
    last = walk.checked
    anchored_seq = anchored.seq if anchored is not None else None

    def broken(seq: int | None, reason: str) -> VerifyReport:
        return VerifyReport(False, walk.checked, seq, reason, anchored_seq)

    if last == 0 and anchored is not None:
        return broken(1, f"records 1..{anchored.seq} missing: the trail was wiped (the audit anchor beside the key "
                         f"holds record {anchored.seq})")
    if last == 0 and head is None and genesis is None:
        return VerifyReport(True, 0)  # never started
    if head is None:
        return broken(last + 1, "chain head missing")
    if not hmac.compare_digest(head.mac, _head_mac(key, head.seq, head.hash)):
        return broken(head.seq, "chain head does not match its keyed hash (head edited)")
    if head.seq > last:
        return broken(last + 1, f"records {last + 1}..{head.seq} cut off the end of the chain")
    if head.seq < last or head.hash != walk.last_hash:
        return broken(head.seq + 1, "records after the chain head were added without the audit key")
    if genesis is not None and not hmac.compare_digest(genesis.mac, _genesis_mac(key, genesis.hash)):
        return broken(0, "genesis record does not match its keyed hash (edited)")
    if anchored is None:
        return VerifyReport(True, last)
    if anchored.trail != (genesis.hash if genesis is not None else GENESIS_HASH):
        return broken(1, f"the trail was started afresh: its genesis record is not the anchored one, whose trail "
                         f"reached record {anchored.seq} and was wiped")
    if anchored.seq > last:
        return broken(last + 1, f"records {last + 1}..{anchored.seq} missing: the trail was wiped or cut "
                                f"(the audit anchor beside the key holds record {anchored.seq})")
    if walk.hash_at_anchor != anchored.hash:
        return broken(anchored.seq, f"record {anchored.seq} is not the anchored one: the trail was cut back and "
                                        "appended to again, or replaced")
    return VerifyReport(True, last, anchored_seq=anchored_seq)


def _read_anchor(anchor: AuditAnchor | None) -> tuple[AnchorState | None, str | None]:
    """The anchored state, or why the anchor file cannot be trusted."""
    if anchor is None:
        return None, None
    anchor.flush()  # this process's own commits first
    try:
        return anchor.read(), None
    except AnchorError as exc:
        return None, str(exc)


def _consistent_snapshot(session: Session) -> None:
    """Chain and head read at one moment, so appends during the walk are not taken for tampering.
    SQLite's read transaction is one snapshot already; PostgreSQL needs REPEATABLE READ, which can
    only be chosen before the session's transaction begins (otherwise the caller's level stays)."""
    if not session.in_transaction() and session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
