"""The photography worklist: the patient index's current encounters, so a camera picks the patient from a list and
its photos then match the index (PatientID + IssuerOfPatientID as the served objects carry them).

A worklist shows who is on a ward: it is filtered by the need-to-know rule for the caller's identity (a peer bound
to specialties sees the patients it cares for), inside the query, and audited as a query."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone

from sqlalchemy import ColumnElement, func, or_, select

from gateway.core import access_audit
from gateway.core.context import Gateway
from gateway.core.ingest.dicom_patients import patient_info
from gateway.core.objects.vlphoto import PatientInfo
from gateway.core.policy.rules import CURRENT_ENCOUNTER_STATUS, AccessContext, knows_patient
from gateway.core.study_query import DateRange, patients_with_id, text_match
from store import audit
from store.models import Encounter, Patient


@dataclass(frozen=True)
class WorklistQuery:
    location: str | None = None  # may hold * and ?
    specialty: str | None = None  # NHS Treatment Function code
    admitted: DateRange | None = None  # when the encounter began
    patient_id: str | None = None  # may hold * and ?
    issuer: str | None = None


@dataclass(frozen=True)
class WorklistItem:
    patient: PatientInfo
    encounter_id: int
    visit_number: str | None
    location: str | None
    specialty: str | None
    admitted_at: datetime | None
    attending: str | None


def current(gw: Gateway, ctx: AccessContext, q: WorklistQuery, *, query: str, channel: str, limit: int = 1000) -> list[WorklistItem]:
    now = datetime.now(timezone.utc)
    where: list[ColumnElement[bool]] = [
        Encounter.status == CURRENT_ENCOUNTER_STATUS,
        or_(Encounter.discharged_at.is_(None), Encounter.discharged_at > now),
        Patient.merged_into_id.is_(None),
        knows_patient(ctx, gw.settings.policy, Encounter.patient_id),
    ]
    if q.location:
        where.append(text_match(func.coalesce(Encounter.location, ""), q.location))
    if q.specialty:
        where.append(Encounter.specialty == q.specialty)
    if q.patient_id:
        where.append(Encounter.patient_id.in_(patients_with_id(q.patient_id, q.issuer)))
    if q.admitted is not None:
        if q.admitted.lower is not None:
            where.append(Encounter.admitted_at >= datetime.combine(q.admitted.lower, time.min, tzinfo=timezone.utc))
        if q.admitted.upper is not None:
            where.append(Encounter.admitted_at < datetime.combine(q.admitted.upper + timedelta(days=1), time.min, tzinfo=timezone.utc))
    with gw.db.read() as session:
        rows = list(session.execute(select(Encounter, Patient).join(Patient, Patient.id == Encounter.patient_id).where(*where)
                                    .order_by(Encounter.location, Patient.family_name, Encounter.id).limit(limit)))
        items = [WorklistItem(patient_info(session, patient), enc.id, enc.visit_number, enc.location, enc.specialty, enc.admitted_at,
                              enc.attending_name) for enc, patient in rows]
        patient_ids = {enc.patient_id for enc, _p in rows}
    access_audit.write(gw, access_audit.search_entries(ctx, query=query, results={pid: [] for pid in patient_ids},
                                                       type_code=audit.QUERY, subtype="worklist", channel=channel))
    return items
