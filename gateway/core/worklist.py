"""The photography worklist: the patient index's current encounters, so a camera picks the patient from a list and
its photos then match the index (PatientID + IssuerOfPatientID as the served objects carry them).

A worklist shows who is on a ward: it is filtered by the need-to-know rule for the caller's identity (a peer bound
to specialties sees the patients it cares for), inside the query, and audited as a query."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import ColumnElement, func, or_, select

from gateway.core import access_audit
from gateway.core.context import Gateway
from gateway.core.ingest.dicom_patients import patient_info
from gateway.core.ingest.pipeline import encounter_study_uid
from gateway.core.objects.vlphoto import PatientInfo
from gateway.core.policy.rules import CURRENT_ENCOUNTER_STATUS, AccessContext, knows_patient
from gateway.core.study_query import DateRange, patients_with_id, text_match
from store import audit
from store.models import Asset, Encounter, Patient


@dataclass(frozen=True)
class WorklistQuery:
    location: str | None = None  # may hold * and ?
    specialty: str | None = None  # NHS Treatment Function code
    admitted: DateRange | None = None  # when the encounter began
    patient_id: str | None = None  # may hold * and ?
    issuer: str | None = None
    patient_name: str | None = None  # PN (family^given), may hold * and ?; matched without regard to case
    # the time of day bounding each end of `admitted` (a step's start date and time matched as one, PS3.4
    # C.2.2.2.5.2); only with `admitted`
    admitted_times: tuple[time | None, time | None] | None = None
    attending: str | None = None  # PN as the PAS sent it, may hold * and ?


class TimeWithoutDate(ValueError):
    """A start time asked for without the start date it belongs to: not matched by itself."""


@dataclass(frozen=True)
class WorklistItem:
    patient: PatientInfo
    encounter_id: int
    visit_number: str | None
    location: str | None
    specialty: str | None
    admitted_at: datetime | None
    attending: str | None
    # the study a camera files the step's photos in: one per encounter, the same at every query (Type 1 in the
    # worklist; the photos that come back with it then group as one study)
    study_uid: str


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
    if q.patient_name:
        # PN as family^given, against the name Python folded on write (store/models.py name_key), as C-FIND's
        name = q.patient_name if "^" in q.patient_name or "*" in q.patient_name else q.patient_name + "^*"
        where.append(text_match(Patient.name_key, name.lower()))
    if q.attending:
        where.append(text_match(func.coalesce(Encounter.attending_name, ""), q.attending))
    if q.admitted_times is not None and q.admitted is None:
        raise TimeWithoutDate()
    if q.admitted is not None:
        low_time, high_time = q.admitted_times or (None, None)
        if q.admitted.lower is not None:
            where.append(Encounter.admitted_at >= _at(q.admitted.lower, low_time or time.min))
        if q.admitted.upper is not None:
            # the end exclusive: the next day, or the second after the upper time (as C-FIND's StudyTime)
            end = (_at(q.admitted.upper + timedelta(days=1), time.min) if high_time is None
                   else _at(q.admitted.upper, high_time.replace(microsecond=0)) + timedelta(seconds=1))
            where.append(Encounter.admitted_at < end)
    with gw.db.read() as session:
        rows = list(session.execute(select(Encounter, Patient).join(Patient, Patient.id == Encounter.patient_id).where(*where)
                                    .order_by(Encounter.location, Patient.family_name, Encounter.id).limit(limit)))
        # the study each encounter's photos are filed in (its first photo's, as the ingest files the next): one statement
        filed: dict[int | None, str] = {}
        for encounter_id, study_uid in session.execute(select(Asset.encounter_id, Asset.study_uid)
                                                       .where(Asset.encounter_id.in_([enc.id for enc, _p in rows]))
                                                       .order_by(Asset.created_at.desc())):
            filed[encounter_id] = study_uid  # the earliest last
        items = [WorklistItem(patient_info(session, patient), enc.id, enc.visit_number, enc.location, enc.specialty, enc.admitted_at,
                              enc.attending_name, filed.get(enc.id) or encounter_study_uid(gw.settings.uid_root, enc))
                 for enc, patient in rows]
        patient_ids = {enc.patient_id for enc, _p in rows}
    access_audit.write(gw, access_audit.search_entries(ctx, query=query, results={pid: [] for pid in patient_ids},
                                                       type_code=audit.QUERY, subtype="worklist", channel=channel))
    return items


def _at(day: date, moment: time) -> datetime:
    return datetime.combine(day, moment, tzinfo=timezone.utc)
