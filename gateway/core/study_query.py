"""The DICOM query model: patients, studies, series and instances of the photos a caller may see.

One query core for the DICOM doors (C-FIND now; QIDO-RS next): the matching rules are PS3.4 C.2.2.2 (single
value, wildcard `*` and `?`, ranges, UID lists, universal matching), the policy filter is inside the query and the
grouping is done by the database, so counts are of what the caller may see. Protocol-free: criteria and rows, no
DIMSE status or HTTP code.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Literal, NamedTuple, TypeVar

from sqlalchemy import ColumnElement, Connection, Row, Select, String, bindparam, case, distinct, false, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import SQLCoreOperations

from gateway.core import access_audit
from gateway.core.context import Gateway
from gateway.core.ingest.dicom_patients import NHS_ISSUER, patient_module
from gateway.core.objects.vlphoto import PatientInfo
from gateway.core.patient_refs import NHS_SYSTEM
from gateway.core.policy.rules import AccessContext, filter_for
from gateway.core.policy.settings import PolicySettings
from store import audit
from store.models import Asset, Patient, PatientIdentifier
from store.patients import identifier_rows

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
# the DICOM modality of each stored SOP class (PS3.3: VL Photographic XC, Dermoscopic DMS, Secondary Capture OT)
MODALITY_OF = {
    "1.2.840.10008.5.1.4.1.1.77.1.4": "XC",
    "1.2.840.10008.5.1.4.1.1.77.1.7": "DMS",
    "1.2.840.10008.5.1.4.1.1.7": "OT",
}


@dataclass(frozen=True)
class DateRange:
    """A DICOM date (or date-time) range, either end open; both ends inclusive, as PS3.4 C.2.2.2.5 reads them."""

    lower: date | None = None
    upper: date | None = None


# study keys no study here holds a value for (every door answers them empty): single value matching takes only
# entities whose value matches (PS3.4 C.2.2.2.1), so a value given matches nothing (StudyQuery.unheld)
UNHELD_KEYS = ("AccessionNumber", "StudyID", "ReferringPhysicianName")


@dataclass(frozen=True)
class StudyQuery:
    level: Level
    patient_id: str | None = None  # may hold * and ?
    issuer: str | None = None
    patient_name: str | None = None  # may hold * and ?; matched without regard to case
    patient_birth_date: DateRange | None = None
    study_uids: Sequence[str] | None = None
    series_uids: Sequence[str] | None = None
    sop_uids: Sequence[str] | None = None
    study_date: DateRange | None = None
    # the time of day bounding each end of study_date (StudyDate and StudyTime matched as one date-time range, PS3.4
    # C.2.2.2.5.2); only with study_date
    study_times: tuple[time | None, time | None] | None = None
    modalities: Sequence[str] | None = None
    unheld: Sequence[str] = ()  # keys of UNHELD_KEYS given a value: nothing matches


@dataclass
class Match:
    """One answer: the patient module (from the patient index, as served objects carry it) and the level's values."""

    patient: PatientInfo
    study_uid: str | None = None
    study_started: datetime | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    instance_number: int | None = None
    modalities: list[str] = field(default_factory=list)
    # the counts the level's query works out (None at IMAGE level, where they are not held: answered empty, as
    # the conformance statement says of any key not held, not as 0)
    studies: int | None = None  # NumberOfPatientRelatedStudies
    series: int | None = None  # NumberOfStudyRelatedSeries
    instances: int | None = None  # Number of ...RelatedInstances
    asset_id: str | None = None


