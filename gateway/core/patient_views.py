"""Patients as the doors show them: demographics, identifiers, merged-into, the current encounter.

Under the need-to-know rule (policy.knows_patient, the specialty rule read per patient): a caller
who may not know a patient gets NOT_FOUND, exactly as for a patient nobody registered, and the real
reason goes to the audit trail. A merged record reads as itself, naming the record it was merged
into; the rule is read on the surviving record, which holds the care. Patients are named by their
public id (an opaque string), never the row id. A quarantine placeholder (a record holding only the
identifier a sender gave, ingest/dicom_patients.is_placeholder) is no registered patient: NOT_FOUND
to everyone, as its photos are, until a feed registers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import not_, or_, select
from sqlalchemy.orm import Session

from gateway.core import access_audit, patient_refs
from gateway.core.context import Gateway
from gateway.core.ingest.dicom_patients import is_placeholder, placeholder_sql
from gateway.core.policy.rules import CURRENT_ENCOUNTER_STATUS, AccessContext, knows_patient, scope_context, utc
from gateway.core.refusals import Kind, Refused
from store import audit
from store.models import Encounter, Patient, PatientIdentifier
from store.patients import survivor

NOT_FOUND = "patient not found"


@dataclass(frozen=True)
class IdentifierView:
    system: str
    value: str
    type_code: str | None
    assigner: str | None


@dataclass(frozen=True)
class EncounterView:
    visit_number: str | None
    class_code: str | None
    status: str
    location: str | None
    specialty: str | None
    attending: str | None
    admitted_at: datetime | None


@dataclass(frozen=True)
class PatientView:
    id: str  # the public id
    family_name: str | None
    given_names: str | None
    name_prefix: str | None
    birth_date: date | None
    sex: str | None
    deceased_at: datetime | None
    nhs_number_status: str | None
    identifiers: list[IdentifierView]
    merged_into: str | None  # the survivor's public id, for a merged record
    merged_at: datetime | None
    current_encounter: EncounterView | None


def _reach(gw: Gateway, ctx: AccessContext, perm: str, what: str) -> str:
    """'any', or 'patient' when only patient/ scopes allow this (the token's patient alone); a token no scope of
    which allows it, or a role that may not act for the purpose, is refused (audited)."""
    reach = scope_context(ctx.subject.scopes, "Patient", perm)
    if reach is None:
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.INSUFFICIENT_SCOPE, f"the token's scopes do not allow "
                                                                                  f"'{perm}' on Patient", needs=f"Patient.{perm}"))
    if ctx.refusal:
        raise access_audit.refuse(gw, ctx, what, Refused(ctx.refusal_kind or Kind.FORBIDDEN, ctx.refusal))
    return reach


def _is_token_patient(ctx: AccessContext, patient: Patient) -> bool:
    """A patient/ scope reaches the patient in the token's context (named by public id, or by row id in older tokens)."""
    named = str(ctx.subject.patient or "").removeprefix("Patient/")
    return named in (patient.public_id, str(patient.id))


def _current_encounter(session: Session, patient_id: int) -> EncounterView | None:
    now = utc(datetime.now().astimezone())
    row = session.scalars(
        select(Encounter).where(Encounter.patient_id == patient_id, Encounter.status == CURRENT_ENCOUNTER_STATUS,
                                or_(Encounter.discharged_at.is_(None), Encounter.discharged_at > now))
        .order_by(Encounter.admitted_at.desc().nulls_last(), Encounter.id.desc()).limit(1)).first()
    if row is None:
        return None
    return EncounterView(row.visit_number, row.class_code, row.status, row.location, row.specialty, row.attending_name,
                         utc(row.admitted_at) if row.admitted_at else None)


def _view(session: Session, patient: Patient) -> PatientView:
    live = survivor(session, patient)
    identifiers = session.scalars(select(PatientIdentifier).where(PatientIdentifier.patient_id == patient.id)
                                  .order_by(PatientIdentifier.id))
    return PatientView(
        id=patient.public_id, family_name=patient.family_name, given_names=patient.given_names,
        name_prefix=patient.name_prefix, birth_date=patient.birth_date, sex=patient.sex,
        deceased_at=utc(patient.deceased_at) if patient.deceased_at else None, nhs_number_status=patient.nhs_number_status,
        identifiers=[IdentifierView(i.system, i.value, i.type_code, i.assigner) for i in identifiers],
        merged_into=live.public_id if live.id != patient.id else None,
        merged_at=utc(patient.merged_at) if patient.merged_at else None,
        current_encounter=_current_encounter(session, live.id) if live.id == patient.id else None,
    )


def _shown(gw: Gateway, ctx: AccessContext, session: Session, patient: Patient | None, reach: str, what: str) -> PatientView:
    """The view of a patient the caller may know (audited as a Patient Record read), else NOT_FOUND (audited)."""
    live = survivor(session, patient) if patient is not None else None
    if patient is None or live is None:
        reason: str | None = "no such patient"
    elif is_placeholder(live):
        reason = "a quarantine placeholder: no feed has registered this patient"
    elif reach == "patient" and not _is_token_patient(ctx, live):
        reason = "the token's patient/ scope is for another patient"
    elif not session.scalar(select(knows_patient(ctx, gw.settings.policy, live.id))):
        reason = "no need to know this patient (specialty rule)"
    else:
        reason = None
    if reason is not None or patient is None or live is None:
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.NOT_FOUND, NOT_FOUND, audit_reason=reason or NOT_FOUND),
                                  patient_id=live.id if live is not None else None)
    view = _view(session, patient)
    access_audit.write(gw, [access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="patient",
                                                    patient_id=live.id, entities=[{"type": "patient", "id": live.id}])])
    return view


