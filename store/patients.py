"""Patient look-ups shared by every door: identifiers resolve through merges to the survivor."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from sqlalchemy import Connection, Select, bindparam, literal_column, select
from sqlalchemy.orm import Session, aliased

from store.models import Patient, PatientIdentifier

# A merge chain longer than this means a cycle written by hand into the database.
_MAX_MERGE_HOPS = 32


class MergeCycleError(RuntimeError):
    pass


def survivor(session: Session, patient: Patient) -> Patient:
    hops = 0
    while patient.merged_into_id is not None:
        hops += 1
        if hops > _MAX_MERGE_HOPS:
            raise MergeCycleError(f"patient {patient.id} has a merge chain longer than {_MAX_MERGE_HOPS}")
        nxt = session.get(Patient, patient.merged_into_id)
        if nxt is None:  # a dangling merge pointer: the record merged into was deleted
            raise MergeCycleError(f"patient {patient.id} is merged into a patient that does not exist")
        patient = nxt
    return patient


def find_patient(session: Session, system: str, value: str) -> Patient | None:
    """The live patient an identifier belongs to, following merges."""
    patient = session.execute(
        select(Patient).join(PatientIdentifier).where(PatientIdentifier.system == system, PatientIdentifier.value == value)
    ).scalar_one_or_none()
    return survivor(session, patient) if patient is not None else None


def identifiers_of(session: Session, patient_id: int) -> list[PatientIdentifier]:
    """Identifiers of a patient, including those of records merged into it."""
    return identifiers_of_many(session, [patient_id])[patient_id]


def identifiers_of_many(session: Session, patient_ids: Iterable[int]) -> dict[int, list[PatientIdentifier]]:
    """identifiers_of for several patients in a statement per merge generation and one for the identifiers, where
    one patient at a time cost two statements each (the Patient Module of a query answer of 100 patients, SQLite,
    in process: 200 statements and 31-34 ms one by one, 2 statements and 3-10 ms together)."""
    roots = list(dict.fromkeys(patient_ids))
    owner = {p: p for p in roots}  # a record -> the patient among `roots` it was merged into (itself for a root)
    frontier = roots
    while frontier:
        merged = session.execute(select(Patient.id, Patient.merged_into_id).where(Patient.merged_into_id.in_(frontier))).all()
        frontier = []
        for record, into in merged:
            if record not in owner and into is not None:
                owner[record] = owner[into]
                frontier.append(record)
    found: dict[int, list[PatientIdentifier]] = {p: [] for p in roots}
    for ident in session.execute(
        select(PatientIdentifier).where(PatientIdentifier.patient_id.in_(list(owner))).order_by(PatientIdentifier.id)
    ).scalars():
        found[owner[ident.patient_id]].append(ident)
    # each patient's own identifiers first, then those inherited from merged records
    return {p: sorted(idents, key=_own_first(p)) for p, idents in found.items()}


def _own_first(patient_id: int) -> Callable[[PatientIdentifier], bool]:
    return lambda ident: ident.patient_id != patient_id


class IdentifierRow(NamedTuple):
    """An identifier as the Patient Module needs it (not an ORM object: no session state to build)."""

    id: int
    patient_id: int
    system: str
    value: str
    type_code: str | None
    assigner: str | None


def _identifiers_by_root() -> Select[Any]:
    """Every identifier of the patients `ids` and of the records merged into them, each with the patient among
    `ids` it belongs to (the nearest up its merges): one statement, however deep the merges (recursive)."""
    owners = (select(Patient.id.label("id"), Patient.id.label("root"), literal_column("0").label("depth"))
              .where(Patient.id.in_(bindparam("ids", expanding=True))).cte("owners", recursive=True))
    merged = aliased(Patient)
    owners = owners.union_all(select(merged.id, owners.c.root, owners.c.depth + 1)
                              .where(merged.merged_into_id == owners.c.id, owners.c.depth < _MAX_MERGE_HOPS))
    i = PatientIdentifier
    nearest = (select(owners.c.root).where(owners.c.id == i.patient_id).order_by(owners.c.depth).limit(1)
               .scalar_subquery())
    # IN, not a join with the merges: SQLite then reads identifiers by patient (a join scanned them all)
    return (select(nearest, i.id, i.patient_id, i.system, i.value, i.type_code, i.assigner)
            .where(i.patient_id.in_(select(owners.c.id))).order_by(i.id))


# built once: SQLAlchemy then finds its compiled form by the statement's memoised cache key
_IDENTIFIERS_BY_ROOT = _identifiers_by_root()


def identifier_rows(conn: Connection | Session, patient_ids: Iterable[int]) -> dict[int, list[IdentifierRow]]:
    """identifiers_of_many's answer as plain rows, in one statement instead of one per merge generation plus one,
    and without ORM objects (a C-FIND or QIDO-RS answer's patients: see gateway/core/study_query.py). A record
    reached from two of the patients (one merged into the other) belongs to the nearer, as there."""
    roots = list(dict.fromkeys(patient_ids))
    found: dict[int, list[IdentifierRow]] = {p: [] for p in roots}
    if not roots:
        return found
    for root, *ident in conn.execute(_IDENTIFIERS_BY_ROOT, {"ids": roots}):
        found[root].append(IdentifierRow(*ident))
    return {p: sorted(rows, key=_own_first_row(p)) for p, rows in found.items()}


def _own_first_row(patient_id: int) -> Callable[[IdentifierRow], bool]:
    return lambda row: row.patient_id != patient_id