def like_pattern(value: str) -> tuple[str, bool]:
    """A DICOM wildcard value as a LIKE pattern with `\\` as escape; whether it holds a wildcard at all."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_"), ("*" in value or "?" in value)


def text_match(column: SQLCoreOperations[str] | SQLCoreOperations[str | None], value: str) -> ColumnElement[bool]:
    pattern, wild = like_pattern(value)
    if not wild:
        return column == value
    return column.like(pattern, escape="\\")


def _taken() -> Any:
    return func.coalesce(Asset.taken_at, Asset.created_at)


def patients_with_id(patient_id: str, issuer: str | None) -> Select[Any]:
    """The patients (row ids) holding an identifier that matches a DICOM PatientID (wildcards allowed) under an
    IssuerOfPatientID (NHS, or an assigning authority), or under any issuer."""
    ident = select(PatientIdentifier.patient_id).where(text_match(PatientIdentifier.value, patient_id))
    if issuer:
        if issuer.upper() == NHS_ISSUER:
            ident = ident.where(PatientIdentifier.system == NHS_SYSTEM)
        else:
            ident = ident.where(or_(PatientIdentifier.assigner == issuer, PatientIdentifier.system == issuer))
    return ident


# -- the query as a statement ---------------------------------------------------------------------------------
# A query's statement is built once per shape (which keys it matches, and how) and policy filter, its values bound
# at execution: building it afresh, and SQLAlchemy walking the new expression for its cache key, cost more than
# running it. With the Patient Module's columns read with the matches and the identifiers in one statement
# (store.patients.identifier_rows), search() for a STUDY by PatientID, SQLite, 10,000 studies, in process:
# 2.17 -> 0.43 ms of CPU a query, 4 statements -> 2.

_How = Literal["", "=", "~"]  # not matched, single value, wildcard (LIKE)


@dataclass(frozen=True)
class _Shape:
    """What a query's statement looks like: which keys it matches and how (the values are bound by name)."""

    level: Level
    patient_id: _How = ""
    issuer: Literal["", "NHS", "other"] = ""
    patient_name: _How = ""
    birth_from: bool = False
    birth_to: bool = False
    study_uids: bool = False
    series_uids: bool = False
    sop_uids: bool = False
    study_from: bool = False
    study_to: bool = False
    modalities: Literal["", "in", "none"] = ""  # none: asked only for modalities no stored class has
    nothing: bool = False  # a key holds a value nothing here has (StudyQuery.unheld)


def _single(value: str, *, fold_case: bool = False) -> tuple[_How, str]:
    """How a DICOM single or wildcard value is matched, and the value (or LIKE pattern) to bind."""
    pattern, wild = like_pattern(value)
    if fold_case:
        value, pattern = value.lower(), pattern.lower()
    return ("~", pattern) if wild else ("=", value)


def _shape(q: StudyQuery) -> tuple[_Shape, dict[str, Any]]:
    """The query's shape and its values, by the names _criteria binds them under."""
    shape: dict[str, Any] = {}
    values: dict[str, Any] = {}
    if q.patient_id:
        shape["patient_id"], values["patient_id"] = _single(q.patient_id)
        if q.issuer:
            shape["issuer"] = "NHS" if q.issuer.upper() == NHS_ISSUER else "other"
            if shape["issuer"] == "other":
                values["issuer"] = q.issuer
    if q.patient_name:
        # PN as family^given: match the index's name written the same way
        name = q.patient_name if "^" in q.patient_name or "*" in q.patient_name else q.patient_name + "^*"
        shape["patient_name"], values["patient_name"] = _single(name, fold_case=True)
    if q.patient_birth_date is not None:
        for end, day in (("birth_from", q.patient_birth_date.lower), ("birth_to", q.patient_birth_date.upper)):
            if day is not None:
                shape[end], values[end] = True, day
    for key in ("study_uids", "series_uids", "sop_uids"):
        uids = getattr(q, key)
        if uids:
            shape[key], values[key] = True, sorted(set(uids))
    if q.study_date is not None:
        low_time, high_time = q.study_times or (None, None)
        if q.study_date.lower is not None:
            shape["study_from"] = True
            values["study_from"] = datetime.combine(q.study_date.lower, low_time or time.min, tzinfo=timezone.utc)
        if q.study_date.upper is not None:
            shape["study_to"] = True  # the end exclusive: the next day, or the second after the upper time
            values["study_to"] = (datetime.combine(q.study_date.upper + timedelta(days=1), time.min, tzinfo=timezone.utc)
                                  if high_time is None else
                                  datetime.combine(q.study_date.upper, high_time.replace(microsecond=0), tzinfo=timezone.utc)
                                  + timedelta(seconds=1))
    if q.unheld:
        shape["nothing"] = True
    if q.modalities:
        classes = [uid for uid, m in MODALITY_OF.items() if m in q.modalities]
        shape["modalities"] = "in" if classes else "none"
        if classes:
            values["sop_classes"] = classes
    return _Shape(q.level, **shape), values


