"""The one ingest pipeline every door calls (HTTP upload, CLI import, demo, later C-STORE and STOW-RS).

    ingest(gw, CaptureRequest) -> IngestResult          (gateway/core/ingest/request.py)

1. before any look-up: the consent captured with the photos is checked by the
   consent writer's rules, each received DICOM object's header by received.read
   (SOP class, transfer syntax, pixel description, size limits);
2. resolve the patient (the request's reference, or the objects' PatientID and
   IssuerOfPatientID, through merges), encounter and consent id; replay an idempotency key;
3. per item, outside any transaction: check and derive (prepare.py for an image
   file, received.py for a DICOM object), then write its blobs:
   - image file: the original if kept, the DICOM VL Photographic object built from
     it, preview, thumbnail;
   - DICOM object: the object as received (it is both the original and the stored
     object), preview, thumbnail;
4. one write transaction: asset rows, the consent captured with them (through the
   one consent writer, consents.record_consent, scope 'photos'), one audit record per
   photo, the idempotency record — all or nothing. If it fails, no row exists and
   the blobs this call created (and nothing else references) are removed.

A DICOM object under the SOP Instance UID of a stored one whose pixels did not decode
(rendition_state FAILED, found after the answer by deferred.py) is its correction, not a
duplicate: it replaces that asset's object in place (_Correction, _replace), so the
known-bad copy does not block its own resend for good. Only for the same patient, study,
series and SOP class; any other content under a known UID is still DUPLICATE_INSTANCE.
The superseded blob is deleted only after the commit that stops naming it.

Refusals raise IngestRejected (nothing stored) after writing a failure audit record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.core import nhs, patient_refs, routing
from gateway.core.access_audit import fit
from gateway.core.consents import ConsentError, check_consent, record_consent
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.ingest import limits, received
from gateway.core.ingest.blob_writer import BlobWriter
from gateway.core.ingest.dicom_patients import (
    NHS_ISSUER,
    find_by_dicom_id,
    info_for_unregistered,
    is_placeholder,
    patient_info,
    placeholder_identifier,
)
from gateway.core.ingest.dicom_values import sender_uid
from gateway.core.ingest.digests import Early, sha1_base64, sha256_of
from gateway.core.ingest.errors import (
    BAD_METADATA,
    DUPLICATE_INSTANCE,
    FORBIDDEN,
    IDEMPOTENCY_CONFLICT,
    INSUFFICIENT_SCOPE,
    NO_FILES,
    PATIENT_MERGED,
    PATIENT_MISMATCH,
    UNKNOWN_CONSENT,
    UNKNOWN_ENCOUNTER,
    UNKNOWN_PATIENT,
    IngestRejected,
)
from gateway.core.ingest.prepare import Prepared, prepare
from gateway.core.ingest.renditions import DUE, FAILED, Renditions
from gateway.core.ingest.request import (
    NHS_SYSTEM,
    CaptureRequest,
    Channel,
    Governance,
    ImageFile,
    PatientRef,
    ReceivedObject,
    Source,
)
from gateway.core.ingest_settings import IngestSettings
from gateway.core.objects import part10, vlphoto
from gateway.core.objects.uids import stable_uid
from gateway.core.policy.rules import scope_allows, uncovered_for_care
from store import audit
from store.models import Asset, Consent, ConsentAsset, Encounter, IdempotencyKey, Patient
from store.patients import survivor

log = logging.getLogger(__name__)

CREATED = "created"
EXISTING = "existing"
REPLACED = "replaced"  # the object of a stored asset whose pixels did not decode, replaced by its resend
_TAKEN_OUT = "entered-in-error"  # access.ENTERED_IN_ERROR (not imported here: access imports the pipeline's helpers)
# the consent writer names its arguments; a refusal names the capture request's field
_CONSENT_FIELDS = {"level": "consent.level", "given_by": "consent.given_by", "captured_by": "consent.captured_by",
                   "consent_date": "consent.date", "purpose_note": "consent.purpose"}


@dataclass
class StoredPhoto:
    asset_id: str
    status: str  # created | existing | replaced
    sha256: str
    media_type: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    width: int | None
    height: int | None
    filename: str | None = None
    transfer_syntax: str | None = None
    quarantined: bool = False


@dataclass
class IngestResult:
    patient_id: int
    photos: list[StoredPhoto] = field(default_factory=list)
    consent_id: str | None = None
    replayed: bool = False  # answered from an earlier request with the same idempotency key

    @property
    def created(self) -> bool:
        return any(p.status == CREATED for p in self.photos) and not self.replayed

    def to_dict(self) -> dict[str, Any]:
        return {
            "patient_id": self.patient_id,
            "consent_id": self.consent_id,
            "photos": [asdict(p) for p in self.photos],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], replayed: bool = False) -> IngestResult:
        return cls(
            patient_id=data["patient_id"], consent_id=data.get("consent_id"),
            photos=[StoredPhoto(**p) for p in data["photos"]], replayed=replayed,
        )


@dataclass(frozen=True)
class _Item:
    """One item of the request with its hash, and for a DICOM object what its header says."""

    index: int
    item: ImageFile | ReceivedObject
    sha256: str
    received: received.Received | None = None
    early: Early | None = None  # a spooled object's SHA-1 and write-back, under way (digests.py)

    @property
    def filename(self) -> str | None:
        return self.item.filename

    @property
    def sender_uid(self) -> str | None:
        """The SOP Instance UID the sender gave (kept), if any."""
        if self.received is not None:
            return self.received.sop_instance_uid
        return self.item.sop_instance_uid if isinstance(self.item, ImageFile) else None


@dataclass(frozen=True)
class _Context:
    """Plain values read in the look-up session (its rows are gone when it closes)."""

    patient_id: int | None  # None: quarantine under a placeholder patient
    patient: PatientRef  # the reference the patient was found (or not found) by
    holder_id: int | None  # quarantine: the placeholder patient the photos go under, if one was made already
    encounter_id: int | None
    visit_number: str | None
    encounter_specialty: str | None
    consent_id: str | None
    files: _FileSeries | None  # None: no image files in the request (DICOM objects keep their own everything)


@dataclass(frozen=True)
class _FileSeries:
    """Where a request's image files go, and the patient module their DICOM objects are written with. Read only for a
    request with image files: for a C-STORE's object, three statements (~1.5 ms of its ~3 ms look-up, traced) whose
    answers nothing used."""

    patient_info: vlphoto.PatientInfo
    study_uid: str
    series_uid: str
    study_started: datetime | None
    series_number: int
    first_instance: int


@dataclass(frozen=True)
class _Correction:
    """A stored asset whose pixels did not decode, named again by a resend's SOP Instance UID: the resend's object
    replaces its own (see _replace); read in the look-up session, checked again by the update."""

    asset_id: str
    patient_id: int
    sha256: str
    superseded: tuple[str, ...]  # the asset's blobs the replacement stops naming
    quarantined: bool


class _ChangedMeanwhile(Exception):
    """The asset a correction was for changed between the look-up and the write (replaced by a concurrent resend,
    merged, taken out): answered as a race is, by one more pass."""


# --- look-ups -------------------------------------------------------------------


def _same_patient_key(ref: PatientRef) -> PatientRef:
    """An NHS number sent as DICOM (issuer NHS) and as an identifier name one patient (compared, not looked up)."""
    if ref.kind == "dicom" and (ref.issuer or "").upper() == NHS_ISSUER:
        return PatientRef(system=NHS_SYSTEM, value=nhs.normalise(ref.value or ""))
    return ref


def _find(session: Session, ref: PatientRef) -> Patient | None:
    """The live patient a reference names, through merges; None when the index does not know it."""
    if ref.kind == "internal":
        row = session.get(Patient, ref.internal_id)
        return survivor(session, row) if row is not None else None
    if ref.kind == "dicom":
        return find_by_dicom_id(session, ref)
    try:
        return patient_refs.find(session, ref.system or "", ref.value or "")
    except patient_refs.BadPatientRef as exc:
        raise IngestRejected(BAD_METADATA, f"invalid metadata: 'patient': {exc}", field="patient") from None


def _target_patient(session: Session, gw: Gateway, request: CaptureRequest,
                    objects: Sequence[received.Received]) -> tuple[PatientRef, Patient | None, Patient | None]:
    """The one patient of the request: its own reference and every object's must agree. Unknown: refused,
    or (ingest.quarantine_unknown_patients) None, to be filed under a placeholder (the third value: the placeholder
    an earlier photo of this unknown patient made, if any). A placeholder is not a registered patient: a second
    photo naming its identifier is quarantined under it as the first was (it was stored active under it)."""
    by_key: dict[PatientRef, PatientRef] = {}  # one reference per patient named, as first given
    for ref in ([request.patient] if request.patient is not None else []) + [o.patient for o in objects]:
        by_key.setdefault(_same_patient_key(ref), ref)
    refs = list(by_key.values())
    if not refs:
        raise IngestRejected(BAD_METADATA, "the request names no patient: image files need one (system|value)",
                             field="patient")
    found = [(ref, _find(session, ref)) for ref in refs]
    known = {p.id for _, p in found if p is not None}
    unknown = [ref for ref, p in found if p is None]
    if len(known) > 1 or (known and unknown) or len(unknown) > 1:
        raise IngestRejected(
            PATIENT_MISMATCH,
            "the items of one request must all be of one patient, but they name "
            f"{'; '.join(ref.label() for ref in refs)}: send each patient's photos separately",
            field="patient",
        )
    holder = None
    if known:
        ref, patient = next((r, p) for r, p in found if p is not None)
        if not is_placeholder(patient):
            return ref, patient, None
        holder = patient
    else:
        ref = unknown[0]
    if not gw.settings.ingest.quarantine_unknown_patients or ref.kind == "internal":
        raise IngestRejected(
            UNKNOWN_PATIENT, f"unknown patient {ref.label()}: no patient with this identifier is registered",
            field="patient",
        )
    return ref, None, holder


def _resolve(session: Session, gw: Gateway, request: CaptureRequest, objects: Sequence[received.Received],
             session_key: str, files: bool) -> _Context:
    gov = request.governance
    ref, patient, holder = _target_patient(session, gw, request, objects)
    label = ref.label()
    encounter = None
    if gov.encounter:
        if patient is None:
            raise IngestRejected(UNKNOWN_ENCOUNTER, f"unknown encounter {gov.encounter!r}: the patient is not registered",
                                 field="encounter")
        candidates = session.execute(select(Encounter).where(Encounter.visit_number == gov.encounter)).scalars().all()
        mine = [e for e in candidates if survivor(session, session.get_one(Patient, e.patient_id)).id == patient.id]
        if not mine:
            raise IngestRejected(UNKNOWN_ENCOUNTER, f"unknown encounter {gov.encounter!r} for patient {label}",
                                 field="encounter")
        encounter = mine[0]
    consent = None
    if gov.consent_id:
        consent = session.get(Consent, gov.consent_id)
        owner = survivor(session, session.get_one(Patient, consent.patient_id)) if consent else None
        if consent is None or patient is None or owner is None or owner.id != patient.id:
            raise IngestRejected(UNKNOWN_CONSENT, f"unknown consent {gov.consent_id!r} for patient {label}", field="consent_id")
        if consent.status != "active":
            raise IngestRejected(UNKNOWN_CONSENT, f"consent {gov.consent_id!r} is {consent.status}, not active",
                                 field="consent_id")

    return _Context(
        patient_id=patient.id if patient is not None else None, patient=ref,
        holder_id=holder.id if holder is not None else None,
        encounter_id=encounter.id if encounter else None, visit_number=encounter.visit_number if encounter else None,
        encounter_specialty=encounter.specialty if encounter else None, consent_id=consent.id if consent else None,
        files=_file_series(session, gw, request, patient, ref, encounter, session_key) if files else None,
    )


def encounter_study_uid(root: str, encounter: Encounter) -> str:
    """The study an encounter's photos are filed in until the first is (then that photo's study): the same for an
    upload and for a camera that took it from the worklist."""
    return stable_uid(root, "study", "encounter", encounter.visit_system, encounter.visit_number)


def _file_series(session: Session, gw: Gateway, request: CaptureRequest, patient: Patient | None, ref: PatientRef,
                 encounter: Encounter | None, session_key: str) -> _FileSeries:
    """Image files: a study per encounter (or capture session), a series per capture session."""
    label = ref.label()
    root = gw.settings.uid_root
    started = encounter.admitted_at if encounter is not None else None
    if request.study_uid:
        study_uid = request.study_uid
    elif encounter is not None:
        study_uid = session.execute(
            select(Asset.study_uid).where(Asset.encounter_id == encounter.id).order_by(Asset.created_at).limit(1)
        ).scalar_one_or_none() or encounter_study_uid(root, encounter)
    else:
        study_uid = stable_uid(root, "study", "session", session_key, label)
    series_uid = request.series_uid or stable_uid(root, "series", session_key, label)
    known_series = list(session.execute(select(Asset.series_uid).where(Asset.study_uid == study_uid).distinct()).scalars())
    series_number = (known_series.index(series_uid) + 1) if series_uid in known_series else len(known_series) + 1
    first_instance = (
        session.execute(select(func.max(Asset.instance_number)).where(Asset.series_uid == series_uid)).scalar() or 0
    ) + 1
    return _FileSeries(
        patient_info=patient_info(session, patient) if patient is not None else info_for_unregistered(ref),
        study_uid=study_uid, series_uid=series_uid, study_started=started, series_number=series_number,
        first_instance=first_instance,
    )


def _known_instances(session: Session, items: Sequence[_Item], existing: dict[str, StoredPhoto],
                     blob_path: Callable[[str], Path], patient_id: int | None,
                     settings: IngestSettings) -> dict[str, _Correction]:
    """Items whose sender's SOP Instance UID is already stored: the same object again is 'existing' (added to
    `existing` under the item's hash); a correction of an asset whose pixels did not decode is returned under the
    item's hash (see _correction); other content under a known UID is DUPLICATE_INSTANCE."""
    by_uid: dict[str, _Item] = {}
    for entry in items:
        uid = entry.sender_uid
        if uid is None:
            continue
        other = by_uid.setdefault(uid, entry)
        if other.sha256 != entry.sha256:
            raise IngestRejected(DUPLICATE_INSTANCE, f"SOP Instance UID {uid} is used by two different items of this request",
                                 item=entry.index, filename=entry.filename, field="SOPInstanceUID")
    corrections: dict[str, _Correction] = {}
    if not by_uid:
        return corrections
    for asset in session.execute(select(Asset).where(Asset.sop_instance_uid.in_(list(by_uid)))).scalars():
        entry = by_uid[asset.sop_instance_uid]
        if entry.sha256 in existing or asset.sha256 == entry.sha256:
            existing.setdefault(entry.sha256, _as_existing(asset))
            continue
        if entry.received is not None and _same_data_set(entry.received.path, blob_path(asset.sha256)):
            existing[entry.sha256] = _as_existing(asset)  # relayed by another sender: only the file meta differs
            continue
        correction = _correction(asset, entry, patient_id, blob_path, settings)
        if correction is None:
            raise IngestRejected(
                DUPLICATE_INSTANCE, f"SOP Instance UID {asset.sop_instance_uid} is already stored with different content",
                item=entry.index, filename=entry.filename, field="SOPInstanceUID",
            )
        corrections[entry.sha256] = correction
    return corrections


