"""C-FIND SCP, Patient Root and Study Root: the identifier's keys become a core StudyQuery (gateway/core/study_query.py,
the policy inside it for the peer's identity), each match a pending response carrying the keys asked for."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import date, time
from fnmatch import fnmatchcase
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue

from gateway.core import access, study_query, worklist
from gateway.core.context import Gateway
from gateway.core.identity import Subject, peer_allows
from gateway.core.refusals import Kind, Refused
from gateway.core.study_query import DateRange, Match, StudyQuery
from gateway.core.worklist import WorklistItem, WorklistQuery
from gateway.dicom.command import error_comment

log = logging.getLogger("clinphoto.dicom")

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
# query/retrieve and verification messages: the two syntaxes every peer has (not deflate, not big endian)
QUERY_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
PENDING, CANCELLED, SUCCESS = 0xFF00, 0xFE00, 0x0000
NOT_AUTHORIZED = 0x0124
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # Error: Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000
# the keys query_of matches on, and how (PS3.4 C.2.2.2); the conformance statement prints these
MATCHING = {
    "PatientID": "single value, wildcard (* ?), universal; with IssuerOfPatientID",
    "IssuerOfPatientID": "single value (NHS, or an assigning authority)",
    "PatientName": "single value or wildcard (* ?), without regard to case; family^given",
    "PatientBirthDate": "single value, range",
    "StudyInstanceUID": "single value, UID list",
    "StudyDate": "single value, range (the date the photos were taken)",
    "ModalitiesInStudy": "single value, list (XC, DMS, OT)",
    "SeriesInstanceUID": "single value, UID list",
    "Modality": "single value, list",
    "SOPInstanceUID": "single value, UID list",
}
MATCHING_UNHELD = {"StudyTime": "with StudyDate, as one date-time range (the time the first photo was taken)",
                   **{key: "held by no study here: a value matches nothing" for key in study_query.UNHELD_KEYS}}
# the keys answer() fills, by level (any other key asked for is returned empty)
RETURN_KEYS = {
    "PATIENT": ["PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies"],
    "STUDY": ["StudyInstanceUID", "StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"],
    "SERIES": ["SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"],
    "IMAGE": ["SOPInstanceUID", "SOPClassUID", "InstanceNumber"],
}
LEVELS = {PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"), STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE")}


class BadIdentifier(ValueError):
    """The identifier asks what this SOP class cannot answer (a level, a malformed range)."""


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None  # absent or universal matching
    text = str(value).strip()
    return None if text in ("", "*") else text


def _uids(ds: Dataset, keyword: str) -> list[str] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, MultiValue) else str(value).split("\\")
    return [str(v).strip() for v in values if str(v).strip()] or None


def _date(text: str) -> date:
    return date(int(text[0:4]), int(text[4:6]), int(text[6:8]))


def _range(ds: Dataset, keyword: str) -> DateRange | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        if "-" not in text:
            day = _date(text)
            return DateRange(day, day)
        low, high = text.split("-", 1)
        return DateRange(_date(low) if low else None, _date(high) if high else None)
    except (ValueError, IndexError):
        raise BadIdentifier(f"{keyword} {text!r} is not a DICOM date or date range (YYYYMMDD, A-B, -B, A-)") from None


def query_of(ds: Dataset, sop_class: str) -> StudyQuery:
    level = str(ds.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS.get(sop_class, ()):
        raise BadIdentifier(f"QueryRetrieveLevel {level!r} is not one of {', '.join(LEVELS.get(sop_class, ()))} for this model")
    modalities = _uids(ds, "ModalitiesInStudy") or _uids(ds, "Modality")
    study_date, study_times = _range(ds, "StudyDate"), _time_range(ds, "StudyTime")
    if study_times is not None and study_date is None:
        raise BadIdentifier("StudyTime is matched with a StudyDate (as one date-time range)")
    return StudyQuery(
        level=level,  # type: ignore[arg-type]  # checked against LEVELS above
        patient_id=_text(ds, "PatientID"), issuer=_text(ds, "IssuerOfPatientID"), patient_name=_text(ds, "PatientName"),
        patient_birth_date=_range(ds, "PatientBirthDate"), study_uids=_uids(ds, "StudyInstanceUID"),
        series_uids=_uids(ds, "SeriesInstanceUID"), sop_uids=_uids(ds, "SOPInstanceUID"),
        study_date=study_date, study_times=study_times, modalities=modalities,
        unheld=tuple(k for k in study_query.UNHELD_KEYS if _text(ds, k) is not None),
    )


def _pn(info: Any) -> str:
    return "^".join(x or "" for x in (info.family, info.given, None, info.prefix)).rstrip("^")


def answer(identifier: Dataset, match: Match, ae_title: str) -> Dataset:
    """The keys the peer asked for, filled from the match (a key we do not hold stays empty, as PS3.4 allows)."""
    values = study_query.attributes(match)
    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"  # names from the index are UTF-8
    out.QueryRetrieveLevel = identifier.QueryRetrieveLevel
    out.RetrieveAETitle = ae_title
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        value = values.get(keyword)
        setattr(out, keyword, value if value is not None else "")
    return out


def _time_range(ds: Dataset, keyword: str) -> tuple[time | None, time | None] | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        return study_query.parse_time_range(text)
    except ValueError:
        raise BadIdentifier(f"{keyword} {text!r} is not a DICOM time or time range (HHMMSS, A-B, -B, A-)") from None


def worklist_query(ds: Dataset) -> WorklistQuery:
    step = ds.ScheduledProcedureStepSequence[0] if ds.get("ScheduledProcedureStepSequence") else Dataset()
    modality = _text(step, "Modality")
    if modality is not None and not any(fnmatchcase(ours, modality) for ours in PHOTOGRAPHY):
        raise NoPhotography  # a single value or a wildcard (PS3.4 C.2.2.2) naming another modality
    return WorklistQuery(
        location=_text(step, "ScheduledProcedureStepLocation") or _text(ds, "CurrentPatientLocation"),
        admitted=_range(step, "ScheduledProcedureStepStartDate"),
        admitted_times=_time_range(step, "ScheduledProcedureStepStartTime"),
        patient_id=_text(ds, "PatientID"), issuer=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"), attending=_text(step, "ScheduledPerformingPhysicianName"),
    )


def _station(ds: Dataset, caller: str) -> str:
    """The steps are for any station: answered as for the station asked about (a value, not a pattern), else for the
    camera asking."""
    step = ds.ScheduledProcedureStepSequence[0] if ds.get("ScheduledProcedureStepSequence") else Dataset()
    asked = _text(step, "ScheduledStationAETitle")
    return asked if asked and not any(c in asked for c in "*?\\") else caller


PHOTOGRAPHY = ("XC", "DMS")  # the modalities of the steps this worklist holds (DICOM's * and ? are fnmatch's)


class NoPhotography(Exception):
    """A worklist query for another modality: this worklist holds photography steps only (no match)."""


def worklist_answer(identifier: Dataset, item: WorklistItem, station: str) -> Dataset:
    """A scheduled procedure step for photography per current encounter, with the keys the camera asked for.
    `station`: the AE title the step is answered as scheduled for (steps are for any station)."""
    p = item.patient
    admitted = item.admitted_at
    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"
    values: dict[str, Any] = {
        "PatientID": p.patient_id, "IssuerOfPatientID": p.issuer, "PatientName": _pn(p),
        "PatientBirthDate": p.birth_date.strftime("%Y%m%d") if p.birth_date else "",
        "PatientSex": p.sex if p.sex in ("M", "F", "O") else "",
        "AdmissionID": item.visit_number or "", "CurrentPatientLocation": item.location or "",
        "AccessionNumber": "", "RequestedProcedureID": f"ENC{item.encounter_id}", "StudyInstanceUID": item.study_uid,
        "RequestedProcedureDescription": "Clinical photography",
    }
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("SpecificCharacterSet", "ScheduledProcedureStepSequence"):
            continue
        setattr(out, keyword, values.get(keyword, ""))
    step = Dataset()
    step.Modality = "XC"
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = admitted.strftime("%Y%m%d") if admitted else ""
    step.ScheduledProcedureStepStartTime = admitted.strftime("%H%M%S") if admitted else ""
    step.ScheduledProcedureStepID = f"ENC{item.encounter_id}"
    step.ScheduledProcedureStepDescription = f"Clinical photography ({item.specialty or 'any specialty'})"
    step.ScheduledProcedureStepLocation = item.location or ""
    step.ScheduledPerformingPhysicianName = item.attending or ""
    out.ScheduledProcedureStepSequence = [step]
    return out


def _worklist(gw: Gateway, subject: Subject, identifier: Dataset, what: str) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    try:
        query = worklist_query(identifier)
    except NoPhotography:
        yield SUCCESS, None
        return
    ctx = access.screen(gw, subject, what)
    try:
        items = worklist.current(gw, ctx, query, query=f"{what} {query}", channel="dimse")
    except worklist.TimeWithoutDate:
        raise BadIdentifier("ScheduledProcedureStepStartTime is matched with a ScheduledProcedureStepStartDate") from None
    station = _station(identifier, subject.peer.ae_title if subject.peer is not None else "")
    for item in items:
        yield PENDING, worklist_answer(identifier, item, station)
    yield SUCCESS, None


def on_find(gw: Gateway, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """pynetdicom's EVT_C_FIND handler: pending answers, then success; a cancel is honoured between answers."""
    subject: Subject | None = getattr(event.assoc, "clinphoto_subject", None)
    if subject is None or subject.peer is None:
        yield NOT_AUTHORIZED, None
        return
    what = f"C-FIND {subject.peer.ae_title} {event.request.AffectedSOPClassUID}"
    if not peer_allows(subject, "find"):
        access.refuse(gw, subject, what, Refused(Kind.FORBIDDEN, "this AE may not query here (find is not among its services)"))
        yield NOT_AUTHORIZED, None
        return
    identifier = event.identifier
    if str(event.request.AffectedSOPClassUID) == MODALITY_WORKLIST_FIND:
        try:
            yield from _worklist(gw, subject, identifier, what)
        except BadIdentifier as exc:
            access.refuse(gw, subject, what, Refused(Kind.BAD_REQUEST, str(exc)))
            failure = Dataset()
            failure.Status = IDENTIFIER_DOES_NOT_MATCH
            failure.ErrorComment = error_comment(str(exc))
            yield failure, None
        except Refused:
            yield NOT_AUTHORIZED, None
        return
    try:
        query = query_of(identifier, str(event.request.AffectedSOPClassUID))
        ctx = access.photo_request(gw, subject, "search", what)
        matches = study_query.find(gw, ctx, query, query=f"{what} {query}", channel="dimse")
    except BadIdentifier as exc:
        access.refuse(gw, subject, what, Refused(Kind.BAD_REQUEST, str(exc)))
        failure = Dataset()  # a status data set: the status with an ErrorComment saying why
        failure.Status = IDENTIFIER_DOES_NOT_MATCH
        failure.ErrorComment = error_comment(str(exc))
        yield failure, None
        return
    except Refused:
        yield NOT_AUTHORIZED, None
        return
    for match in matches:
        if event.is_cancelled:
            yield CANCELLED, None
            return
        yield PENDING, answer(identifier, match, gw.settings.ae_title)
    yield SUCCESS, None