def _compare(column: SQLCoreOperations[str] | SQLCoreOperations[str | None], how: _How, name: str) -> ColumnElement[bool]:
    value = bindparam(name, type_=String())
    return column.like(value, escape="\\") if how == "~" else column == value


def _criteria(shape: _Shape) -> list[ColumnElement[bool]]:
    """The matching keys of a shape as SQL, every value a named bound parameter (PS3.4 C.2.2.2)."""
    where: list[ColumnElement[bool]] = []
    if shape.patient_id:
        ident = select(PatientIdentifier.patient_id).where(_compare(PatientIdentifier.value, shape.patient_id, "patient_id"))
        if shape.issuer == "NHS":
            ident = ident.where(PatientIdentifier.system == NHS_SYSTEM)
        elif shape.issuer == "other":
            issuer = bindparam("issuer", type_=String())
            ident = ident.where(or_(PatientIdentifier.assigner == issuer, PatientIdentifier.system == issuer))
        where.append(Asset.patient_id.in_(ident))
    if shape.patient_name:
        where.append(_compare(Patient.name_key, shape.patient_name, "patient_name"))  # folded as the value was
    if shape.birth_from:
        where.append(Patient.birth_date >= bindparam("birth_from"))
    if shape.birth_to:
        where.append(Patient.birth_date <= bindparam("birth_to"))
    for key, column in (("study_uids", Asset.study_uid), ("series_uids", Asset.series_uid), ("sop_uids", Asset.sop_instance_uid)):
        if getattr(shape, key):
            where.append(column.in_(bindparam(key, expanding=True)))
    if shape.modalities == "none" or shape.nothing:
        where.append(false())
    elif shape.modalities == "in" and shape.level != "STUDY":  # a series' or an image's own (at STUDY level: the study's)
        where.append(Asset.sop_class_uid.in_(bindparam("sop_classes", expanding=True)))
    return where


def _study_dated(started: ColumnElement[Any], shape: _Shape) -> list[ColumnElement[bool]]:
    """StudyDate (and StudyTime) against a study's date: when its first visible photo was taken."""
    out = []
    if shape.study_from:
        out.append(started >= bindparam("study_from"))
    if shape.study_to:
        out.append(started < bindparam("study_to"))
    return out


def _candidate_studies(shape: _Shape) -> list[ColumnElement[bool]]:
    """The studies with a photo taken in the StudyDate range, visible or not: a study whose first visible photo is in
    it has one, so the grouping that decides looks at these alone. Grouping every visible study of the store to
    compare its first photo's date took a one-day QIDO-RS over 10,000 studies from 7.6 to 31 ms (SQLite; on
    PostgreSQL 3,600 photos went from 23 to 547 ms), this back to 8.3. A subquery of its own FROM (not correlated)."""
    in_range = _study_dated(_taken(), shape)
    if not in_range:
        return []
    return [Asset.study_uid.in_(select(Asset.study_uid).where(*in_range).correlate(None))]


def _study_keys(shape: _Shape, policy: ColumnElement[bool]) -> list[ColumnElement[bool]]:
    """Below STUDY level, StudyDate matches the study's date, not each photo's: the studies whose first visible photo
    falls in the range, among the candidates and those of the patients the query names."""
    dated = _study_dated(func.min(_taken()), shape)
    if not dated:
        return []
    patient_level = _criteria(_Shape("IMAGE", patient_id=shape.patient_id, issuer=shape.issuer, patient_name=shape.patient_name,
                                     birth_from=shape.birth_from, birth_to=shape.birth_to, study_uids=shape.study_uids))
    studies = (select(Asset.study_uid).select_from(Asset).join(Patient, Patient.id == Asset.patient_id)
               .where(policy, *patient_level, *_candidate_studies(shape)).group_by(Asset.study_uid).having(*dated)
               .correlate(None))
    return [Asset.study_uid.in_(studies)]