def _correction(asset: Asset, entry: _Item, patient_id: int | None,
                blob_path: Callable[[str], Path], settings: IngestSettings) -> _Correction | None:
    """The resend as a correction of `asset`, or None when it is not one. Only an asset whose pixels are known not to
    decode is replaced (one that decoded is what readers have seen: other content under its UID stays a duplicate),
    and only by an object of the same patient (a correction never moves a photo between patients), study, series and
    SOP class (the row keeps those, and the new object must say the same as the row), describing the same photo as
    the superseded object's header did (_described: the row keeps what it took from there, so a resend saying
    another side or time would be served as DICOM saying one thing and as FHIR or REST saying another)."""
    obj = entry.received
    if asset.rendition_state != FAILED or obj is None or patient_id is None or asset.patient_id != patient_id:
        return None
    if asset.status == _TAKEN_OUT:  # out of the record: its UID is not a way back in ('replaced' would say stored)
        return None
    if (obj.study_uid, obj.series_uid, obj.sop_class_uid) != (asset.study_uid, asset.series_uid, asset.sop_class_uid):
        return None
    try:
        old = received.read(blob_path(asset.dicom_sha256 or asset.sha256), settings, check_limits=False)
    except (IngestRejected, OSError):  # the superseded header unreadable now: no telling it is the same photo
        return None
    if _described(obj) != _described(old):
        return None
    superseded = {asset.sha256, asset.dicom_sha256, asset.preview_sha256, asset.thumbnail_sha256} - {None, entry.sha256}
    return _Correction(asset_id=asset.id, patient_id=asset.patient_id, sha256=asset.sha256,
                       superseded=tuple(sorted(s for s in superseded if s)), quarantined=asset.status == "quarantined")


