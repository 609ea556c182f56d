"""The patient index: register, update, merge and re-identify patients and encounters.

Protocol-free: HL7 (and anything else) hands in plain dataclasses. Runs inside the
caller's write transaction and returns the audit entries for the caller to append
in that same transaction. Plain statements, because this is on the ADT hot path
(thousands of messages a second) and the ORM unit of work costs several times
more per row: statements go straight to the DB-API connection of the session
(same transaction), see `Sql`. On a pipelined connection (store.db.Writer) the
writes are only queued and the reads a change will make can be asked for ahead
(`PatientIndex.prefetch`), so one message costs two or three round trips, not
a dozen; the index remembers what it read and drops what its own writes change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timezone
from enum import StrEnum
from typing import Any, Literal, NamedTuple

from sqlalchemy.orm import Session

from store import audit
from store.models import name_key_of
from store.statements import IDS, IdPool, Params, Pending, Row, Statements, statements_of


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()  # "not sent": keep what is stored (None means "clear it")


@dataclass
class IdentifierData:
    system: str
    value: str
    type_code: str | None = None
    assigner: str | None = None
    # where it came from, for error messages (e.g. 'PID-3(2)')
    location: str | None = None


@dataclass
class PatientData:
    identifiers: list[IdentifierData] = field(default_factory=list)
    family_name: Any = UNSET
    given_names: Any = UNSET
    name_prefix: Any = UNSET
    birth_date: Any = UNSET
    sex: Any = UNSET
    deceased_at: Any = UNSET
    nhs_number_status: Any = UNSET

    def changes(self) -> dict[str, Any]:
        return {name: v for name in _PATIENT_FIELDS if (v := getattr(self, name)) is not UNSET}


@dataclass
class EncounterData:
    visit_number: str | None = None
    visit_system: str = ""
    class_code: Any = UNSET
    status: Any = UNSET
    location: Any = UNSET
    specialty: Any = UNSET
    attending_id: Any = UNSET
    attending_name: Any = UNSET
    admitted_at: Any = UNSET
    discharged_at: Any = UNSET

    def changes(self) -> dict[str, Any]:
        return {name: v for name in _ENCOUNTER_FIELDS if (v := getattr(self, name)) is not UNSET}


_PATIENT_FIELDS = tuple(f.name for f in fields(PatientData) if f.name != "identifiers")
_ENCOUNTER_FIELDS = tuple(f.name for f in fields(EncounterData) if f.name not in ("visit_number", "visit_system"))


class Problem(StrEnum):
    """Why a change cannot be applied to the index (the HL7 door maps each to a table 0357 code)."""

    MISSING = "missing"  # a value the change needs is not there
    UNKNOWN = "unknown"  # no such patient, encounter or identifier
    MERGED = "merged"  # names a record merged into another
    CONFLICT = "conflict"  # identifiers of different patients, an identifier taken, a merge into itself
    INCONSISTENT = "inconsistent"  # the index itself is broken (a merge cycle)


class Part(StrEnum):
    """Which part of a change a problem is in: each door names it its own way (HL7: PID-3, PV1-19, MRG-1)."""

    IDENTIFIERS = "identifiers"  # the patient's identifiers
    VISIT = "visit"  # the encounter's visit number
    PRIOR = "prior"  # the identifier being merged away or replaced


class PatientIndexError(Exception):
    """Understood but cannot be applied: the kind of problem, a text, the part of the change it is in, and where
    the value came from when the door said (IdentifierData.location, e.g. one repetition of an HL7 field)."""

    def __init__(self, problem: Problem, text: str, part: Part | None = None, location: str | None = None) -> None:
        super().__init__(text)
        self.problem = problem
        self.text = text
        self.part = part
        self.location = location


@dataclass
class Outcome:
    patient_id: int | None = None
    encounter_id: int | None = None
    notes: list[str] = field(default_factory=list)
    audit: list[audit.AuditEntry] = field(default_factory=list)
    changed: bool = False


def utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; all stored times are UTC
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


MergedPolicy = Literal["reject", "survivor"]


@dataclass
class Actor:
    """Who is changing the index (for the audit record)."""

    who: str
    role: str = "hl7-sender"
    network: str | None = None
    reference: dict[str, Any] | None = None  # e.g. {"type": "hl7-message", "id": "SENDER/123"}


class Sql:
    """Plain SQL on the session's own DB-API connection (inside its transaction), over store.statements.

    Hand-written because SQLAlchemy's statement compilation and execution
    context cost ~100 us per statement, which alone would cap ADT at a few
    hundred messages a second; the raw cursor costs ~10 us. Writes (`run`,
    `insert`) are queued on a pipelined connection and go with the next read;
    reads (`one`, `all`) wait for the server. Statements use `?`. Times are
    written the way SQLAlchemy stores them on each backend so ORM reads see
    the same values.
    """

    def __init__(self, statements: Statements, ids: IdPool | None) -> None:
        self.st = statements
        self.pg = statements.pg
        self.ids = ids
        self.writes = 0  # writes issued through this object (a refused change that wrote must be undone)
        # what the transaction's changes wrote so far, for the indexes whose reads were asked for before them
        self.changes: list[Change] = []
        self._sp = 0
        self._dt_in: datetime | None = None
        self._dt_out: str | None = None

    @classmethod
    def of(cls, session: Session) -> Sql:
        statements = statements_of(session)
        sql: Sql | None = session.info.get("clinphoto_sql")
        if sql is None or sql.st is not statements:
            sql = session.info["clinphoto_sql"] = cls(statements, session.info.get(IDS))
        return sql

    def later(self, sql: str, params: Params = ()) -> Pending:
        """A read asked for now and answered with the next round trip."""
        return self.st.later(sql, params)

    def one(self, sql: str, params: Params = ()) -> Row | None:
        return self.st.now(sql, params).one()

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        return self.st.now(sql, params).rows()

    def run(self, sql: str, params: Params = ()) -> None:
        """A write (queued on a pipelined connection)."""
        self.writes += 1
        self.st.run(sql, params)

    def counted(self, sql: str, params: Params = ()) -> Pending:
        """A write whose row count is wanted (read it after a sync)."""
        self.writes += 1
        return self.st.later(sql, params)

    def sync(self) -> None:
        self.st.sync()

    def insert(self, table: str, values: dict[str, Any]) -> int:
        """Insert one row; its id at once (PostgreSQL: drawn ahead from the sequence, so the INSERT can wait in
        the pipeline; SQLite: the rowid, no round trip to save)."""
        if self.ids is not None:
            values = {"id": self.ids.take(self.st, table), **values}
        cols = ", ".join(values)
        marks = ", ".join("?" * len(values))
        sql = f"INSERT INTO {table} ({cols}) VALUES ({marks})"
        params = [self.value(v) for v in values.values()]
        self.writes += 1
        if self.ids is not None:
            self.st.run(sql, params)
            return int(values["id"])
        rowid = self.st.later(sql, params).lastrowid
        assert rowid is not None
        return rowid

    def dt(self, value: datetime | None) -> datetime | str | None:
        if value is None or self.pg:
            return value
        if value is self._dt_in:  # the same "now" is written to several columns
            return self._dt_out
        self._dt_in, self._dt_out = value, audit.sqlite_time(value)
        return self._dt_out

    def value(self, value: Any) -> Any:
        if value is None or type(value) is str:  # most columns: no conversion, no isinstance chain
            return value
        if isinstance(value, datetime):
            return self.dt(value)
        if isinstance(value, date) and not self.pg:
            return value.isoformat()
        return value

    @staticmethod
    def read_dt(value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return utc(value)

    def savepoint(self) -> str:
        self._sp += 1
        name = f"cp{self._sp}"
        self.st.run(f"SAVEPOINT {name}")
        return name

    def release(self, name: str) -> None:
        self.st.run(f"RELEASE SAVEPOINT {name}")

    def rollback_to(self, name: str) -> None:
        self.st.run(f"ROLLBACK TO SAVEPOINT {name}")
        self.st.run(f"RELEASE SAVEPOINT {name}")


Key = tuple[str, str]  # an identifier's (system, value)


class Change(NamedTuple):
    """What one write may have changed for reads asked for before it (None: every row of that kind)."""

    identifiers: frozenset[Key] = frozenset()
    patients: frozenset[int] = frozenset()
    visits: frozenset[Key] | None = frozenset()  # encounters by (visit_system, visit_number)
    # encounters by the patient that held them (a merge moves a record's encounters, and only those)
    encounter_owners: frozenset[int] = frozenset()
    messages: frozenset[tuple[str, str, str]] = frozenset()  # stored messages by sender and control id


class Hit(NamedTuple):
    """A stored identifier with its patient's row, and that patient's survivor's if it was merged
    (merge chains are kept one hop long, so one join usually reaches the live record)."""

    system: str
    value: str
    patient_id: int
    merged_into_id: int | None
    last_event_at: Any
    identifier_id: int
    survivor_merged_into_id: int | None  # the merged_into row's own merged_into_id
    survivor_last_event_at: Any

    @property
    def key(self) -> Key:
        return (self.system, self.value)


_HITS_SQL: dict[int, str] = {}


def _hits_sql(n: int) -> str:
    sql = _HITS_SQL.get(n)
    if sql is None:
        cond = " OR ".join(["(i.system = ? AND i.value = ?)"] * n)
        # the patient's and its survivor's merge pointer and last event beside each identifier: an update, a
        # merge or a message about a merged record needs no further read
        sql = ("SELECT i.system, i.value, i.patient_id, p.merged_into_id, p.last_event_at, i.id, s.merged_into_id, "
               "s.last_event_at FROM patient_identifiers i JOIN patients p ON p.id = i.patient_id "
               f"LEFT JOIN patients s ON s.id = p.merged_into_id WHERE {cond}")
        if n <= 8:  # the usual counts only: a feed sending thousands of repetitions must not grow the cache
            _HITS_SQL[n] = sql
    return sql


def _placeholders_sql(n: int) -> str:
    """Which of n patients are quarantine placeholders (gateway/core/ingest/dicom_patients.is_placeholder: no name,
    birth date or sex, never updated by a feed), live ones."""
    return (f"SELECT id FROM patients WHERE id IN ({', '.join(['?'] * n)}) AND merged_into_id IS NULL "
            "AND family_name IS NULL AND given_names IS NULL AND birth_date IS NULL AND sex IS NULL "
            "AND last_event_at IS NULL")


_ENCOUNTER_SQL = "SELECT id, patient_id, last_event_at FROM encounters WHERE visit_system = ? AND visit_number = ?"
_IDENTIFIER_INSERT: dict[int, str] = {}


def _identifier_insert_sql(n: int) -> str:
    sql = _IDENTIFIER_INSERT.get(n)
    if sql is None:
        sql = ("INSERT INTO patient_identifiers (patient_id, system, value, type_code, assigner, created_at) VALUES "
               + ", ".join(["(?, ?, ?, ?, ?, ?)"] * n))
        if n <= 8:
            _IDENTIFIER_INSERT[n] = sql
    return sql


class PatientIndex:
    def __init__(self, session: Session, actor: Actor, merged_policy: MergedPolicy = "reject") -> None:
        self.s = session
        self.sql = Sql.of(session)
        self.actor = actor
        self.merged_policy = merged_policy
        self._last_known: set[Key] = set()
        self._last_event: dict[int, Any] = {}  # patient id -> last_event_at, as read by the last resolve()
        # what this index read (or asked for ahead), minus what its own writes may have changed since
        self._ahead: list[tuple[list[Key], Pending]] = []
        self._known: dict[Key, Hit | None] = {}
        self._encounters_ahead: dict[Key, Pending] = {}
        self._encounters: dict[Key, Row | None] = {}
        # the transaction's changes this index has taken into account: its reads may have been asked for before
        # other changes of the same group commit wrote (gateway/hl7/committer.py asks for a whole batch's reads first)
        self._seen = len(self.sql.changes)

    # -- look-ups ---------------------------------------------------------

    def prefetch(self, identifiers: Iterable[IdentifierData], encounters: Iterable[EncounterData] = ()) -> None:
        """Ask now for the rows a change will read (its identifiers, its visits): they come back with the
        caller's next round trip instead of one each."""
        keys = [k for k in dict.fromkeys((i.system, i.value) for i in identifiers) if k not in self._known]
        if keys:
            self._ahead.append((keys, self.sql.later(_hits_sql(len(keys)), [x for k in keys for x in k])))
        for e in encounters:
            visit = (e.visit_system, e.visit_number or "")
            if e.visit_number and visit not in self._encounters and visit not in self._encounters_ahead:
                self._encounters_ahead[visit] = self.sql.later(_ENCOUNTER_SQL, visit)

    def _settle(self) -> None:
        """Take in what was asked for ahead, then drop whatever the transaction's changes since may have made stale."""
        for keys, pending in self._ahead:
            found = {hit.key: hit for hit in map(Hit._make, pending.rows())}
            for k in keys:
                self._known.setdefault(k, found.get(k))
        self._ahead.clear()
        for visit, pending in self._encounters_ahead.items():
            self._encounters.setdefault(visit, pending.one())
        self._encounters_ahead.clear()
        changes = self.sql.changes
        for change in changes[self._seen:]:
            self._drop(change)
        self._seen = len(changes)

    def _drop(self, change: Change) -> None:
        for k in change.identifiers:
            self._known.pop(k, None)
        if change.patients:
            ids = change.patients
            stale = [k for k, h in self._known.items()
                     if h is not None and (h.patient_id in ids or h.merged_into_id in ids or h.survivor_merged_into_id in ids)]
            for k in stale:
                del self._known[k]
        if change.visits is None:
            self._encounters.clear()
        else:
            for visit in change.visits:
                self._encounters.pop(visit, None)
        if change.encounter_owners:
            owners = change.encounter_owners
            # an encounter read as absent stays absent: a merge moves encounters, it makes none
            for visit in [v for v, row in self._encounters.items() if row is not None and row[1] in owners]:
                del self._encounters[visit]

    def _wrote(self, change: Change) -> None:
        """A write of this index: what it read that the write may change is read again, here and in the other
        indexes of the transaction."""
        self._settle()
        self.sql.changes.append(change)
        self._drop(change)
        self._seen = len(self.sql.changes)

    def _hits(self, identifiers: list[IdentifierData]) -> list[Hit]:
        """Stored identifiers among these, in the message's order."""
        self._settle()
        keys = list(dict.fromkeys((i.system, i.value) for i in identifiers))
        missing = [k for k in keys if k not in self._known]
        if missing:
            found = {hit.key: hit for hit in map(Hit._make, self.sql.all(_hits_sql(len(missing)),
                                                                          [x for k in missing for x in k]))}
            for k in missing:
                self._known[k] = found.get(k)
        return [hit for k in keys if (hit := self._known[k]) is not None]

    def _encounter(self, visit: Key) -> Row | None:
        self._settle()
        if visit not in self._encounters:
            self._encounters[visit] = self.sql.one(_ENCOUNTER_SQL, visit)
        return self._encounters[visit]

    # what a write may have changed is read again
    def _forget_identifiers(self, keys: Iterable[Key]) -> None:
        self._wrote(Change(identifiers=frozenset(keys)))

    def _forget_patients(self, *ids: int) -> None:
        self._wrote(Change(patients=frozenset(ids)))

    def _forget_encounters(self, *visits: Key) -> None:
        """The encounters of these visits; of every visit when none is named (records moved between patients)."""
        self._wrote(Change(visits=frozenset(visits) if visits else None))

    def _survivor_id(self, patient_id: int) -> int:
        current = patient_id
        for _ in range(33):
            row = self.sql.one("SELECT merged_into_id FROM patients WHERE id = ?", (current,))
            if row is None or row[0] is None:
                return current
            current = row[0]
        raise PatientIndexError(Problem.INCONSISTENT, f"patient {patient_id} has a merge cycle")

    def _survivor_of(self, hit: Hit) -> int:
        """The live record a merged identifier's patient leads to (usually read with the hit: no round trip)."""
        assert hit.merged_into_id is not None
        if hit.survivor_merged_into_id is None and hit.merged_into_id != hit.patient_id:
            return hit.merged_into_id
        return self._survivor_id(hit.patient_id)

    def resolve(self, identifiers: list[IdentifierData]) -> int | None:
        """The live patient these identifiers name, applying the merged-identifier policy."""
        hits = self._hits(identifiers)
        # identifiers already stored (on this patient or a record merged into it): never inserted again
        self._last_known = {h.key for h in hits}
        self._last_event = {h.patient_id: h.last_event_at for h in hits}
        for h in hits:
            if h.merged_into_id is not None and h.survivor_merged_into_id is None:
                self._last_event.setdefault(h.merged_into_id, h.survivor_last_event_at)
        if not hits:
            return None
        direct = {h.patient_id for h in hits if h.merged_into_id is None}
        merged = [h for h in hits if h.merged_into_id is not None]
        if len(direct) > 1:
            raise PatientIndexError(Problem.CONFLICT, "the identifiers in the message belong to different patients (merge them first)",
                Part.IDENTIFIERS, self._location_of(identifiers, hits[0]))
        survivors = {self._survivor_of(h) for h in merged}
        if merged and not direct:
            if self.merged_policy == "reject":
                raise PatientIndexError(Problem.MERGED, "the identifier belongs to a patient record that has been merged into another; "
                    "send messages for the surviving patient", Part.IDENTIFIERS, self._location_of(identifiers, merged[0]))
            if len(survivors) > 1:
                raise PatientIndexError(Problem.CONFLICT, "the identifiers resolve to different surviving patients", Part.IDENTIFIERS)
            return survivors.pop()
        pid = direct.pop()
        if survivors - {pid}:
            raise PatientIndexError(Problem.CONFLICT, "the identifiers belong to different patients (one was merged elsewhere)",
                Part.IDENTIFIERS, self._location_of(identifiers, merged[0]))
        return pid

    @staticmethod
    def _location_of(identifiers: list[IdentifierData], hit: Hit) -> str | None:
        for i in identifiers:
            if i.system == hit.system and i.value == hit.value:
                return i.location
        return None

    # -- patients -----------------------------------------------------------

    def _audit(self, action: str, patient_id: int, subtype: str | None, detail: dict[str, Any]) -> audit.AuditEntry:
        entities: list[dict[str, Any]] = [{"type": "patient", "id": patient_id, "role": "patient"}]
        if self.actor.reference:
            entities.append(dict(self.actor.reference))
        return audit.AuditEntry(
            type_code=audit.PATIENT_RECORD, action=action, subtype=subtype, agent_who=self.actor.who,
            agent_role=self.actor.role, agent_network=self.actor.network, patient_id=patient_id,
            entities=entities, detail=detail,
        )

    def _update(self, table: str, row_id: int, values: dict[str, Any], visit: Key | None = None) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.sql.run(f"UPDATE {table} SET {sets} WHERE id = ?", [*(self.sql.value(v) for v in values.values()), row_id])
        if table == "patients":
            self._forget_patients(row_id)
        elif visit is not None:
            self._forget_encounters(visit)
        else:
            self._forget_encounters()

    def upsert_patient(self, data: PatientData, event_time: datetime | None, *, create: bool = True) -> Outcome:
        if not data.identifiers:
            raise PatientIndexError(Problem.MISSING, "no usable patient identifier", Part.IDENTIFIERS)
        event_time = utc(event_time)
        out = Outcome()
        self._fold_placeholders(data.identifiers, out)
        pid = self.resolve(data.identifiers)
        changes = data.changes()
        now = datetime.now(timezone.utc)
        if pid is None:
            if not create:
                raise PatientIndexError(Problem.UNKNOWN, "no patient with these identifiers is known",
                                        Part.IDENTIFIERS, data.identifiers[0].location)
            pid = self.sql.insert("patients", {**changes, "name_key": name_key_of(changes.get("family_name"), changes.get("given_names")),
                                               "last_event_at": event_time, "created_at": now, "updated_at": now})
            self._add_identifiers(pid, data.identifiers, set())
            out.patient_id, out.changed = pid, True
            out.audit.append(self._audit("C", pid, "register", {"fields": sorted(changes)}))
            return out
        out.patient_id = pid
        if pid in self._last_event:
            last = Sql.read_dt(self._last_event[pid])
        else:  # resolved through a merge chain longer than one hop: the survivor's row was not read
            row = self.sql.one("SELECT last_event_at FROM patients WHERE id = ?", (pid,))
            last = Sql.read_dt(row[0] if row is not None else None)
        added = self._add_identifiers(pid, data.identifiers, self._last_known)
        if last is not None and event_time is not None and event_time < last:
            out.notes.append("older than the last update applied to this patient: demographics kept")
            if added:
                out.changed = True
                out.audit.append(self._audit("U", pid, "identifiers", {"added": added}))
            return out
        values = {**changes, **self._name_key(pid, changes)}
        if event_time is not None:
            values["last_event_at"] = event_time
        values["updated_at"] = now
        self._update("patients", pid, values)
        out.changed = True
        out.audit.append(self._audit("U", pid, "update", {"fields": sorted(changes), "identifiers_added": added}))
        return out

    def _fold_placeholders(self, identifiers: list[IdentifierData], out: Outcome) -> None:
        """A message naming a quarantine placeholder's identifier beside a registered patient's: the placeholder is
        merged into that patient, as an A40 would (its photos move there, still held for the records officer).

        A photo naming an identifier no feed had registered made a placeholder holding it (ingest, with
        quarantine_unknown_patients); the PAS then adding that identifier to the patient it belongs to (an A31 with
        the NHS number beside the hospital number) named two records, and was refused 'merge them first' over and
        over: the PAS knows nothing of the placeholder, and a release leaves it holding the identifier. Two
        registered records named together are still refused (resolve)."""
        hits = self._hits(identifiers)
        direct = sorted({h.patient_id for h in hits if h.merged_into_id is None})
        if len(direct) < 2:
            return  # the usual message: nothing more read
        held = {row[0] for row in self.sql.all(_placeholders_sql(len(direct)), direct)}
        registered = [pid for pid in direct if pid not in held]
        if not held or len(registered) > 1:
            return
        sid = registered[0] if registered else min(held)  # placeholders alone: the first, which this message fills in
        now = datetime.now(timezone.utc)
        for mid in sorted(held - {sid}):
            moved = self._move_records(mid, sid)
            self._update("patients", mid, {"merged_into_id": sid, "merged_at": now, "updated_at": now})
            self._forget_patients(mid, sid)
            out.audit.append(self._audit("U", sid, "merge", {"merged_patient_id": mid, "quarantine_placeholder": True,
                                                             **moved}))
            out.audit.append(self._audit("U", mid, "merged-into", {"survivor_patient_id": sid}))

    def _name_key(self, pid: int, changes: dict[str, Any]) -> dict[str, Any]:
        """The name key (store.models.name_key_of) to write with a change of the name: these statements bypass the
        ORM event that keeps it on other writes, and names are matched against it (C-FIND, QIDO-RS, the worklist,
        FHIR and REST searches). The part of the name not changed is read only when the change holds one part."""
        if "family_name" not in changes and "given_names" not in changes:
            return {}
        if "family_name" in changes and "given_names" in changes:
            return {"name_key": name_key_of(changes["family_name"], changes["given_names"])}
        row = self.sql.one("SELECT family_name, given_names FROM patients WHERE id = ?", (pid,))
        family, given = (row[0], row[1]) if row is not None else (None, None)
        return {"name_key": name_key_of(changes.get("family_name", family), changes.get("given_names", given))}

    def _add_identifiers(self, pid: int, identifiers: list[IdentifierData], known: set[Key]) -> list[str]:
        new: dict[Key, IdentifierData] = {}
        for i in identifiers:
            if (i.system, i.value) not in known:
                new.setdefault((i.system, i.value), i)
        if not new:  # an update of a known patient usually adds nothing
            return []
        now = self.sql.dt(datetime.now(timezone.utc))
        self.sql.run(_identifier_insert_sql(len(new)),
                     [x for i in new.values() for x in (pid, i.system, i.value, i.type_code, i.assigner, now)])
        self._forget_identifiers(new)
        return [i.system for i in new.values()]

    # -- encounters ---------------------------------------------------------

    def upsert_encounter(self, patient_id: int, data: EncounterData, event_time: datetime | None,
                         *, require_existing: bool = False) -> Outcome:
        out = Outcome(patient_id=patient_id)
        if not data.visit_number:
            if require_existing:
                raise PatientIndexError(Problem.MISSING, "the visit number is missing", Part.VISIT)
            out.notes.append("no visit number: encounter not recorded")
            return out
        event_time = utc(event_time)
        now = datetime.now(timezone.utc)
        row = self._encounter((data.visit_system, data.visit_number))
        changes = data.changes()
        if row is None:
            if require_existing:
                raise PatientIndexError(Problem.UNKNOWN, "no encounter with this visit number is known", Part.VISIT)
            eid = self.sql.insert("encounters", {
                "patient_id": patient_id, "visit_system": data.visit_system, "visit_number": data.visit_number,
                "status": "in-progress", **changes, "last_event_at": event_time, "created_at": now, "updated_at": now})
            self._forget_encounters((data.visit_system, data.visit_number))
            out.encounter_id, out.changed = eid, True
            out.audit.append(self._audit("C", patient_id, "encounter", {"encounter_id": eid, "fields": sorted(changes)}))
            return out
        eid, owner, last = row[0], row[1], Sql.read_dt(row[2])
        out.encounter_id = eid
        if owner != patient_id and self._survivor_id(owner) != patient_id:
            raise PatientIndexError(Problem.CONFLICT, "this visit number belongs to another patient", Part.VISIT)
        if last is not None and event_time is not None and event_time < last:
            out.notes.append("older than the last update applied to this encounter: encounter kept")
            return out
        values = dict(changes)
        values["patient_id"] = patient_id
        values["updated_at"] = now
        if event_time is not None:
            values["last_event_at"] = event_time
        self._update("encounters", eid, values, (data.visit_system, data.visit_number))
        out.changed = True
        out.audit.append(self._audit("U", patient_id, "encounter", {"encounter_id": eid, "fields": sorted(changes)}))
        return out

    # -- merge and identifier change ------------------------------------------

    def merge(self, survivor: PatientData, merged: list[IdentifierData], event_time: datetime | None) -> Outcome:
        """Merge the patient named by `merged` into the patient named by `survivor` (A40)."""
        if not merged:
            raise PatientIndexError(Problem.MISSING, "the identifier of the patient to merge is missing", Part.PRIOR)
        surv_out = self.upsert_patient(survivor, event_time)
        sid = surv_out.patient_id
        assert sid is not None  # upsert_patient creates or raises
        out = Outcome(patient_id=sid, notes=list(surv_out.notes), audit=list(surv_out.audit), changed=True)
        hits = self._hits(merged)
        now = datetime.now(timezone.utc)
        if not hits:
            # Unknown prior patient: keep its identifier on a merged placeholder so look-ups reach the survivor.
            mid = self.sql.insert("patients", {"merged_into_id": sid, "merged_at": now, "name_key": name_key_of(None, None),
                                               "last_event_at": utc(event_time),
                                               "created_at": now, "updated_at": now})
            self._add_identifiers(mid, merged, set())
            out.notes.append("the merged patient was not known: its identifier now resolves to the survivor")
            out.audit.append(self._audit("U", sid, "merge", {"merged_patient_id": mid, "placeholder": True}))
            return out
        for mid in sorted({h.patient_id for h in hits}):
            if mid == sid:
                raise PatientIndexError(Problem.CONFLICT, "a patient cannot be merged into itself", Part.PRIOR)
            if self._merged_into(mid) is not None:
                if self._survivor_id(mid) == sid:
                    out.notes.append("already merged into this patient")
                    continue
                raise PatientIndexError(Problem.CONFLICT, "the patient to merge was already merged into another patient", Part.PRIOR)
            moved = self._move_records(mid, sid)
            self._update("patients", mid, {"merged_into_id": sid, "merged_at": now, "updated_at": now})
            # keep chains one hop long, so look-ups stay cheap
            self.sql.run("UPDATE patients SET merged_into_id = ?, updated_at = ? WHERE merged_into_id = ?",
                         (sid, self.sql.dt(now), mid))
            self._forget_patients(mid, sid)  # the rows merged into mid (read with it as their pointer) now point on
            out.audit.append(self._audit("U", sid, "merge", {"merged_patient_id": mid, **moved}))
            out.audit.append(self._audit("U", mid, "merged-into", {"survivor_patient_id": sid}))
        return out

    def _merged_into(self, patient_id: int) -> int | None:
        """The patient's merge pointer: from a hit still known, else read."""
        self._settle()
        for hit in self._known.values():
            if hit is not None and hit.patient_id == patient_id:
                return hit.merged_into_id
        row = self.sql.one("SELECT merged_into_id FROM patients WHERE id = ?", (patient_id,))
        return row[0] if row is not None else None

    def _move_records(self, src: int, dst: int) -> dict[str, int]:
        # the three counts come back in one round trip (with whatever was queued before them)
        enc = self.sql.counted("UPDATE encounters SET patient_id = ? WHERE patient_id = ?", (dst, src))
        con = self.sql.counted("UPDATE consents SET patient_id = ? WHERE patient_id = ?", (dst, src))
        # every photo moves; one the survivor already holds stays apart by filed_patient_id
        ast = self.sql.counted("UPDATE assets SET patient_id = ? WHERE patient_id = ?", (dst, src))
        # only src's encounters changed: forgetting every cached one cost the rest of a group commit's batch a
        # round trip each (A40 in 10% of the bench's messages: 600 of 1,610 round trips per 2,000 messages)
        self._wrote(Change(encounter_owners=frozenset({src})))
        return {"encounters_moved": enc.rowcount, "consents_moved": con.rowcount, "assets_moved": ast.rowcount}

    def change_identifier(self, new: list[IdentifierData], old: list[IdentifierData], event_time: datetime | None) -> Outcome:
        """Replace an identifier by the one of the same system in the new list (HL7 A47)."""
        if not old:
            raise PatientIndexError(Problem.MISSING, "the incorrect identifier is missing", Part.PRIOR)
        out = Outcome()
        for o in old:
            repl = next((n for n in new if n.system == o.system), None)
            if repl is None:
                raise PatientIndexError(Problem.MISSING, "the patient's identifiers hold none of the same kind as the incorrect one",
                                        Part.IDENTIFIERS)
            found = self._hits([o, repl])
            row = next((h for h in found if h.key == (o.system, o.value)), None)
            taken = next((h for h in found if h.key == (repl.system, repl.value)), None)
            if row is None:
                if taken is not None:
                    out.patient_id = self._live(taken)
                    out.notes.append("identifier already changed")
                    continue
                raise PatientIndexError(Problem.UNKNOWN, "no patient has the incorrect identifier", Part.PRIOR, o.location)
            pid = self._live(row)
            if taken is not None:
                raise PatientIndexError(Problem.CONFLICT, "the new identifier already belongs to a patient", Part.IDENTIFIERS,
                                        repl.location)
            self.sql.run("UPDATE patient_identifiers SET value = ?, type_code = ?, assigner = ? WHERE id = ?",
                         (repl.value, repl.type_code, repl.assigner, row.identifier_id))
            self._forget_identifiers([row.key, (repl.system, repl.value)])
            out.patient_id, out.changed = pid, True
            out.audit.append(self._audit("U", pid, "identifier-change", {"system": o.system}))
        return out

    def _live(self, hit: Hit) -> int:
        return hit.patient_id if hit.merged_into_id is None else self._survivor_of(hit)
