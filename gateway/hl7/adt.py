"""One handler per ADT trigger event: a mapped message becomes calls on the patient index."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from gateway.core.patients import UNSET, EncounterData, Outcome, Part, PatientIndex, PatientIndexError, Problem
from mapping.engine import MappedPatient


@dataclass
class MappedAdt:
    event: str
    patients: list[MappedPatient]
    encounter: EncounterData | None
    event_time: datetime | None
    notes: list[str] = field(default_factory=list)


Handler = Callable[[PatientIndex, MappedAdt], Outcome]


def _combine(first: Outcome, second: Outcome) -> Outcome:
    first.notes += second.notes
    first.audit += second.audit
    first.changed = first.changed or second.changed
    first.encounter_id = second.encounter_id or first.encounter_id
    return first


def _patient_and_encounter(status: str | None, *, admitted: bool = False, discharged: bool = False,
                           clear_discharge: bool = False) -> Handler:
    def handle(index: PatientIndex, m: MappedAdt) -> Outcome:
        out = index.upsert_patient(m.patients[0].patient, m.event_time)
        if m.encounter is None:
            return out
        enc = replace(m.encounter)
        if status is not None:
            enc.status = status
        if admitted and enc.admitted_at is UNSET and m.event_time is not None:
            enc.admitted_at = m.event_time
        if discharged and enc.discharged_at is UNSET and m.event_time is not None:
            enc.discharged_at = m.event_time
        if clear_discharge:
            enc.discharged_at = None
        assert out.patient_id is not None  # upsert_patient found or created one
        return _combine(out, index.upsert_encounter(out.patient_id, enc, m.event_time))

    return handle


def person_only(index: PatientIndex, m: MappedAdt) -> Outcome:
    """A28 / A31: the person, not a visit (PV1 is usually empty)."""
    return index.upsert_patient(m.patients[0].patient, m.event_time)


def merge(index: PatientIndex, m: MappedAdt) -> Outcome:
    """A40 (and A34): each PID/MRG pair merges the MRG-1 patient into the PID-3 patient."""
    out: Outcome | None = None
    for pair in m.patients:
        if not pair.prior:
            raise PatientIndexError(Problem.MISSING, "MRG-1 holds no identifier usable under the mapping", Part.PRIOR)
        step = index.merge(pair.patient, pair.prior, m.event_time)
        out = step if out is None else _combine(out, step)
    return _some(out)


def change_identifier(index: PatientIndex, m: MappedAdt) -> Outcome:
    """A47 (and A35): MRG-1 is replaced by the identifier of the same kind in PID-3."""
    out: Outcome | None = None
    for pair in m.patients:
        if not pair.prior:
            raise PatientIndexError(Problem.MISSING, "MRG-1 holds no identifier usable under the mapping", Part.PRIOR)
        step = index.change_identifier(pair.patient.identifiers, pair.prior, m.event_time)
        out = step if out is None else _combine(out, step)
    return _some(out)


def _some(out: Outcome | None) -> Outcome:
    if out is None:  # the mapper requires a PID for every ADT; a message without one never gets here
        raise PatientIndexError(Problem.MISSING, "the message holds no patient", Part.IDENTIFIERS)
    return out


HANDLERS: dict[str, Handler] = {
    "A01": _patient_and_encounter("in-progress", admitted=True),
    "A04": _patient_and_encounter("in-progress", admitted=True),
    "A05": _patient_and_encounter("planned"),
    "A08": _patient_and_encounter(None),
    "A28": person_only,
    "A31": person_only,
    "A02": _patient_and_encounter("in-progress"),
    "A03": _patient_and_encounter("finished", discharged=True),
    "A11": _patient_and_encounter("cancelled"),
    "A12": _patient_and_encounter("in-progress"),
    "A13": _patient_and_encounter("in-progress", clear_discharge=True),
    "A40": merge,
    "A34": merge,
    "A47": change_identifier,
    "A35": change_identifier,
}

# events whose PID/MRG pairs are merges or identifier changes (need MRG)
MERGE_EVENTS = {"A40", "A34", "A47", "A35"}