def public_id_of(gw: Gateway, patient_id: int) -> str:
    """The public id of a patient the caller already holds (e.g. the one photos were just stored under)."""
    with gw.db.read() as session:
        found = session.scalar(select(Patient.public_id).where(Patient.id == patient_id))
    if found is None:
        raise Refused(Kind.NOT_FOUND, NOT_FOUND)
    return str(found)


def by_identifier(gw: Gateway, ctx: AccessContext, identifier: tuple[str, str], what: str) -> PatientView:
    """The patient an identifier names (aliases nhs, mrn), for a caller with a need to know them."""
    reach = _reach(gw, ctx, "s", what)
    with gw.db.read() as session:
        try:
            system, value = patient_refs.resolve(session, *identifier)
            row = session.scalar(select(Patient).join(PatientIdentifier).where(PatientIdentifier.system == system,
                                                                               PatientIdentifier.value == value))
            if row is None and system != patient_refs.NHS_SYSTEM:
                patient_refs.check_known_system(session, system)
        except patient_refs.BadPatientRef as exc:
            problem = str(exc)
        else:
            return _shown(gw, ctx, session, row, reach, what)
    raise access_audit.refuse(gw, ctx, what, Refused(Kind.BAD_REQUEST, f"identifier: {problem}"))


def by_id(gw: Gateway, ctx: AccessContext, public_id: str, what: str) -> PatientView:
    """The patient with this public id, for a caller with a need to know them."""
    reach = _reach(gw, ctx, "r", what)
    with gw.db.read() as session:
        row = session.scalar(select(Patient).where(Patient.public_id == public_id)) if len(public_id) <= 32 else None
        return _shown(gw, ctx, session, row, reach, what)


@dataclass(frozen=True)
class PatientCriteria:
    """A patient search; every field narrows (None: not asked)."""

    public_ids: list[str] | None = None
    identifier: tuple[str, str] | None = None  # (system or alias, value)
    family: str | None = None  # starts with, case-insensitive (FHIR string matching)
    given: str | None = None
    birth_date: date | None = None