def _described(obj: received.Received) -> tuple[object, ...]:
    """What a received object's header says of the photo that the row keeps (see _new_object_row, _OBJECT_COLUMNS)."""
    return obj.taken_at, obj.body_site, obj.laterality, obj.instance_number, obj.device, obj.operator


def _same_data_set(path: Path, stored: Path) -> bool:
    try:
        return part10.data_set_digest(path) == part10.data_set_digest(stored)
    except (part10.Part10Error, OSError):
        return False


def _files_of(ctx: _Context) -> _FileSeries:
    if ctx.files is None:  # _resolve reads them for every request with an image file
        raise RuntimeError("an image file in a request resolved without its study and series")
    return ctx.files


def _write_dicom(gw: Gateway, prepared: Prepared, ctx: _Context, gov: Governance, sop_uid: str, instance: int,
                 writer: BlobWriter) -> tuple[str, int, str]:
    facts = prepared.facts
    series = _files_of(ctx)
    comments = "; ".join(x for x in (f"View: {gov.view}" if gov.view else None, gov.description) if x) or None
    site = gov.body_site
    ds = vlphoto.build_dataset(
        pixels=prepared.pixels,
        patient=series.patient_info,
        study=vlphoto.StudyInfo(
            uid=series.study_uid, started=series.study_started,
            study_id=(ctx.visit_number or "PHOTO")[:16],
            referring_physician="",
        ),
        series=vlphoto.SeriesInfo(uid=series.series_uid, number=series.series_number, description="Clinical photographs",
                                  operator=gov.photographer),
        image=vlphoto.ImageInfo(
            sop_instance_uid=sop_uid, instance_number=instance, taken_at=_instant(facts.taken_at or gov.taken_at),
            comments=comments, derived=prepared.derived, derivation=prepared.derivation,
        ),
        equipment=vlphoto.Equipment(manufacturer=facts.make, model=facts.model or gov.device, software=facts.software),
        body_site=vlphoto.BodySite(site.code, site.meaning, site.laterality) if site else None,
        uid_root=gw.settings.uid_root,
    )
    ts, chunks = vlphoto.part10_chunks(ds, prepared.pixels, gw.settings.uid_root)
    ref = writer.put_new_stream(chunks)
    return ref.sha256, ref.size, ts