# the Patient Module's columns, read with the matches (the patient index's values, as served objects carry them)
_PATIENT_COLUMNS = (Patient.id, Patient.family_name, Patient.given_names, Patient.name_prefix, Patient.birth_date, Patient.sex)
_IMAGE_COLUMNS = (Asset.id, Asset.study_uid, Asset.series_uid, Asset.sop_instance_uid, Asset.sop_class_uid, Asset.instance_number)


class _PatientRow(NamedTuple):
    id: int
    family_name: str | None
    given_names: str | None
    name_prefix: str | None
    birth_date: date | None
    sex: str | None


def _statement(shape: _Shape, policy: ColumnElement[bool]) -> Select[Any]:
    """The statement of a shape under a policy filter: matches at the shape's level, paged (limit, offset bound)."""
    taken = _taken()
    where = [policy, *_criteria(shape)]
    if shape.level == "STUDY":
        where += _candidate_studies(shape)  # the HAVING below decides among them
    elif shape.level != "PATIENT":
        where += _study_keys(shape, policy)
    base = select(*_PATIENT_COLUMNS).select_from(Asset).join(Patient, Patient.id == Asset.patient_id).where(*where)
    if shape.level == "IMAGE":
        return (base.add_columns(*_IMAGE_COLUMNS, taken)
                .order_by(Asset.study_uid, Asset.series_uid, Asset.instance_number, Asset.sop_instance_uid)
                .limit(bindparam("limit")).offset(bindparam("offset")))
    # grouped by the patient's own key, so PostgreSQL takes its other columns as given by the group
    group = {"PATIENT": (Patient.id,), "STUDY": (Patient.id, Asset.study_uid),
             "SERIES": (Patient.id, Asset.study_uid, Asset.series_uid)}[shape.level]
    # which of the stored SOP classes occur in each group: one flag column each (portable, unlike string aggregates)
    flags = [func.max(case((Asset.sop_class_uid == uid, 1), else_=0)) for uid in MODALITY_OF]
    grouped = base.add_columns(*group[1:], func.min(taken), func.count(distinct(Asset.study_uid)),
                               func.count(distinct(Asset.series_uid)), func.count(), *flags).group_by(*group)
    if shape.level == "STUDY":
        # the study's own date and modalities, over all its visible photos: matched per photo, a study taken over two
        # days matched the second day's date and was answered with that date and that day's photos only
        grouped = grouped.having(*_study_dated(func.min(taken), shape))
        if shape.modalities == "in":
            grouped = grouped.having(func.max(case((Asset.sop_class_uid.in_(bindparam("sop_classes", expanding=True)), 1), else_=0)) == 1)
    elif shape.level == "PATIENT":  # not a patient's key: the patients with photos taken then
        grouped = grouped.where(*_study_dated(taken, shape))
    return grouped.order_by(*group).limit(bindparam("limit")).offset(bindparam("offset"))




def find(gw: Gateway, ctx: AccessContext, q: StudyQuery, *, query: str, channel: str, limit: int = 10_000,
         offset: int = 0) -> list[Match]:
    """Every match at the query's level among the photos the caller may see, in a stable order, `offset` skipped and
    at most `limit` (paging in SQL, after the policy, so pages hold only what the caller may see); audited as a
    query, one record per patient with the photos the answer covers."""
    matches, results = search(gw, ctx, q, limit=limit, offset=offset)
    access_audit.write(gw, query_entries(ctx, results, query=query, channel=channel))
    return matches


def find_page(gw: Gateway, ctx: AccessContext, q: StudyQuery, *, query: str, channel: str, limit: int,
              offset: int = 0) -> tuple[list[Match], bool]:
    """find() for one page of at most `limit` (QIDO-RS), and whether more matches follow: one row more is read to
    tell, and neither answered nor audited. The door asked find() for limit + 1 and dropped the last: that match
    was audited as returned (a photo, perhaps a patient, on the trail as seen by a caller never sent it)."""
    rows, patients, started = _rows(gw, ctx, q, limit + 1, offset)
    matches, results = _matches(q.level, rows[:limit], _as_asked(patients, q), started)
    access_audit.write(gw, query_entries(ctx, results, query=query, channel=channel))
    return matches, len(rows) > limit


