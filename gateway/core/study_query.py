"""The DICOM query model: patients, studies, series and instances of the photos a caller may see.

One query core for the DICOM doors (C-FIND now; QIDO-RS next): the matching rules are PS3.4 C.2.2.2 (single
value, wildcard `*` and `?`, ranges, UID lists, universal matching), the policy filter is inside the query and the
grouping is done by the database, so counts are of what the caller may see. Protocol-free: criteria and rows, no
DIMSE status or HTTP code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, case, distinct, func, or_, select
from sqlalchemy.orm import Session

from gateway.core import access_audit
from gateway.core.context import Gateway
from gateway.core.ingest.dicom_patients import NHS_ISSUER, patient_infos
from gateway.core.objects.vlphoto import PatientInfo
from gateway.core.patient_refs import NHS_SYSTEM
from gateway.core.policy.rules import AccessContext, filter_for
from store import audit
from store.models import Asset, Patient, PatientIdentifier

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
    modalities: Sequence[str] | None = None


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
    studies: int = 0  # NumberOfPatientRelatedStudies
    series: int = 0  # NumberOfStudyRelatedSeries
    instances: int = 0  # Number of ...RelatedInstances
    asset_id: str | None = None


def like_pattern(value: str) -> tuple[str, bool]:
    """A DICOM wildcard value as a LIKE pattern with `\\` as escape; whether it holds a wildcard at all."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_"), ("*" in value or "?" in value)


def text_match(column: Any, value: str, *, fold_case: bool = False) -> ColumnElement[bool]:
    pattern, wild = like_pattern(value)
    col = func.lower(column) if fold_case else column
    pattern = pattern.lower() if fold_case else pattern
    if not wild:
        return col == (value.lower() if fold_case else value)
    return col.like(pattern, escape="\\")


def _taken() -> Any:
    return func.coalesce(Asset.taken_at, Asset.created_at)


def _date_range(column: Any, r: DateRange) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if r.lower is not None:
        out.append(column >= datetime.combine(r.lower, time.min, tzinfo=timezone.utc))
    if r.upper is not None:
        out.append(column < datetime.combine(r.upper + timedelta(days=1), time.min, tzinfo=timezone.utc))
    return out


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