# --- audit and the caller -------------------------------------------------------------------------------


def audit_refusal(gw: Gateway, source: Source, exc: IngestRejected, patient_id: int | None,
                  outcome: str = audit.MINOR_FAILURE) -> None:
    try:
        with gw.db.write() as session:
            # fit: the refusal must be recordable whatever the caller sent (long values, NUL bytes)
            audit.append(session, fit(audit.AuditEntry(
                type_code=audit.IMPORT, action="C", subtype=source.channel.value, outcome=outcome,
                outcome_desc=exc.message[:1000], agent_who=source.who, agent_role=source.role,
                agent_network=source.network, purpose_of_use=source.purpose_of_use, patient_id=patient_id,
                entities=[{"type": "patient", "id": patient_id}] if patient_id else [],
                detail={"source": source.channel.value, "code": exc.code, "item": exc.item, "filename": exc.filename},
            )))
    except Exception:  # the refusal itself must still reach the caller
        log.exception("could not audit a refused upload")


def uploader(gw: Gateway, subject: Subject, channel: Channel = Channel.UPLOAD) -> Source:
    """The source photos are stored as; a role not allowed to store photos, or a token whose SMART scopes do not
    allow creating them (e.g. user/Media.c), is refused with the refusal audited."""
    source = Source.user(subject, channel)
    roles = gw.settings.ingest.upload_roles
    if subject.role not in roles:
        refusal = IngestRejected(FORBIDDEN, f"role {subject.role!r} may not upload photos (allowed: {', '.join(roles)})")
    elif not scope_allows(subject.scopes, "Media", "c"):  # SMART scopes only narrow
        refusal = IngestRejected(INSUFFICIENT_SCOPE, "the token's scopes do not allow 'c' on Media")
    else:
        return source
    audit_refusal(gw, source, refusal, None)
    raise refusal


def uncovered(gw: Gateway, result: IngestResult) -> set[str]:
    """The stored photos no consent covers for care: stored, but hidden until a consent is recorded (the doors
    warn the sender now rather than leave a later 404 unexplained)."""
    with gw.db.read() as session:
        return uncovered_for_care(session, gw.settings.policy, [p.asset_id for p in result.photos])