def search(gw: Gateway, ctx: AccessContext, q: StudyQuery, *, limit: int = 10_000,
           offset: int = 0) -> tuple[list[Match], dict[int, list[str]]]:
    """find() without its audit: the matches and, by patient, the photos they cover, for a caller that writes the
    query's audit records together with its own (query_entries) in one commit."""
    rows, patients, started = _rows(gw, ctx, q, limit, offset)
    return _matches(q.level, rows, _as_asked(patients, q), started)


def _as_asked(patients: dict[int, PatientInfo], q: StudyQuery) -> dict[int, PatientInfo]:
    """Each patient's module with the identifier the query matched as its PatientID (PS3.4 C.2.2.2.1: the answer
    carries the value matched), the index's own (the NHS number) then among the other ids: a PatientID matched
    against the hospital number was answered with the NHS number and issuer NHS."""
    asked = q.patient_id
    if not asked or "*" in asked or "?" in asked:
        return patients
    out = {}
    for key, p in patients.items():
        named = [(v, i) for v, i in p.other_ids if v == asked and (not q.issuer or i == q.issuer)]
        if (p.patient_id == asked and (not q.issuer or p.issuer == q.issuer)) or len(named) != 1:
            out[key] = p
            continue
        others = [(p.patient_id, p.issuer), *[o for o in p.other_ids if o != named[0]]]
        out[key] = replace(p, patient_id=named[0][0], issuer=named[0][1], other_ids=others)
    return out


def _rows(gw: Gateway, ctx: AccessContext, q: StudyQuery, limit: int,
          offset: int) -> tuple[Sequence[Row[Any]], dict[int, PatientInfo], dict[tuple[int, str], datetime]]:
    """The query's rows (the policy inside, paged in SQL), the Patient Module of each patient in them and, below
    STUDY level, each study's date (when its first visible photo was taken: a series' or an image's own was
    answered as its study's, so one study had as many dates as series)."""
    shape, values = _shape(q)
    policy = filter_for(ctx, gw.settings.policy)
    key = (shape, id(policy))
    statement = STATEMENTS.get(key, policy)
    if statement is None:
        statement = STATEMENTS.put(key, policy, _statement(shape, policy))
    with gw.db.read_connection() as conn:
        rows = conn.execute(statement, {**values, "limit": limit, "offset": offset}).all()
        patients = _patients(conn, rows)
        started: dict[tuple[int, str], datetime] = {}
        if q.level in ("SERIES", "IMAGE") and rows:
            studies = sorted({r[_N_PATIENT + (0 if q.level == "SERIES" else 1)] for r in rows})
            # by patient and study, as STUDY level groups them (a study UID two patients' photos carry is two studies)
            started = {(patient, study): first for patient, study, first in conn.execute(
                select(Asset.patient_id, Asset.study_uid, func.min(_taken())).where(policy, Asset.study_uid.in_(studies))
                .group_by(Asset.patient_id, Asset.study_uid)).tuples()}
    return rows, patients, started


def instances(session: Session, ctx: AccessContext, settings: PolicySettings, q: StudyQuery, *,
              limit: int = 10_000, recipient: AccessContext | None = None) -> tuple[list[tuple[Asset, Patient]], dict[int, list[str]]]:
    """search() at IMAGE level for a retrieve: the visible instances as their rows (in the IMAGE order, the policy
    inside the query), and by patient the photos the answer covers, in the caller's session. The retrieve needs
    the rows (blob, laterality) where search() answers attributes: one query instead of search() and a second
    policy-filtered read of the same rows and patients (WADO-RS of one instance: 11 statements through SQLAlchemy
    before the audit's, 5 now). Each row comes with the patient record it names (where the retrieve's patient
    module starts: reading it by itself was one statement more).

    `recipient`: the party the objects go to when it is not the caller (a C-MOVE's destination): only instances
    both may see are answered, the recipient's own policy inside the same query."""
    statement, params = _instances_statement(filter_for(ctx, settings), q, limit)
    if recipient is not None:
        statement = statement.where(filter_for(recipient, settings))
    rows = [(asset, patient) for asset, patient in session.execute(statement, params)]
    results: dict[int, list[str]] = {}
    for asset, _ in rows:
        results.setdefault(asset.patient_id, []).append(asset.id)
    return rows, results


