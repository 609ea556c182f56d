"""From raw message bytes to a stored message, an applied change and the ACK to send.

`prepare` is pure (tokenize, check the header, map); `apply` runs inside the
group-commit transaction: duplicate check, the change inside a SAVEPOINT (so one
bad message never spoils its batch), the stored message row, the ACK.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from gateway.core.patients import Actor, Change, Part, PatientIndex, PatientIndexError, Problem, Sql
from gateway.hl7 import message_store
from gateway.hl7.ack import AckError, build_ack, header_fields
from gateway.hl7.adt import HANDLERS, MERGE_EVENTS, MappedAdt
from gateway.hl7.config import Hl7Settings
from mapping.engine import Mapper, MappingFault
from mapping.escape import EscapeError
from mapping.message import Hl7Error, Message, limits_fault, parse
from store.audit import AuditEntry
from store.statements import Pending, PipelineFailed

log = logging.getLogger("clinphoto.hl7")


class RefusedAfterWriting(PipelineFailed):
    """A change refused (or failed in our code) after it queued writes on a pipelined connection, where there is
    no savepoint to undo them: the committer redoes the batch on an ordinary transaction, where there is."""


@dataclass
class Prepared:
    raw: bytes
    peer: str | None
    msg: Message | None = None
    app: str = ""
    facility: str = ""
    control_id: str = ""
    message_type: str = ""
    event: str = ""
    event_time: datetime | None = None
    reject: AckError | None = None  # AR / CR: header, version or type problem
    error: AckError | None = None  # AE / CE: understood, cannot be applied
    ignore: bool = False  # a type we do not handle, accepted without change
    mapped: MappedAdt | None = None
    header_refused: bool = False  # MSH-3/4/10 unusable as the duplicate key: stored under a key of its own


@dataclass
class Begun:
    """A message whose reads were asked for (Processor.begin), waiting to be finished."""

    prepared: Prepared
    control_id: str  # the key it is stored under
    lookup: Pending | None  # the duplicate look-up
    seen: int  # the transaction's changes before its reads were asked for (gateway.core.patients.Change)
    index: PatientIndex | None


@dataclass
class Result:
    ack: bytes | None  # None: the sender asked for no accept ACK (enhanced mode NE/ER/SU)
    status: str
    message_id: int | None = None
    patient_id: int | None = None
    duplicate: bool = False
    audit: list[AuditEntry] = field(default_factory=list)
    code: str = "AA"
    error: str | None = None  # the stored error text (or note)
    previous_status: str | None = None  # reprocessing: the status before


class Processor:
    def __init__(self, settings: Hl7Settings, mapper: Mapper) -> None:
        self.settings = settings
        self.mapper = mapper

    # -- outside the transaction ------------------------------------------------------

    def prepare(self, raw: bytes, peer: str | None = None) -> Prepared:
        p = Prepared(raw=raw, peer=peer)
        try:
            msg = parse(raw, self.settings.default_charset)
        except Hl7Error as exc:
            echoed = header_fields(None, raw)
            p.app, p.facility = echoed["MSH-3"], echoed["MSH-4"]
            p.reject = AckError(exc.code, exc.text, exc.location)
            return p
        p.msg = msg
        h = msg.msh
        p.app, p.facility, p.control_id = h.raw(3), h.raw(4), h.get(10).strip()
        p.message_type = msg.message_type.strip()
        # EVN-1 undecoded: a bad escape there is msg.fault's to answer, not an exception here
        evn = msg.segment("EVN")
        p.event = (msg.trigger_event or (evn.get(1, decode=False) if evn is not None else "")).strip()
        try:
            p.event_time = self.mapper.event_time(msg)
        except (MappingFault, EscapeError):
            p.event_time = None
        p.reject = header_fault(msg, p)
        if p.reject:
            return p
        if not p.control_id:
            p.reject = AckError("101", "MSH-10 message control id is empty", "MSH-10")
        elif not p.message_type:
            p.reject = AckError("101", "MSH-9 message type is empty", "MSH-9")
        elif msg.version not in self.settings.supported_versions:
            p.reject = AckError("203", f"HL7 version {msg.version!r} in MSH-12 is not supported", "MSH-12")
        if p.reject:
            return p
        too_big = limits_fault(msg, self.settings.max_segments, self.settings.max_repetitions)
        if too_big is not None:
            p.error = AckError(too_big.code, too_big.text, too_big.location)
            return p
        handler_known = p.message_type == "ADT" and p.event in HANDLERS
        if not handler_known:
            action = (self.settings.type_actions.get(f"{p.message_type}^{p.event}")
                      or self.settings.type_actions.get(p.message_type) or self.settings.unknown_action)
            if action == "reject":
                code, where = ("201", "MSH-9.2") if p.message_type == "ADT" else ("200", "MSH-9.1")
                p.reject = AckError(code, f"message type {p.message_type}^{p.event} is not accepted here", where)
            else:
                p.ignore = True
            return p
        if msg.fault is not None:
            p.error = AckError(msg.fault.code, msg.fault.text, msg.fault.location)
            return p
        if self.settings.strict_validation:
            fault = strict_check(msg)
            if fault:
                p.error = fault
                return p
        try:
            patients = self.mapper.patients(msg)
            if p.event in MERGE_EVENTS and not msg.segment("MRG"):
                raise MappingFault("100", f"{p.event} needs an MRG segment after the PID", "MRG")
            encounter = self.mapper.encounter(msg) if p.event not in MERGE_EVENTS else None
            if p.event_time is None and (msg.get("EVN-2") or msg.get("MSH-7")):
                self.mapper.event_time(msg)  # raises the date error with its location
            p.mapped = MappedAdt(p.event, patients, encounter, p.event_time)
        except MappingFault as exc:
            p.error = AckError(exc.code, exc.text, exc.location)
        return p

    # -- inside the group-commit transaction ----------------------------------------------

    def apply(self, session: Session, p: Prepared) -> Result:
        """Store (and apply) one message."""
        return self.finish(session, self.begin(session, p))

    def begin(self, session: Session, p: Prepared) -> Begun:
        """Ask for what the message will read (the duplicate look-up, the patient index's rows); nothing waits.
        The group commit begins a whole batch before finishing any, so the batch's reads share one round trip
        (store.statements); what a message finished before writes is dropped from the later ones' reads."""
        control_id = p.control_id
        lookup = None
        if p.header_refused:
            # its header values cannot be keys (control characters, too long): never a duplicate match,
            # and a key of its own so the insert cannot collide; the raw bytes keep what was sent
            control_id = f"refused-{uuid.uuid4().hex}"
        elif p.msg is not None and control_id:
            lookup = message_store.duplicate_lookup(session, p.app, p.facility, control_id)
        else:
            control_id = f"unparsed-{uuid.uuid4().hex}"
        return Begun(p, control_id, lookup, len(Sql.of(session).changes), self._index(session, p))

    def finish(self, session: Session, begun: Begun) -> Result:
        """Apply and store a begun message; its writes go with the next round trip."""
        p, control_id, index = begun.prepared, begun.control_id, begun.index
        sql = Sql.of(session)
        if begun.lookup is not None:
            key = (p.app, p.facility, control_id)
            stored_since = any(key in change.messages for change in sql.changes[begun.seen:])
            # asked before a message of this batch was stored under the same key: ask again
            dup = (message_store.find_duplicate(session, *key) if stored_since
                   else message_store.duplicate_found(begun.lookup))
            if dup is not None:
                if same_content(dup.raw, p.raw):
                    log.info("duplicate message %s from %s: original ACK returned", control_id, p.app)
                    return Result(ack=dup.ack, status=dup.status, message_id=dup.id, duplicate=True)
                return self._refuse_reused_key(session, p, dup.id)
        status, code, errors, text, patient_id, audit = self._outcome(session, p, index)
        ack = self._ack(p, code, errors, text)
        error_text = describe(errors, text)
        mid = message_store.insert(
            session, raw=p.raw, app=p.app, facility=p.facility, control_id=control_id, message_type=p.message_type,
            trigger_event=p.event, event_time=p.event_time, peer=p.peer, status=status, ack=ack, error=error_text,
            patient_id=patient_id)
        sql.changes.append(Change(messages=frozenset({(p.app, p.facility, control_id)})))
        if status in ("error", "rejected"):
            log.warning("HL7 message %s (%s^%s) from %s %s: %s", p.control_id or "?", p.message_type, p.event,
                        p.app, status, "; ".join(f"{e.code} at {e.location}" for e in errors))
        return Result(ack=ack, status=status, message_id=mid, patient_id=patient_id, audit=audit, code=code,
                      error=error_text)

    def _refuse_reused_key(self, session: Session, p: Prepared, owner: int) -> Result:
        """A different message under a control id this sender already used: never applied, never thrown away.

        Answering it with the first message's ACK would tell the sender it was applied; it is stored as
        rejected beside the first (both in `hl7 list`) and answered AE 205 so the sender's engineer sees it."""
        error = AckError("205", f"control id {p.control_id} from {_plain(p.app)}/{_plain(p.facility)} was already used "
                                f"for a different message (stored as message {owner}); send this one under a new "
                                "control id", "MSH-10")
        ack = self._ack(p, "AE", [error], None)
        error_text = describe([error], None)
        mid = message_store.insert(
            session, raw=p.raw, app=p.app, facility=p.facility, control_id=p.control_id, message_type=p.message_type,
            trigger_event=p.event, event_time=p.event_time, peer=p.peer, status="rejected", ack=ack, error=error_text,
            patient_id=None, duplicate_of=owner)
        log.warning("HL7 message %s (%s^%s) from %s rejected: 205 control id reused for different content (first: %d)",
                    p.control_id, p.message_type, p.event, p.app, owner)
        return Result(ack=ack, status="rejected", message_id=mid, code="AE", error=error_text)

    def reapply(self, session: Session, message_id: int) -> Result:
        """Apply a stored message again (after a mapping fix); its row gets the new status and ACK."""
        row = message_store.get(session, message_id)
        if row is None:
            raise LookupError(f"no stored HL7 message with id {message_id}")
        if row.duplicate_of is not None:
            # refused for reusing another message's control id: a mapping fix cannot make it right
            return Result(ack=row.ack, status=row.status, message_id=message_id, code="AE", error=row.error,
                          previous_status=row.status)
        p = self.prepare(bytes(row.raw), row.peer)
        status, code, errors, text, patient_id, audit = self._outcome(session, p)
        ack = self._ack(p, code, errors, text)
        error_text = describe(errors, text)
        message_store.record_outcome(session, message_id, status=status, ack=ack, error=error_text, patient_id=patient_id)
        return Result(ack=ack, status=status, message_id=message_id, patient_id=patient_id, audit=audit, code=code,
                      error=error_text, previous_status=row.status)

    def dry_run(self, p: Prepared) -> tuple[str, bytes | None]:
        """(status, ACK) as far as they can be known without the database (the mapping bench)."""
        if p.reject or p.error or p.ignore:
            status, code, errors, text, _pid, _audit = self._outcome(None, p)  # type: ignore[arg-type]
        else:
            status, code, errors, text = "applied", "AA", [], "not applied: mapping test"
        return f"would be {status}", self._ack(p, code, errors, text)

    def _index(self, session: Session, p: Prepared) -> PatientIndex | None:
        """The patient index a message will change, with the rows it will read asked for ahead; None when the
        message changes nothing."""
        if p.reject or p.error or p.ignore or p.mapped is None:
            return None
        actor = Actor(who=_plain(p.app) or "hl7", network=p.peer,
                      reference={"type": "hl7-message", "id": f"{_plain(p.app)}/{_plain(p.facility)}/{p.control_id}"})
        index = PatientIndex(session, actor, self.settings.merged_policy)
        m = p.mapped
        index.prefetch([i for pair in m.patients for i in (*pair.patient.identifiers, *pair.prior)],
                       [m.encounter] if m.encounter is not None else [])
        return index

    def _outcome(self, session: Session, p: Prepared, index: PatientIndex | None = None):
        if p.reject:
            return "rejected", "AR", [p.reject], None, None, []
        if p.error:
            return "error", "AE", [p.error], None, None, []
        if p.ignore:
            return "ignored", "AA", [], "message type not processed here; stored", None, []
        if index is None:
            index = self._index(session, p)
            assert index is not None
        sql = index.sql
        # On a pipelined connection a failure cannot be pinned on its message anyway (the batch is redone on an
        # ordinary transaction, store.statements), so no savepoint: two statements and a PostgreSQL
        # subtransaction less per message. A change refused there after it queued writes is redone the same way.
        savepoint = None if sql.st.pipelined else sql.savepoint()
        writes = sql.writes
        assert p.mapped is not None  # prepare() maps every message it neither rejects, fails nor ignores
        try:
            out = HANDLERS[p.event](index, p.mapped)
            if savepoint is not None:
                sql.release(savepoint)
        except PatientIndexError as exc:
            self._undo(sql, savepoint, writes, exc)
            return "error", "AE", [AckError(INDEX_CODES[exc.problem], exc.text, exc.location or PART_LOCATIONS.get(exc.part))], None, None, []
        except PipelineFailed:
            raise  # a statement sent earlier failed: the whole batch is redone statement by statement
        except Exception as exc:  # a bug or a database constraint: this message only (its savepoint is undone)
            self._undo(sql, savepoint, writes, exc)
            # the exception text may quote identifiers (e.g. a PostgreSQL key DETAIL): type only above DEBUG
            log.error("HL7 message %s could not be applied: %s", p.control_id, type(exc).__name__)
            log.debug("HL7 message %s failure", p.control_id, exc_info=True)
            text = f"application internal error ({type(exc).__name__}); stored for reprocessing"
            return "error", "AE", [AckError("207", text, None)], None, None, []
        notes = "; ".join(out.notes) or None
        return "applied", "AA", [], notes, out.patient_id, one_entry_per_patient(out.audit)

    @staticmethod
    def _undo(sql: Sql, savepoint: str | None, writes: int, exc: Exception) -> None:
        """Undo what a refused or failed change wrote: back to its savepoint, or, on a pipelined connection where
        it has none, the whole batch again on an ordinary transaction if it wrote anything."""
        if savepoint is not None:
            sql.rollback_to(savepoint)
        elif sql.writes != writes:
            raise RefusedAfterWriting(f"a change refused after it queued writes ({type(exc).__name__})") from exc

    def _ack(self, p: Prepared, code: str, errors: list[AckError], text: str | None) -> bytes | None:
        s = self.settings
        msg = p.msg
        if msg is not None and (msg.msh.get(15) or msg.msh.get(16)):
            # enhanced mode: an accept acknowledgement, sent as MSH-15 asks (AL, NE, ER, SU)
            code = {"AA": "CA", "AE": "CE", "AR": "CR"}[code]
            wanted = msg.msh.get(15).strip() or "AL"
            if wanted == "NE" or (wanted == "ER" and code == "CA") or (wanted == "SU" and code != "CA"):
                return None
        return build_ack(msg, code, errors, raw=p.raw, application=s.receiving_application,
                         facility=s.receiving_facility, text=text)


# the patient index's problems as HL7 table 0357 codes
INDEX_CODES = {
    Problem.MISSING: "101",  # required field missing
    Problem.UNKNOWN: "204",  # unknown key identifier
    Problem.MERGED: "204",  # the key names a merged record: unknown as a live patient
    Problem.CONFLICT: "205",  # duplicate key identifier
    Problem.INCONSISTENT: "207",  # application internal error
}

# where each part of a patient-index change comes from in ADT (ERR-2 when the mapping named no repetition)
PART_LOCATIONS: dict[Part | None, str] = {Part.IDENTIFIERS: "PID-3", Part.VISIT: "PV1-19", Part.PRIOR: "MRG-1"}

# hl7_messages columns (String(200)); MSH-10 one less so it can never equal a cut longer id
HEADER_LIMITS = {"MSH-3": 200, "MSH-4": 200, "MSH-10": 199}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_fault(msg: Message, p: Prepared) -> AckError | None:
    """AR 102 for MSH fields with control characters or longer than their columns; cleans p's stored values.

    Control characters fail a PostgreSQL insert (NUL) and must never be echoed; a value cut to fit its column
    would make two different ids one duplicate key.
    """
    fault = None
    for n in (3, 4, 5, 6, 9, 10, 11, 12):
        value = p.control_id if n == 10 else msg.msh.raw(n)
        if _CONTROL.search(value):
            fault = fault or AckError("102", f"MSH-{n} holds control characters", f"MSH-{n}")
    if fault is None and _CONTROL.search(p.message_type + p.event):  # decoded \X00\ or EVN-1
        fault = AckError("102", "the message type or event holds control characters", "MSH-9")
    values = {"MSH-3": p.app, "MSH-4": p.facility, "MSH-10": p.control_id}
    for where, limit in HEADER_LIMITS.items():
        if len(values[where]) > limit:
            fault = fault or AckError("102", f"{where} is longer than {limit} characters", where)
    if fault is not None:
        p.header_refused = True
        p.app, p.facility = (_CONTROL.sub("\ufffd", v)[:200] for v in (p.app, p.facility))
        p.control_id = _CONTROL.sub("\ufffd", p.control_id)[:199]
    return fault


def describe(errors: list[AckError], note: str | None) -> str | None:
    """The stored error column: each error as code, location and text (the location once, even when the
    text starts with it), or the note of an applied message."""
    if not errors:
        return f"note: {note}" if note else None
    parts = []
    for e in errors:
        where = e.location or ""
        text = e.text if not where or e.text.startswith(where) else f"{where}: {e.text}"
        parts.append(f"{e.code} {text}")
    return "; ".join(parts)


BOM = b"\xef\xbb\xbf"


def same_content(first: bytes, second: bytes) -> bool:
    """Whether a message sent under a used control id is a true resend: the same bytes, or the same content
    with another MSH-7 (engines stamp the send time afresh), segment terminators and a byte-order mark aside."""
    return first == second or _content_key(first) == _content_key(second)


def _content_key(raw: bytes) -> bytes:
    text = raw.removeprefix(BOM).strip(b"\r\n\t ").replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    head, sep, rest = text.partition(b"\r")
    if head.startswith(b"MSH") and len(head) > 3:
        fields = head.split(head[3:4])
        if len(fields) > 6:
            fields[6] = b""  # MSH-7, date/time of message (fields[1] is MSH-2: MSH-1 is the separator itself)
        head = head[3:4].join(fields)
    return head + sep + rest


def one_entry_per_patient(entries: list[AuditEntry]) -> list[AuditEntry]:
    """One audit record per patient per message (e.g. demographics + encounter): the same facts, fewer rows."""
    by_patient: dict[int | None, AuditEntry] = {}
    for e in entries:
        first = by_patient.get(e.patient_id)
        if first is None:
            by_patient[e.patient_id] = e
            continue
        first.subtype = f"{first.subtype}+{e.subtype}"
        first.detail = {**first.detail, (e.subtype or "change"): e.detail}
    return list(by_patient.values())


def _plain(hd: str) -> str:
    return hd.split("^")[0][:100]


def strict_check(msg: Message) -> AckError | None:
    """Full structural validation with hl7apy (optional: ~15 ms per message)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        parse_message(msg.text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    except Exception as exc:  # hl7apy raises many types; any means "not valid"
        return AckError("102", f"strict validation failed: {' '.join(str(exc).split())[:200]}", None)
    return None