def _patient_where(q: StudyQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if q.patient_id:
        where.append(Asset.patient_id.in_(patients_with_id(q.patient_id, q.issuer)))
    if q.patient_name:
        # PN as family^given: match the index's name written the same way
        name = func.coalesce(Patient.family_name, "") + "^" + func.coalesce(Patient.given_names, "")
        value = q.patient_name if "^" in q.patient_name or "*" in q.patient_name else q.patient_name + "^*"
        where.append(text_match(name, value, fold_case=True))
    if q.patient_birth_date is not None:
        r = q.patient_birth_date
        if r.lower is not None:
            where.append(Patient.birth_date >= r.lower)
        if r.upper is not None:
            where.append(Patient.birth_date <= r.upper)
    return where


def _criteria(q: StudyQuery) -> list[ColumnElement[bool]]:
    where = _patient_where(q)
    if q.study_uids:
        where.append(Asset.study_uid.in_(sorted(set(q.study_uids))))
    if q.series_uids:
        where.append(Asset.series_uid.in_(sorted(set(q.series_uids))))
    if q.sop_uids:
        where.append(Asset.sop_instance_uid.in_(sorted(set(q.sop_uids))))
    if q.study_date is not None:
        where += _date_range(_taken(), q.study_date)
    if q.modalities:
        classes = [uid for uid, m in MODALITY_OF.items() if m in q.modalities]
        where.append(Asset.sop_class_uid.in_(classes) if classes else Asset.sop_class_uid.is_(None))
    return where


def find(gw: Gateway, ctx: AccessContext, q: StudyQuery, *, query: str, channel: str, limit: int = 10_000,
         offset: int = 0) -> list[Match]:
    """Every match at the query's level among the photos the caller may see, in a stable order, `offset` skipped and
    at most `limit` (paging in SQL, after the policy, so pages hold only what the caller may see); audited as a
    query, one record per patient with the photos the answer covers."""
    matches, results = search(gw, ctx, q, limit=limit, offset=offset)
    access_audit.write(gw, query_entries(ctx, results, query=query, channel=channel))
    return matches


def search(gw: Gateway, ctx: AccessContext, q: StudyQuery, *, limit: int = 10_000,
           offset: int = 0) -> tuple[list[Match], dict[int, list[str]]]:
    """find() without its audit: the matches and, by patient, the photos they cover, for a caller that writes the
    query's audit records together with its own (query_entries) in one commit."""
    where = [filter_for(ctx, gw.settings.policy), *_criteria(q)]
    with gw.db.read() as session:
        return _run(session, q, where, limit, offset)


def query_entries(ctx: AccessContext, results: dict[int, list[str]], *, query: str, channel: str) -> list[audit.AuditEntry]:
    """DICOM's own audit event for a query (DCM 110112), one record per patient in the answer."""
    return access_audit.search_entries(ctx, query=query, results=results, channel=channel, type_code=audit.QUERY)


def _run(session: Session, q: StudyQuery, where: list[ColumnElement[bool]], limit: int,
         offset: int) -> tuple[list[Match], dict[int, list[str]]]:
    base = select(Asset.patient_id).join(Patient, Patient.id == Asset.patient_id).where(*where)
    if q.level == "IMAGE":
        rows = session.execute(
            select(Asset.patient_id, Asset.id, Asset.study_uid, Asset.series_uid, Asset.sop_instance_uid, Asset.sop_class_uid,
                   Asset.instance_number, _taken()).join(Patient, Patient.id == Asset.patient_id).where(*where)
            .order_by(Asset.study_uid, Asset.series_uid, Asset.instance_number, Asset.sop_instance_uid).limit(limit).offset(offset)).all()
        patients = _patients(session, {r[0] for r in rows})
        matches = [Match(patients[r[0]], study_uid=r[2], study_started=r[7], series_uid=r[3], sop_uid=r[4], sop_class_uid=r[5],
                         instance_number=r[6], modalities=[MODALITY_OF.get(r[5], "OT")], asset_id=r[1]) for r in rows]
        results: dict[int, list[str]] = {}
        for r in rows:
            results.setdefault(r[0], []).append(r[1])
        return matches, results
    group = {"PATIENT": (Asset.patient_id,), "STUDY": (Asset.patient_id, Asset.study_uid),
             "SERIES": (Asset.patient_id, Asset.study_uid, Asset.series_uid)}[q.level]
    # which of the stored SOP classes occur in each group: one flag column each (portable, unlike string aggregates)
    flags = [func.max(case((Asset.sop_class_uid == uid, 1), else_=0)) for uid in MODALITY_OF]
    columns: list[Any] = [*group, func.min(_taken()), func.count(distinct(Asset.study_uid)), func.count(distinct(Asset.series_uid)),
                          func.count(), *flags]
    rows = session.execute(base.with_only_columns(*columns).group_by(*group).order_by(*group).limit(limit).offset(offset)).all()
    patients = _patients(session, {r[0] for r in rows})
    matches = []
    n = len(group)
    for r in rows:
        first, studies, series, instances = r[n:n + 4]
        present = [MODALITY_OF[uid] for uid, flag in zip(MODALITY_OF, r[n + 4:]) if flag]
        matches.append(Match(
            patients[r[0]], study_uid=r[1] if n > 1 else None, series_uid=r[2] if n > 2 else None, study_started=first,
            modalities=sorted(set(present)), studies=studies, series=series, instances=instances))
    # audited by patient (the photos behind a grouped answer are not listed one by one)
    return matches, {r[0]: [] for r in rows}


def _patients(session: Session, ids: set[int]) -> dict[int, PatientInfo]:
    if not ids:
        return {}
    return patient_infos(session, session.scalars(select(Patient).where(Patient.id.in_(sorted(ids)))))


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