def _request_hash(request: CaptureRequest, shas: list[str]) -> str:
    patient = request.patient.label() if request.patient is not None else ""
    text = json.dumps([patient, request.governance.canonical(), shas], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _consent_refusal(exc: ConsentError) -> IngestRejected:
    where = _CONSENT_FIELDS.get(exc.field or "", "consent")
    return IngestRejected(BAD_METADATA, f"invalid metadata: {where!r}: {exc}", field=where)


def _check_consent(request: CaptureRequest) -> None:
    """The consent writer's rules, before anything is stored (the writer applies them again when it records)."""
    given = request.governance.consent
    if given is None:
        return
    try:
        check_consent(level=given.level, given_by=given.given_by, captured_by=given.captured_by or request.source.who,
                      consent_date=given.date, scope="photos", purpose_note=given.purpose)
    except ConsentError as exc:
        raise _consent_refusal(exc) from None


def _check_sender_uids(request: CaptureRequest) -> None:
    """The UIDs a door keeps from its sender for image files, checked as a received object's own are (dicom_values)."""
    if request.study_uid is not None:
        sender_uid(request.study_uid, "StudyInstanceUID")
    if request.series_uid is not None:
        sender_uid(request.series_uid, "SeriesInstanceUID")
    for index, item in enumerate(request.items):
        if isinstance(item, ImageFile) and item.sop_instance_uid is not None:
            try:
                sender_uid(item.sop_instance_uid, "SOPInstanceUID")
            except IngestRejected as exc:
                raise exc.for_item(index, item.filename) from None


def _read_items(gw: Gateway, request: CaptureRequest) -> list[_Item]:
    """Every item with its hash; DICOM objects' headers checked (nothing is decoded)."""
    items: list[_Item] = []
    # a received object rendered after the answer gets its SHA-1 then too (deferred.py): not worked out here
    want_sha1 = gw.settings.ingest.received_renditions == "before-answer"
    for index, item in enumerate(request.items):
        if item.received_size is not None:  # nothing kept: refused for its size before anything reads the file
            try:
                limits.check_size(item.received_size, gw.settings.ingest.max_bytes)
            except IngestRejected as exc:
                raise exc.for_item(index, item.filename) from None
        if isinstance(item, ReceivedObject):
            # hashed while the header is read
            early = Early(item.path, item.sha256, want_sha1=want_sha1) if item.spooled else None
            try:
                header = received.read(item.path, gw.settings.ingest, head=item.head)
            except IngestRejected as exc:
                raise exc.for_item(index, item.filename) from None
            sha = early.sha256() if early is not None else item.sha256 or sha256_of(item.path)
            items.append(_Item(index, item, sha, header, early))
        else:
            items.append(_Item(index, item, item.sha256 or sha256_of(item.path)))
    if request.patient is None and any(e.received is None for e in items):
        raise IngestRejected(BAD_METADATA, "image files need the request to name their patient (system|value)",
                             field="patient")
    return items


# --- the pipeline ---------------------------------------------------------------


def ingest(gw: Gateway, request: CaptureRequest, *, _retry: bool = True) -> IngestResult:
    """Store a capture request's photos for one patient as one capture session; all or nothing.

    Image files get a study per encounter or capture session and a series per capture session
    under settings.uid_root (or the request's study/series UIDs); a DICOM object keeps its own.
    """
    with gw.ingesting():  # a sender waits: the renderer gives way (deferred.Renderer), however the ingest ends
        return _ingest(gw, request, _retry=_retry)


def _ingest(gw: Gateway, request: CaptureRequest, *, _retry: bool) -> IngestResult:
    source = request.source
    if not request.items:
        raise IngestRejected(NO_FILES, "no image files in the request", field="files")
    session_key = request.session_key or (request.idempotency_key and f"{source.who}|{request.idempotency_key}") \
        or uuid.uuid4().hex
    patient_id: int | None = None
    try:
        _check_consent(request)
        _check_sender_uids(request)
        items = _read_items(gw, request)
        shas = [e.sha256 for e in items]
        request_hash = _request_hash(request, shas)
        with gw.db.read() as session:
            if request.idempotency_key:
                seen = session.get(IdempotencyKey, (source.who, request.idempotency_key))
                if seen is not None:
                    if seen.request_hash != request_hash:
                        raise IngestRejected(
                            IDEMPOTENCY_CONFLICT,
                            f"Idempotency-Key {request.idempotency_key!r} was already used for a different request",
                            field="Idempotency-Key",
                        )
                    return IngestResult.from_dict(seen.response, replayed=True)
            ctx = _resolve(session, gw, request, [e.received for e in items if e.received is not None], session_key,
                           files=any(e.received is None for e in items))
            patient_id = ctx.patient_id
            filed_under = patient_id if patient_id is not None else ctx.holder_id  # a placeholder's repeats too
            existing: dict[str, StoredPhoto] = {}
            if filed_under is not None:
                rows = session.execute(select(Asset).where(Asset.patient_id == filed_under, Asset.sha256.in_(shas))).scalars()
                existing = {a.sha256: _as_existing(a) for a in rows}
            corrections = _known_instances(session, items, existing, gw.blobs.path, filed_under, gw.settings.ingest)
    except IngestRejected as exc:
        audit_refusal(gw, source, exc, patient_id)
        raise

    writer = BlobWriter(gw)
    prepared: list[Prepared] = []
    try:
        result = _store(gw, request, items, ctx, existing, corrections, prepared, writer, session_key, request_hash)
    except (IntegrityError, _ChangedMeanwhile):
        # a concurrent request stored the same content (or used the same key, or corrected the same photo) first:
        # answer as it did
        writer.remove_unreferenced()
        _close_all(prepared)
        if not _retry:
            raise
        return _after_race(gw, request)
    except IngestRejected as exc:
        writer.remove_unreferenced()
        _close_all(prepared)
        audit_refusal(gw, source, exc, patient_id)
        raise
    except BaseException as exc:
        writer.remove_unreferenced()
        _close_all(prepared)
        audit_refusal(gw, source, IngestRejected("internal-error", f"ingest failed: {type(exc).__name__}"), patient_id,
                      outcome=audit.SERIOUS_FAILURE)
        raise
    writer.release()
    writer.remove_superseded()
    _close_all(prepared)
    if any(p.status in (CREATED, REPLACED) and p.media_type == received.MEDIA_TYPE for p in result.photos) \
            and gw.settings.ingest.received_renditions == "after-answer":
        gw.renditions_wanted.set()  # the renderer (deferred.py) makes what this left due
    return result


def _instant(moment: datetime | None) -> datetime | None:
    """A time as a UTC instant. A camera's EXIF time without an offset (or a sender's time without a zone) is the
    gateway host's local time, as for a DICOM object without TimezoneOffsetFromUTC: left naive, SQLite kept it as
    written while PostgreSQL read it in the session's zone, so the same photo had two times."""
    if moment is None:
        return None
    return (moment.astimezone() if moment.tzinfo is None else moment).astimezone(timezone.utc)


def _as_existing(a: Asset, filename: str | None = None) -> StoredPhoto:
    return StoredPhoto(
        asset_id=a.id, status=EXISTING, sha256=a.sha256, media_type=a.media_type, study_uid=a.study_uid,
        series_uid=a.series_uid, sop_instance_uid=a.sop_instance_uid, width=a.width, height=a.height,
        filename=filename, transfer_syntax=a.dicom_transfer_syntax, quarantined=a.status == "quarantined",
    )


def _close_all(prepared: list[Prepared]) -> None:
    for p in prepared:
        p.close()
    prepared.clear()


def _after_race(gw: Gateway, request: CaptureRequest) -> IngestResult:
    if request.idempotency_key:
        with gw.db.read() as session:
            seen = session.get(IdempotencyKey, (request.source.who, request.idempotency_key))
            if seen is not None:
                return IngestResult.from_dict(seen.response, replayed=True)
    # the other request stored these files: one more pass finds them as existing
    return ingest(gw, request, _retry=False)


def _new_file_row(gw: Gateway, entry: _Item, ctx: _Context, gov: Governance, session_key: str, number: int,
                  writer: BlobWriter, prepared: list[Prepared]) -> tuple[Asset, StoredPhoto]:
    """An image file checked and derived, its blobs written: the row to insert and what the caller is told."""
    settings = gw.settings.ingest
    item = entry.item
    try:
        p = prepare(item.path, settings, sha256=entry.sha256, tmp_dir=gw.spool.path)  # jpegtran/decoder temp files
    except IngestRejected as exc:
        raise exc.for_item(entry.index, entry.filename) from None
    prepared.append(p)
    sop_uid = entry.sender_uid or stable_uid(gw.settings.uid_root, "instance", session_key, ctx.patient.label(), entry.sha256)
    if settings.keep_originals:
        writer.put_path(item.path, entry.sha256)
    dicom_sha, dicom_size, ts = _write_dicom(gw, p, ctx, gov, sop_uid, number, writer)
    preview_sha = writer.put_bytes(p.renditions.preview)
    thumb_sha = writer.put_bytes(p.renditions.thumbnail)
    site = gov.body_site
    series = _files_of(ctx)
    row = Asset(
        sha1=sha1_base64(item.path), preview_sha1=sha1_base64(p.renditions.preview), preview_size=len(p.renditions.preview),
        study_uid=series.study_uid, series_uid=series.series_uid, sop_instance_uid=sop_uid,
        sop_class_uid=vlphoto.VL_PHOTOGRAPHIC_IMAGE, instance_number=number,
        sha256=entry.sha256, size=p.size, media_type=p.media_type, original_kept=settings.keep_originals,
        width=p.width, height=p.height, dicom_sha256=dicom_sha, dicom_size=dicom_size, dicom_transfer_syntax=ts,
        preview_sha256=preview_sha, thumbnail_sha256=thumb_sha, taken_at=_instant(p.facts.taken_at or gov.taken_at),
        body_site_code=site.code if site else None, body_site_display=site.meaning if site else None,
        laterality=site.laterality if site else None,
        device=gov.device or " ".join(x for x in (p.facts.make, p.facts.model) if x) or None,
    )
    photo = StoredPhoto(
        asset_id="", status=CREATED, sha256=entry.sha256, media_type=p.media_type, study_uid=series.study_uid,
        series_uid=series.series_uid, sop_instance_uid=sop_uid, width=p.width, height=p.height,
        filename=entry.filename, transfer_syntax=ts, quarantined=ctx.patient_id is None,
    )
    p.close()
    return row, photo


def _new_object_row(gw: Gateway, entry: _Item, obj: received.Received, ctx: _Context, gov: Governance,
                    writer: BlobWriter) -> tuple[Asset, StoredPhoto]:
    """A received DICOM object checked and kept as received, rendered now or after the answer (settings
    ingest.received_renditions): the row to insert and what the caller is told."""
    settings = gw.settings.ingest
    now = settings.received_renditions == "before-answer"
    try:
        if now:
            rends: Renditions | None = received.renditions(obj, settings, tmp_dir=gw.spool.path)
        else:
            received.check_frame(obj, tmp_dir=gw.spool.path)  # what needs no decoding; deferred.py decodes
            rends = None
    except IngestRejected as exc:
        raise exc.for_item(entry.index, entry.filename) from None
    # FHIR Attachment.hash of the object: after the answer, with its renditions (deferred.py), unless made now
    sha1 = entry.early.sha1() if entry.early is not None else (sha1_base64(obj.path) if now else None)
    # the received file is the original and the stored object at once: kept whatever keep_originals says
    item = entry.item
    if isinstance(item, ReceivedObject) and item.spooled:
        writer.adopt(obj.path, entry.sha256)
    else:
        writer.put_path(obj.path, entry.sha256)
    site = gov.body_site
    code, display = (site.code, site.meaning) if site else (obj.body_site or (None, None))
    row = Asset(
        sha1=sha1, study_uid=obj.study_uid, series_uid=obj.series_uid, sop_instance_uid=obj.sop_instance_uid,
        sop_class_uid=obj.sop_class_uid, instance_number=obj.instance_number,
        sha256=entry.sha256, size=obj.size, media_type=received.MEDIA_TYPE, original_kept=True,
        width=obj.columns, height=obj.rows, dicom_sha256=entry.sha256, dicom_size=obj.size,
        dicom_transfer_syntax=obj.transfer_syntax,
        taken_at=_instant(obj.taken_at or gov.taken_at), body_site_code=code, body_site_display=display,
        laterality=site.laterality if site else obj.laterality, device=gov.device or obj.device,
        photographer=gov.photographer or obj.operator,
    )
    if rends is None:
        row.rendition_state = DUE
    else:
        row.preview_sha256, row.thumbnail_sha256 = writer.put_bytes(rends.preview), writer.put_bytes(rends.thumbnail)
        row.preview_sha1, row.preview_size = sha1_base64(rends.preview), len(rends.preview)
    photo = StoredPhoto(
        asset_id="", status=CREATED, sha256=entry.sha256, media_type=received.MEDIA_TYPE, study_uid=obj.study_uid,
        series_uid=obj.series_uid, sop_instance_uid=obj.sop_instance_uid, width=obj.columns, height=obj.rows,
        filename=entry.filename, transfer_syntax=obj.transfer_syntax, quarantined=ctx.patient_id is None,
    )
    return row, photo


def _store(gw: Gateway, request: CaptureRequest, items: list[_Item], ctx: _Context, existing: dict[str, StoredPhoto],
           corrections: dict[str, _Correction], prepared: list[Prepared], writer: BlobWriter, session_key: str,
           request_hash: str) -> IngestResult:
    settings = gw.settings.ingest
    gov, source = request.governance, request.source
    now = datetime.now(timezone.utc)
    rows: list[Asset] = []
    replacing: list[tuple[_Correction, Asset]] = []  # corrections: the asset and the resend's columns for it
    photos: list[StoredPhoto | None] = [None] * len(items)
    repeats: list[_Item] = []  # already stored, or the same content earlier in this request
    seen_in_request: set[str] = set()
    instance = ctx.files.first_instance if ctx.files is not None else 1
    limits.check_request_pixels(
        [(e.item.path, e.filename, (e.received.columns, e.received.rows) if e.received is not None else None) for e in items],
        settings.max_pixels, settings.max_request_pixels)
    # check, derive and write the blobs of each item in turn (its decoded pixels are
    # released before the next one); a refusal of any item removes them all again
    for entry in items:
        if entry.sha256 in existing or entry.sha256 in seen_in_request:
            repeats.append(entry)
            continue
        seen_in_request.add(entry.sha256)
        correction = corrections.get(entry.sha256)
        if correction is not None and entry.received is not None:
            # checked and written as a new object would be; the governance below is the stored asset's own
            row, photo = _new_object_row(gw, entry, entry.received, ctx, gov, writer)
            photo.asset_id, photo.status, photo.quarantined = correction.asset_id, REPLACED, correction.quarantined
            replacing.append((correction, row))
            photos[entry.index] = photo
            continue
        if entry.received is not None:
            row, photo = _new_object_row(gw, entry, entry.received, ctx, gov, writer)
        else:
            given = entry.item.instance_number if isinstance(entry.item, ImageFile) else None
            row, photo = _new_file_row(gw, entry, ctx, gov, session_key, given or instance, writer, prepared)
            if given is None:  # a door that numbers its own photos (the importer) does not use up a number
                instance += 1
        filename = entry.filename
        row.original_filename = filename[-255:] if filename else None
        row.encounter_id = ctx.encounter_id
        row.view, row.sensitivity, row.description = gov.view, gov.sensitivity, gov.description
        row.specialty = gov.specialty or ctx.encounter_specialty
        row.photographer = row.photographer or gov.photographer
        row.source, row.uploaded_by = source.channel.value, source.who
        row.status = "quarantined" if ctx.patient_id is None else "active"
        row.created_at = row.updated_at = now
        rows.append(row)
        photos[entry.index] = photo

    # one transaction: assets, consent, audit, idempotency record
    with gw.db.write() as session:
        patient_id = ctx.patient_id
        if patient_id is None:
            patient_id = _placeholder_patient(session, ctx.patient).id
        else:
            # The patient was looked up before the slow work; an A40 may have merged it since.
            # Locking its row (PostgreSQL; SQLite's write lock is already ours) makes a merge
            # either come first (we refuse: the DICOM object names the merged record) or wait
            # and then move this photo with the rest.
            merged_into = session.execute(
                select(Patient.merged_into_id).where(Patient.id == patient_id).with_for_update()
            ).scalar_one()
            if merged_into is not None:
                raise IngestRejected(
                    PATIENT_MERGED,
                    "the patient was merged into another record while this photo was being stored; nothing was "
                    "stored: send it again (it will be filed under the surviving record)",
                    field="patient",
                )
        for correction, row in replacing:
            _replace(session, correction, row, now)
        writer.superseded.extend(sha for correction, _ in replacing for sha in correction.superseded)
        consent_id = ctx.consent_id
        for row in rows:
            row.patient_id = patient_id
            row.consent_id = consent_id
        session.add_all(rows)
        session.flush()
        routing.enqueue(session, gw.settings.routing, rows, now)  # forwarded only if stored: one transaction
        routing.requeue_corrected(session, [c.asset_id for c, _ in replacing], now)
        if gov.consent is not None and rows:
            # the consent captured with the photos, recorded by the one writer in this transaction and
            # linked to them (a repeat of photos already stored does not record it a second time)
            consent_id = _record_captured_consent(session, request, patient_id, [row.id for row in rows])
            for row in rows:
                row.consent_id = consent_id
        elif consent_id:
            # an existing consent named by id covers the new photos through the same link the consent API writes
            session.add_all([ConsentAsset(consent_id=consent_id, asset_id=row.id) for row in rows])
        session.flush()
        by_sha = {row.sha256: row for row in rows}
        for made in photos:
            if made is not None and made.status == CREATED:
                made.asset_id = by_sha[made.sha256].id
        replaced = {p.sha256: p for p in photos if p is not None and p.status == REPLACED}
        for entry in repeats:
            if entry.sha256 in existing:
                photos[entry.index] = StoredPhoto(**{**asdict(existing[entry.sha256]), "filename": entry.filename})
            elif entry.sha256 in replaced:  # the same correction twice in one request
                photos[entry.index] = StoredPhoto(**{**asdict(replaced[entry.sha256]), "status": EXISTING,
                                                     "filename": entry.filename})
            else:  # the same content twice in one request: one asset
                photos[entry.index] = _as_existing(by_sha[entry.sha256], entry.filename)
        audit.append_many(session, [*(_replaced_entry(source, c, row) for c, row in replacing),
                                    *(_stored_entry(source, row, patient_id) for row in rows)])
        result = IngestResult(patient_id=patient_id, photos=[p for p in photos if p is not None], consent_id=consent_id)
        if request.idempotency_key:
            session.add(IdempotencyKey(caller=source.who, key=request.idempotency_key, request_hash=request_hash,
                                       response=result.to_dict()))
            session.flush()
    return result


# What a correction replaces: the columns that describe the stored object's bytes and pixels, and the rendition
# state, so its renditions are made again (now, or after the answer) as for a new object. Everything else is the
# asset's record and stays: its id (every reader's reference), patient and filed patient, encounter, consents and
# their links, access list, outbox rows, study/series/SOP UIDs and class (the resend must say the same), governance
# and descriptive columns (set by the first request's governance, which wins over the header, or edited since),
# source and uploader, status, and created_at (consent cover is judged against it).
_OBJECT_COLUMNS = ("sha256", "size", "sha1", "width", "height", "dicom_sha256", "dicom_size", "dicom_transfer_syntax",
                   "preview_sha256", "thumbnail_sha256", "preview_sha1", "preview_size", "rendition_state")


def _replace(session: Session, correction: _Correction, row: Asset, now: datetime) -> None:
    """Give the corrected asset the resend's object (`row`: the columns _new_object_row worked out for it). The update
    names what the look-up saw, so a concurrent change (another correction, a merge) makes it match nothing."""
    values: dict[str, Any] = {name: getattr(row, name) for name in _OBJECT_COLUMNS}
    done = cast(CursorResult[Any], session.execute(
        update(Asset).where(Asset.id == correction.asset_id, Asset.rendition_state == FAILED,
                            Asset.sha256 == correction.sha256, Asset.patient_id == correction.patient_id,
                            Asset.status != _TAKEN_OUT)
        .values(**values, rendition_tries=0, rendition_after=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )).rowcount
    if not done:
        raise _ChangedMeanwhile(correction.asset_id)


def _replaced_entry(source: Source, correction: _Correction, row: Asset) -> audit.AuditEntry:
    """The correction as an update of the stored photo (IHE BALP import, action U, as deferred.py records the finding
    that its pixels did not decode): the superseded and the new object by hash, no patient data."""
    return audit.AuditEntry(
        type_code=audit.IMPORT, action="U", subtype=source.channel.value, outcome=audit.SUCCESS,
        outcome_desc="the stored object, whose pixels did not decode, was replaced by the sender's resend",
        agent_who=source.who, agent_role=source.role, agent_network=source.network,
        purpose_of_use=source.purpose_of_use, patient_id=correction.patient_id,
        entities=[
            {"type": "asset", "id": correction.asset_id, "role": "stored", "sop_instance_uid": row.sop_instance_uid,
             "study_uid": row.study_uid},
            {"type": "patient", "id": correction.patient_id},
        ],
        detail={"source": source.channel.value, "change": "replaced-object", "sha256": row.sha256,
                "replaced_sha256": correction.sha256, "media_type": row.media_type,
                "transfer_syntax": row.dicom_transfer_syntax, "rendition_state": row.rendition_state,
                **({"agent_name": source.name} if source.name else {})},
    )


def _record_captured_consent(session: Session, request: CaptureRequest, patient_id: int, asset_ids: list[str]) -> str:
    given = request.governance.consent
    assert given is not None
    source = request.source
    try:
        consent = record_consent(
            session, patient_id=patient_id, level=given.level, given_by=given.given_by,
            captured_by=given.captured_by or source.who, consent_date=given.date, scope="photos", asset_ids=asset_ids,
            purpose_note=given.purpose, actor=source.who, actor_role=source.role, actor_network=source.network,
        )
    except ConsentError as exc:
        raise _consent_refusal(exc) from None
    return consent.id


def _stored_entry(source: Source, row: Asset, patient_id: int) -> audit.AuditEntry:
    """IHE BALP import (110107): the photo and its patient as entities, with the DICOM UIDs added."""
    return audit.AuditEntry(
        type_code=audit.IMPORT, action="C", subtype=source.channel.value, outcome=audit.SUCCESS,
        agent_who=source.who, agent_role=source.role, agent_network=source.network,
        purpose_of_use=source.purpose_of_use, patient_id=patient_id,
        entities=[
            {"type": "asset", "id": row.id, "role": "stored", "sop_instance_uid": row.sop_instance_uid,
             "study_uid": row.study_uid},
            {"type": "patient", "id": patient_id},
        ],
        detail={"source": source.channel.value, "sha256": row.sha256, "media_type": row.media_type,
                "filename": row.original_filename, "consent_id": row.consent_id, "status": row.status,
                **({"sop_class_uid": row.sop_class_uid} if row.sop_class_uid != vlphoto.VL_PHOTOGRAPHIC_IMAGE else {}),
                **({"agent_name": source.name} if source.name else {})},
    )


def _placeholder_patient(session: Session, ref: PatientRef) -> Patient:
    """Quarantine: a patient row holding only the identifier, for a records officer to reconcile."""
    found = _find(session, ref)
    if found is not None:  # registered meanwhile
        return found
    patient = Patient()
    patient.identifiers = [placeholder_identifier(ref)]
    session.add(patient)
    session.flush()
    return patient