def _instances_select(policy: ColumnElement[bool], criteria: Sequence[ColumnElement[bool]], limit: int) -> Select[Asset, Patient]:
    return (select(Asset, Patient).join(Patient, Patient.id == Asset.patient_id).where(policy, *criteria)
            .order_by(Asset.study_uid, Asset.series_uid, Asset.instance_number, Asset.sop_instance_uid).limit(limit))


_UIDS = (("study_uids", Asset.study_uid), ("series_uids", Asset.series_uid), ("sop_uids", Asset.sop_instance_uid))


def _instances_statement(policy: ColumnElement[bool], q: StudyQuery, limit: int) -> tuple[Select[Asset, Patient], dict[str, Any]]:
    """The statement of instances() and its parameters. A retrieve by UIDs (WADO-RS, C-GET of a study) asks the same
    shape again and again: its statement is built once on the caller's policy filter (an object shared per caller:
    rules.FILTERS) with the UIDs as bound parameters and kept (UID_STATEMENTS), so SQLAlchemy computes its cache key,
    a walk of the whole filter, once, not per request (the query of one instance: 0.57 -> 0.20 ms of CPU)."""
    if q.patient_id or q.patient_name or q.patient_birth_date is not None or q.study_date is not None or q.modalities:
        shape, values = _shape(q)  # the other keys: matched as search() matches them, values bound by name
        return _instances_select(policy, [*_criteria(shape), *_study_keys(shape, policy)], limit), values
    params: dict[str, Any] = {name: sorted(set(uids)) for name, uids in ((n, getattr(q, n)) for n, _ in _UIDS) if uids}
    key = (id(policy), tuple(params), limit)
    statement: Select[Asset, Patient] | None = UID_STATEMENTS.get(key, policy)
    if statement is None:
        criteria = [column.in_(bindparam(name, expanding=True)) for name, column in _UIDS if name in params]
        statement = UID_STATEMENTS.put(key, policy, _instances_select(policy, criteria, limit))
    return statement, params


T = TypeVar("T")  # a built statement, of whichever shape


class StatementCache:
    """Built statements by (shape, the policy filter's identity), least recently used dropped past `size`. A filter is
    known by its identity: rules.filter_for hands out the same object for a subject and purpose while it keeps it
    (rules.FILTERS), and an entry holds on to its filter, so no other filter can have that id while it lives; the
    identity is checked all the same."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[ColumnElement[bool], Any]] = OrderedDict()

    def get(self, key: Hashable, policy: ColumnElement[bool]) -> Any:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] is not policy:
                return None
            self._entries.move_to_end(key)
            return found[1]

    def put(self, key: Hashable, policy: ColumnElement[bool], statement: T) -> T:
        with self._lock:
            self._entries[key] = (policy, statement)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return statement


    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


STATEMENTS = StatementCache(1024)  # search(): by query shape
UID_STATEMENTS = StatementCache(1024)  # instances(): a retrieve by UIDs


def query_entries(ctx: AccessContext, results: dict[int, list[str]], *, query: str, channel: str) -> list[audit.AuditEntry]:
    """DICOM's own audit event for a query (DCM 110112), one record per patient in the answer."""
    return access_audit.search_entries(ctx, query=query, results=results, channel=channel, type_code=audit.QUERY)


def _patients(conn: Connection, rows: Sequence[Row[Any]]) -> dict[int, PatientInfo]:
    """The Patient Module of each patient in the rows: its columns came with them, its identifiers (merged records'
    included) in one statement."""
    facts = {r[0]: _PatientRow(*r[:_N_PATIENT]) for r in rows}
    idents = identifier_rows(conn, facts)
    return {p: patient_module(f, idents[p]) for p, f in facts.items()}


_N_PATIENT = len(_PATIENT_COLUMNS)