def search(gw: Gateway, ctx: AccessContext, criteria: PatientCriteria, *, limit: int, query: str) -> list[PatientView]:
    """The live patients matching the criteria that the caller may know (the need-to-know rule inside the query;
    a patient/ scope reaches the token's patient only), audited as a search with one entry per patient found."""
    reach = _reach(gw, ctx, "s", query)
    where = [Patient.merged_into_id.is_(None), not_(placeholder_sql()), knows_patient(ctx, gw.settings.policy, Patient.id)]
    if criteria.public_ids is not None:
        where.append(Patient.public_id.in_(sorted(set(criteria.public_ids))))
    # against the name folded by Python as the criteria are (store/models.py name_key: family^given)
    if criteria.family:
        where.append(Patient.name_key.startswith(criteria.family.lower(), autoescape=True))
    if criteria.given:
        where.append(Patient.name_key.contains("^" + criteria.given.lower(), autoescape=True))
    if criteria.birth_date is not None:
        where.append(Patient.birth_date == criteria.birth_date)
    if reach == "patient":
        named = str(ctx.subject.patient or "").removeprefix("Patient/")
        where.append(or_(Patient.public_id == named, Patient.id == int(named)) if named.isdigit() else Patient.public_id == named)
    with gw.db.read() as session:
        if criteria.identifier is not None:
            try:
                system, value = patient_refs.resolve(session, *criteria.identifier)
                if system != patient_refs.NHS_SYSTEM:
                    patient_refs.check_known_system(session, system)
            except patient_refs.BadPatientRef as exc:
                raise access_audit.refuse(gw, ctx, query, Refused(Kind.BAD_REQUEST, f"identifier: {exc}")) from None
            where.append(Patient.id.in_(select(PatientIdentifier.patient_id).where(
                PatientIdentifier.system == system, PatientIdentifier.value == value)))
        rows = list(session.scalars(select(Patient).where(*where).order_by(Patient.family_name, Patient.id).limit(limit)))
        views = [_view(session, p) for p in rows]
        row_ids = [p.id for p in rows]
    access_audit.write(gw, [access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="E", subtype="search",
                                                    patient_id=pid, entities=[{"type": "query", "id": query}])
                            for pid in row_ids])
    return views


def row_ids_of(gw: Gateway, ctx: AccessContext, public_ids: list[str]) -> list[int]:
    """The live records of the patients these public ids name (a merged id leads to its survivor), for photo
    searches: the photo policy then decides what is seen, so an unknown id is simply no match."""
    with gw.db.read() as session:
        rows = session.scalars(select(Patient).where(Patient.public_id.in_(sorted(set(public_ids)))))
        return sorted({live.id for p in rows if (live := survivor(session, p)) is not None})


def row_ids_by_identifier(gw: Gateway, ctx: AccessContext, identifier: tuple[str, str], what: str) -> list[int]:
    """The live record an identifier names (aliases nhs, mrn), for photo searches; an unknown system is refused."""
    with gw.db.read() as session:
        try:
            found = patient_refs.find(session, *identifier)
        except patient_refs.BadPatientRef as exc:
            problem = str(exc)
        else:
            return [found.id] if found is not None else []
    raise access_audit.refuse(gw, ctx, what, Refused(Kind.BAD_REQUEST, f"identifier: {problem}"))


def encounter_ids(gw: Gateway, ctx: AccessContext, visit_numbers: list[str]) -> list[int]:
    """The encounters with these visit numbers (any issuing system), for photo searches."""
    with gw.db.read() as session:
        return list(session.scalars(select(Encounter.id).where(Encounter.visit_number.in_(sorted(set(visit_numbers))))))


def included(session: Session, ctx: AccessContext, patient_ids: list[int]) -> tuple[list[PatientView], list[audit.AuditEntry]]:
    """The patients of photos the caller is being shown (a search's _include), read in the search's session: the
    photos' policy decided, and the patient/ scope is checked again. Returns the views and their audit entries (a
    Patient Record read each), for the search to write with its own."""
    reach = scope_context(ctx.subject.scopes, "Patient", "r")
    if reach is None or not patient_ids:
        return [], []  # the token may read photos, not patients: the include is left out, as FHIR allows
    rows = list(session.scalars(select(Patient).where(Patient.id.in_(sorted(set(patient_ids))))))
    if reach == "patient":
        rows = [p for p in rows if _is_token_patient(ctx, p)]
    entries = [access_audit.make_entry(ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="patient",
                                       patient_id=p.id, entities=[{"type": "patient", "id": p.id}]) for p in rows]
    return [_view(session, p) for p in rows], entries
