"""Patient look-ups shared by every door: identifiers resolve through merges to the survivor."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

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
    ids = [patient_id]
    frontier = [patient_id]
    while frontier:
        merged = session.execute(select(Patient.id).where(Patient.merged_into_id.in_(frontier))).scalars().all()
        frontier = [m for m in merged if m not in ids]
        ids.extend(frontier)
    found = session.execute(
        select(PatientIdentifier).where(PatientIdentifier.patient_id.in_(ids)).order_by(PatientIdentifier.id)
    ).scalars()
    # the patient's own identifiers first, then those inherited from merged records
    return sorted(found, key=lambda ident: ident.patient_id != patient_id)