def _matches(level: Level, rows: Sequence[Row[Any]], patients: dict[int, PatientInfo],
             started: dict[tuple[int, str], datetime]) -> tuple[list[Match], dict[int, list[str]]]:
    n = _N_PATIENT
    if level == "IMAGE":
        matches = [Match(patients[r[0]], study_uid=r[n + 1], study_started=started.get((r[0], r[n + 1]), r[n + 6]), series_uid=r[n + 2],
                         sop_uid=r[n + 3],
                         sop_class_uid=r[n + 4], instance_number=r[n + 5], modalities=[MODALITY_OF.get(r[n + 4], "OT")],
                         asset_id=r[n]) for r in rows]
        results: dict[int, list[str]] = {}
        for r in rows:
            results.setdefault(r[0], []).append(r[n])
        return matches, results
    keys = {"PATIENT": 0, "STUDY": 1, "SERIES": 2}[level]  # the group's columns after the patient's id
    out = []
    for r in rows:
        first, studies, series, instances = r[n + keys:n + keys + 4]
        present = [MODALITY_OF[uid] for uid, flag in zip(MODALITY_OF, r[n + keys + 4:]) if flag]
        out.append(Match(
            patients[r[0]], study_uid=r[n] if keys > 0 else None, series_uid=r[n + 1] if keys > 1 else None,
            study_started=started.get((r[0], r[n]), first) if keys > 1 else first,
            modalities=sorted(set(present)), studies=studies, series=series, instances=instances))
    # audited by patient (the photos behind a grouped answer are not listed one by one)
    return out, {r[0]: [] for r in rows}


def parse_date_range(text: str) -> DateRange:
    """A DICOM date or range as the query keys carry it (YYYYMMDD, A-B, -B, A-); ValueError when it is not one."""
    def day(part: str) -> date:
        if len(part) != 8 or not part.isdigit():
            raise ValueError(part)
        return date(int(part[0:4]), int(part[4:6]), int(part[6:8]))

    if "-" not in text:
        return DateRange(day(text), day(text))
    low, high = text.split("-", 1)
    if not low and not high:
        raise ValueError(text)
    return DateRange(day(low) if low else None, day(high) if high else None)


def parse_time_range(text: str) -> tuple[time | None, time | None]:
    """A DICOM time or range as the query keys carry it (HH, HHMM, HHMMSS, HHMMSS.FFFFFF; A-B, -B, A-); ValueError
    when it is not one."""
    def moment(part: str) -> time:
        whole, _, fraction = part.partition(".")
        if len(whole) not in (2, 4, 6) or not whole.isdigit() or (fraction and not fraction.isdigit()):
            raise ValueError(part)
        return time(int(whole[0:2]), int(whole[2:4] or 0), int(whole[4:6] or 0), int((fraction + "000000")[:6]) if fraction else 0)

    if "-" not in text:
        return moment(text), moment(text)
    low, high = text.split("-", 1)
    if not low and not high:
        raise ValueError(text)
    return moment(low) if low else None, moment(high) if high else None


def person_name(p: PatientInfo) -> str:
    """The patient's name as a DICOM PN value (family^given^^prefix)."""
    return "^".join(x or "" for x in (p.family, p.given, None, p.prefix)).rstrip("^")


def attributes(match: Match) -> dict[str, Any]:
    """What a match answers, by DICOM keyword, for every DICOM query door (C-FIND, QIDO-RS); None: not held."""
    p = match.patient
    started = match.study_started
    return {
        "PatientID": p.patient_id, "IssuerOfPatientID": p.issuer, "PatientName": person_name(p),
        "PatientBirthDate": p.birth_date.strftime("%Y%m%d") if p.birth_date else "",
        "PatientSex": p.sex if p.sex in ("M", "F", "O") else "",
        "StudyInstanceUID": match.study_uid, "SeriesInstanceUID": match.series_uid, "SOPInstanceUID": match.sop_uid,
        "SOPClassUID": match.sop_class_uid, "InstanceNumber": match.instance_number,
        "StudyDate": started.strftime("%Y%m%d") if started else "", "StudyTime": started.strftime("%H%M%S") if started else "",
        "ModalitiesInStudy": match.modalities, "Modality": match.modalities[0] if match.modalities else "",
        "NumberOfPatientRelatedStudies": match.studies, "NumberOfStudyRelatedSeries": match.series,
        "NumberOfStudyRelatedInstances": match.instances, "NumberOfSeriesRelatedInstances": match.instances,
    }
