"""The one ingest pipeline every door calls (HTTP upload, CLI import, later C-STORE and STOW-RS).

    ingest(gw, uploads, metadata, actor) -> IngestResult

1. resolve patient (through merges), encounter and consent; replay an idempotency key;
2. per file: check and derive (prepare.py) — outside any transaction;
3. write blobs first (original if kept, DICOM Part 10, preview, thumbnail);
4. one write transaction: consent row, asset rows, one audit record per photo,
   the idempotency record — all or nothing. If it fails, no row exists and the
   blobs this call created (and nothing else references) are removed.

Refusals raise IngestRejected (nothing stored) after writing a failure audit record.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.core.access_audit import fit
from gateway.core.objects import vlphoto
from gateway.core.objects.uids import stable_uid
from gateway.core.ingest import limits
from gateway.core.identity import Subject
from gateway.core.ingest.errors import (
    FORBIDDEN,
    INSUFFICIENT_SCOPE,
    DUPLICATE_INSTANCE,
    IDEMPOTENCY_CONFLICT,
    NO_FILES,
    PATIENT_MERGED,
    UNKNOWN_CONSENT,
    UNKNOWN_ENCOUNTER,
    UNKNOWN_PATIENT,
    IngestRejected,
)
from gateway.core.ingest.metadata import NHS_SYSTEM, PhotoMetadata
from gateway.core.ingest.prepare import Prepared, prepare, sha256_of
from gateway.core.policy.rules import scope_allows, uncovered_for_care
from store import audit
from store.models import Asset, Consent, ConsentAsset, Encounter, IdempotencyKey, Patient, PatientIdentifier
from store.patients import find_patient, identifiers_of, survivor

log = logging.getLogger(__name__)

CREATED = "created"
EXISTING = "existing"


@dataclass
class Upload:
    """One file as received: already on local disk (spooled), with its hash if the door computed it."""

    path: Path
    filename: str | None = None
    sha256: str | None = None
    # DICOM doors (C-STORE, STOW-RS) keep the sender's instance UID; other doors get one made
    sop_instance_uid: str | None = None
    # a door that numbers its own photos (the importer: manifest row); else next in the series
    instance_number: int | None = None


@dataclass
class Actor:
    """Who stores the photos, as the audit trail names them."""

    who: str
    role: str | None = None
    network: str | None = None
    purpose_of_use: str | None = "TREAT"
    name: str | None = None


@dataclass
class StoredPhoto:
    asset_id: str
    status: str  # created | existing
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

    def to_dict(self) -> dict:
        return {
            "patient_id": self.patient_id,
            "consent_id": self.consent_id,
            "photos": [asdict(p) for p in self.photos],
        }

    @classmethod
    def from_dict(cls, data: dict, replayed: bool = False) -> IngestResult:
        return cls(
            patient_id=data["patient_id"], consent_id=data.get("consent_id"),
            photos=[StoredPhoto(**p) for p in data["photos"]], replayed=replayed,
        )


@dataclass
class _Context:
    """Plain values read in the look-up session (its rows are gone when it closes)."""

    patient_id: int | None  # None: quarantine under a placeholder patient
    patient_info: vlphoto.PatientInfo
    encounter_id: int | None
    visit_number: str | None
    encounter_specialty: str | None
    consent_id: str | None
    study_uid: str
    series_uid: str
    study_started: datetime | None
    series_number: int
    first_instance: int


# --- look-ups -------------------------------------------------------------------


def _patient_info(session: Session, patient: Patient | None, system: str, value: str) -> vlphoto.PatientInfo:
    """Patient module values: NHS number with issuer NHS if known, else the MRN with its assigner."""
    if patient is None:
        return vlphoto.PatientInfo(patient_id=value, issuer="NHS" if system == NHS_SYSTEM else system[-64:])
    idents = identifiers_of(session, patient.id)
    nhs = next((i for i in idents if i.system == NHS_SYSTEM), None)
    mrn = next((i for i in idents if i.type_code == "MR" and i.patient_id == patient.id), None)
    mrn = mrn or next((i for i in idents if i.system != NHS_SYSTEM), None)
    primary = nhs or mrn
    def issuer(i: PatientIdentifier) -> str:
        return "NHS" if i.system == NHS_SYSTEM else (i.assigner or i.system)
    others = [(i.value, issuer(i)) for i in idents if primary is None or i.id != primary.id]
    return vlphoto.PatientInfo(
        patient_id=primary.value if primary else "", issuer=issuer(primary) if primary else "",
        family=patient.family_name, given=patient.given_names, prefix=patient.name_prefix,
        birth_date=patient.birth_date, sex=patient.sex, other_ids=others,
    )


def _resolve(session: Session, gw, meta: PhotoMetadata, session_key: str, study_override: str | None = None,
             series_override: str | None = None) -> _Context:
    system, value = meta.patient_system, meta.patient_value
    patient = find_patient(session, system, value)
    if patient is None and not gw.settings.ingest.quarantine_unknown_patients:
        raise IngestRejected(
            UNKNOWN_PATIENT, f"unknown patient {system}|{value}: no patient with this identifier is registered",
            field="patient",
        )
    encounter = None
    if meta.encounter:
        if patient is None:
            raise IngestRejected(UNKNOWN_ENCOUNTER, f"unknown encounter {meta.encounter!r}: the patient is not registered", field="encounter")
        candidates = session.execute(select(Encounter).where(Encounter.visit_number == meta.encounter)).scalars().all()
        mine = [e for e in candidates if survivor(session, session.get(Patient, e.patient_id)).id == patient.id]
        if not mine:
            raise IngestRejected(
                UNKNOWN_ENCOUNTER, f"unknown encounter {meta.encounter!r} for patient {system}|{value}", field="encounter"
            )
        encounter = mine[0]
    consent = None
    if meta.consent_id:
        consent = session.get(Consent, meta.consent_id)
        owner = survivor(session, session.get(Patient, consent.patient_id)) if consent else None
        if consent is None or patient is None or owner.id != patient.id:
            raise IngestRejected(UNKNOWN_CONSENT, f"unknown consent {meta.consent_id!r} for patient {system}|{value}", field="consentId")
        if consent.status != "active":
            raise IngestRejected(UNKNOWN_CONSENT, f"consent {meta.consent_id!r} is {consent.status}, not active", field="consentId")

    root = gw.settings.uid_root
    if study_override:
        study_uid, started = study_override, (encounter.admitted_at if encounter else None)
    elif encounter is not None:
        study_uid = session.execute(
            select(Asset.study_uid).where(Asset.encounter_id == encounter.id).order_by(Asset.created_at).limit(1)
        ).scalar_one_or_none() or stable_uid(root, "study", "encounter", encounter.visit_system, encounter.visit_number)
        started = encounter.admitted_at
    else:
        study_uid = stable_uid(root, "study", "session", session_key, meta.patient)
        started = None
    series_uid = series_override or stable_uid(root, "series", session_key, meta.patient)
    known_series = session.execute(
        select(Asset.series_uid).where(Asset.study_uid == study_uid).distinct()
    ).scalars().all()
    series_number = (known_series.index(series_uid) + 1) if series_uid in known_series else len(known_series) + 1
    first_instance = (
        session.execute(select(func.max(Asset.instance_number)).where(Asset.series_uid == series_uid)).scalar() or 0
    ) + 1
    return _Context(
        series_uid=series_uid,
        patient_id=patient.id if patient else None, patient_info=_patient_info(session, patient, system, value),
        encounter_id=encounter.id if encounter else None, visit_number=encounter.visit_number if encounter else None,
        encounter_specialty=encounter.specialty if encounter else None, consent_id=consent.id if consent else None,
        study_uid=study_uid, study_started=started, series_number=series_number,
        first_instance=first_instance,
    )


# --- blobs ----------------------------------------------------------------------


# Content-addressed blobs can be shared by concurrent ingests (the same photo sent
# twice at once, or the same file for two patients). A blob is "held" from just
# before its put until the holder's transaction has ended, and a failed ingest
# never deletes a blob another ingest in this process holds. (The gateway is one
# process; anything left by a crash is an orphan for `clinphoto store gc`.)
_HELD: collections.Counter = collections.Counter()
_HELD_LOCK = threading.Lock()


class _BlobWriter:
    """Puts blobs, remembers which ones this call created, removes them again on failure."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.created: list[str] = []
        self.held: list[str] = []

    def _hold(self, sha: str) -> bool:
        """Hold `sha`; returns whether the blob already existed."""
        with _HELD_LOCK:
            _HELD[sha] += 1
            self.held.append(sha)
            return self.gw.blobs.exists(sha)

    def put_path(self, path: Path, sha: str) -> str:
        existed = self._hold(sha)
        with open(path, "rb") as f:
            ref = self.gw.blobs.put_file(f)
        if not existed:
            self.created.append(ref.sha256)
        return ref.sha256

    def put_new_stream(self, chunks):
        """For content that is new by construction (a DICOM object with a fresh instance UID and creation time)."""
        ref = self.gw.blobs.put_stream(chunks)
        self.created.append(ref.sha256)
        return ref

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        existed = self._hold(sha)
        self.gw.blobs.put_bytes(data)
        if not existed:
            self.created.append(sha)
        return sha

    def release(self) -> None:
        with _HELD_LOCK:
            for sha in self.held:
                _HELD[sha] -= 1
                if _HELD[sha] <= 0:
                    del _HELD[sha]
        self.held.clear()

    def remove_unreferenced(self) -> None:
        """After a failure: delete what we created unless a committed row or another ingest uses it."""
        self.release()
        if not self.created:
            return
        with _HELD_LOCK:
            with self.gw.db.read() as session:
                used = {sha for sha in self.created if _HELD.get(sha)}
                for column in (Asset.sha256, Asset.dicom_sha256, Asset.preview_sha256, Asset.thumbnail_sha256):
                    used.update(session.execute(select(column).where(column.in_(self.created))).scalars())
            for sha in self.created:
                if sha not in used:
                    self.gw.blobs.delete(sha)
        self.created.clear()


def _write_dicom(gw, prepared: Prepared, ctx: _Context, meta: PhotoMetadata, sop_uid: str, series_uid: str,
                 instance: int, writer: _BlobWriter) -> tuple[str, int, str]:
    facts = prepared.facts
    comments = "; ".join(x for x in (f"View: {meta.view}" if meta.view else None, meta.description) if x) or None
    ds = vlphoto.build_dataset(
        pixels=prepared.pixels,
        patient=ctx.patient_info,
        study=vlphoto.StudyInfo(
            uid=ctx.study_uid, started=ctx.study_started,
            study_id=(ctx.visit_number or "PHOTO")[:16],
            referring_physician="",
        ),
        series=vlphoto.SeriesInfo(uid=series_uid, number=ctx.series_number, description="Clinical photographs", operator=meta.photographer),
        image=vlphoto.ImageInfo(
            sop_instance_uid=sop_uid, instance_number=instance, taken_at=facts.taken_at or meta.taken_at,
            comments=comments, derived=prepared.derived, derivation=prepared.derivation,
        ),
        equipment=vlphoto.Equipment(manufacturer=facts.make, model=facts.model or meta.device, software=facts.software),
        body_site=vlphoto.BodySite(meta.body_site.code, meta.body_site.meaning, meta.body_site.laterality) if meta.body_site else None,
        uid_root=gw.settings.uid_root,
    )
    ts, chunks = vlphoto.part10_chunks(ds, prepared.pixels, gw.settings.uid_root)
    ref = writer.put_new_stream(chunks)
    return ref.sha256, ref.size, ts


# --- audit ----------------------------------------------------------------------


def audit_refusal(gw, actor: Actor, exc: IngestRejected, patient_id: int | None, source: str, outcome: str = audit.MINOR_FAILURE) -> None:
    try:
        with gw.db.write() as session:
            # fit: the refusal must be recordable whatever the caller sent (long values, NUL bytes)
            audit.append(session, fit(audit.AuditEntry(
                type_code=audit.IMPORT, action="C", subtype=source, outcome=outcome, outcome_desc=exc.message[:1000],
                agent_who=actor.who, agent_role=actor.role, agent_network=actor.network,
                purpose_of_use=actor.purpose_of_use, patient_id=patient_id,
                entities=[{"type": "patient", "id": patient_id}] if patient_id else [],
                detail={"source": source, "code": exc.code, "item": exc.item, "filename": exc.filename},
            )))
    except Exception:  # the refusal itself must still reach the caller
        log.exception("could not audit a refused upload")


def uploader(gw, subject: Subject, source: str = "upload") -> Actor:
    """The actor photos are stored as; a role not allowed to store photos, or a token whose SMART scopes do not
    allow creating them (e.g. user/Media.c), is refused with the refusal audited."""
    actor = Actor(who=subject.sub, role=subject.role, network=subject.network_address,
                  purpose_of_use=subject.purpose_of_use, name=subject.name)
    roles = gw.settings.ingest.upload_roles
    if subject.role not in roles:
        refusal = IngestRejected(FORBIDDEN, f"role {subject.role!r} may not upload photos (allowed: {', '.join(roles)})")
    elif not scope_allows(subject.scopes, "Media", "c"):  # SMART scopes only narrow
        refusal = IngestRejected(INSUFFICIENT_SCOPE, "the token's scopes do not allow 'c' on Media")
    else:
        return actor
    audit_refusal(gw, actor, refusal, None, source)
    raise refusal


def uncovered(gw, result: IngestResult) -> set[str]:
    """The stored photos no consent covers for care: stored, but hidden until a consent is recorded (the doors
    warn the sender now rather than leave a later 404 unexplained)."""
    with gw.db.read() as session:
        return uncovered_for_care(session, gw.settings.policy, [p.asset_id for p in result.photos])


def _request_hash(meta: PhotoMetadata, shas: list[str]) -> str:
    return hashlib.sha256((meta.canonical() + "|" + ",".join(shas)).encode()).hexdigest()


# --- the pipeline ---------------------------------------------------------------


def ingest(
    gw,
    uploads: list[Upload],
    meta: PhotoMetadata,
    actor: Actor,
    *,
    source: str = "upload",
    idempotency_key: str | None = None,
    session_key: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    _retry: bool = True,
) -> IngestResult:
    """Store photos for one patient as one capture session; all or nothing.

    DICOM doors may pass the sender's study/series UIDs (and per-file SOP Instance
    UIDs on Upload); otherwise a study per encounter or capture session and a
    series per capture session are made under settings.uid_root.
    """
    if not uploads:
        raise IngestRejected(NO_FILES, "no image files in the request", field="files")
    session_key = session_key or idempotency_key and f"{actor.who}|{idempotency_key}" or uuid.uuid4().hex
    for item in uploads:
        if item.sha256 is None:
            item.sha256 = sha256_of(item.path)
    shas = [u.sha256 for u in uploads]
    request_hash = _request_hash(meta, shas)
    patient_id: int | None = None
    try:
        with gw.db.read() as session:
            if idempotency_key:
                seen = session.get(IdempotencyKey, (actor.who, idempotency_key))
                if seen is not None:
                    if seen.request_hash != request_hash:
                        raise IngestRejected(
                            IDEMPOTENCY_CONFLICT,
                            f"Idempotency-Key {idempotency_key!r} was already used for a different request",
                            field="Idempotency-Key",
                        )
                    return IngestResult.from_dict(seen.response, replayed=True)
            ctx = _resolve(session, gw, meta, session_key, study_uid, series_uid)
            patient_id = ctx.patient_id
            existing: dict[str, StoredPhoto] = {}
            if patient_id is not None:
                rows = session.execute(select(Asset).where(Asset.patient_id == patient_id, Asset.sha256.in_(shas))).scalars()
                existing = {a.sha256: _as_existing(a) for a in rows}
            given_uids = [u.sop_instance_uid for u in uploads if u.sop_instance_uid]
            if given_uids:
                for a in session.execute(select(Asset).where(Asset.sop_instance_uid.in_(given_uids))).scalars():
                    if a.sha256 not in existing:
                        raise IngestRejected(
                            DUPLICATE_INSTANCE,
                            f"SOP Instance UID {a.sop_instance_uid} is already stored with different content",
                            field="SOPInstanceUID",
                        )
    except IngestRejected as exc:
        audit_refusal(gw, actor, exc, patient_id, source)
        raise

    writer = _BlobWriter(gw)
    prepared: list[Prepared] = []
    try:
        result = _store(gw, uploads, meta, actor, ctx, existing, prepared, writer, source, session_key,
                        idempotency_key, request_hash)
    except IntegrityError:
        # a concurrent request stored the same content (or used the same key) first: answer as it did
        writer.remove_unreferenced()
        _close_all(prepared)
        if not _retry:
            raise
        return _after_race(gw, uploads, meta, actor, source, idempotency_key, session_key, study_uid, series_uid)
    except IngestRejected as exc:
        writer.remove_unreferenced()
        _close_all(prepared)
        audit_refusal(gw, actor, exc, patient_id, source)
        raise
    except BaseException as exc:
        writer.remove_unreferenced()
        _close_all(prepared)
        audit_refusal(gw, actor, IngestRejected("internal-error", f"ingest failed: {type(exc).__name__}"), patient_id, source,
                       outcome=audit.SERIOUS_FAILURE)
        raise
    writer.release()
    _close_all(prepared)
    return result


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


def _after_race(gw, uploads, meta, actor, source, idempotency_key, session_key, study_uid, series_uid) -> IngestResult:
    with gw.db.read() as session:
        if idempotency_key:
            seen = session.get(IdempotencyKey, (actor.who, idempotency_key))
            if seen is not None:
                return IngestResult.from_dict(seen.response, replayed=True)
    # the other request stored these files: one more pass finds them as existing
    return ingest(gw, uploads, meta, actor, source=source, idempotency_key=idempotency_key, session_key=session_key,
                  study_uid=study_uid, series_uid=series_uid, _retry=False)


def _store(gw, uploads, meta, actor, ctx: _Context, existing: dict, prepared: list, writer: _BlobWriter, source: str,
           session_key: str, idempotency_key: str | None, request_hash: str) -> IngestResult:
    settings = gw.settings.ingest
    root = gw.settings.uid_root
    series_uid = ctx.series_uid
    plan: list[tuple[int, Upload, bool]] = []
    seen_in_request: set[str] = set()
    now = datetime.now(timezone.utc)
    rows: list[Asset] = []
    photos: list[StoredPhoto | None] = [None] * len(uploads)
    instance = ctx.first_instance
    limits.check_request_pixels([(u.path, u.filename) for u in uploads], settings.max_pixels, settings.max_request_pixels)
    # check, derive and write the blobs of each file in turn (its decoded pixels are
    # released before the next one); a refusal of any file removes them all again
    for index, item in enumerate(uploads):
        if item.sha256 in existing or item.sha256 in seen_in_request:
            plan.append((index, item, False))
            continue
        try:
            p = prepare(item.path, settings, sha256=item.sha256, tmp_dir=gw.spool.path)  # jpegtran/decoder temp files
        except IngestRejected as exc:
            raise exc.for_item(index, item.filename) from None
        prepared.append(p)
        seen_in_request.add(item.sha256)
        plan.append((index, item, True))
        sop_uid = item.sop_instance_uid or stable_uid(root, "instance", session_key, meta.patient, item.sha256)
        if settings.keep_originals:
            writer.put_path(item.path, item.sha256)
        number = item.instance_number or instance
        dicom_sha, dicom_size, ts = _write_dicom(gw, p, ctx, meta, sop_uid, series_uid, number, writer)
        preview_sha = writer.put_bytes(p.renditions.preview)
        thumb_sha = writer.put_bytes(p.renditions.thumbnail)
        rows.append(Asset(
            patient_id=ctx.patient_id,
            encounter_id=ctx.encounter_id,
            consent_id=ctx.consent_id,
            study_uid=ctx.study_uid, series_uid=series_uid, sop_instance_uid=sop_uid,
            sop_class_uid=vlphoto.VL_PHOTOGRAPHIC_IMAGE, instance_number=number,
            sha256=item.sha256, size=p.size, media_type=p.media_type, original_kept=settings.keep_originals,
            original_filename=(item.filename or None) and item.filename[-255:], width=p.width, height=p.height,
            dicom_sha256=dicom_sha, dicom_size=dicom_size, dicom_transfer_syntax=ts,
            preview_sha256=preview_sha, thumbnail_sha256=thumb_sha,
            taken_at=p.facts.taken_at or meta.taken_at,
            body_site_code=meta.body_site.code if meta.body_site else None,
            body_site_display=meta.body_site.meaning if meta.body_site else None,
            laterality=meta.body_site.laterality if meta.body_site else None,
            view=meta.view, specialty=meta.specialty or ctx.encounter_specialty,
            sensitivity=meta.sensitivity, photographer=meta.photographer,
            device=meta.device or " ".join(x for x in (p.facts.make, p.facts.model) if x) or None,
            description=meta.description, source=source, uploaded_by=actor.who,
            status="quarantined" if ctx.patient_id is None else "active", created_at=now, updated_at=now,
        ))
        photos[index] = StoredPhoto(
            asset_id="", status=CREATED, sha256=item.sha256, media_type=p.media_type, study_uid=ctx.study_uid,
            series_uid=series_uid, sop_instance_uid=sop_uid, width=p.width, height=p.height,
            filename=item.filename, transfer_syntax=ts, quarantined=ctx.patient_id is None,
        )
        if item.instance_number is None:
            instance += 1
        p.close()

    # one transaction: consent, assets, audit, idempotency record
    with gw.db.write() as session:
        patient_id = ctx.patient_id
        if patient_id is None:
            patient_id = _placeholder_patient(session, meta).id
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
        consent_id = ctx.consent_id
        # a repeat of photos already stored does not record their consent a second time
        if meta.consent is not None and rows:
            consent = Consent(
                patient_id=patient_id, level=meta.consent.level, given_by=meta.consent.given_by,
                captured_by=meta.consent.captured_by or actor.who, consent_date=meta.consent.date or now.date(),
                scope="photos", encounter_id=ctx.encounter_id,
                purpose_note=meta.consent.purpose,
            )
            session.add(consent)
            session.flush()
            consent_id = consent.id
        for row in rows:
            row.patient_id = patient_id
            row.consent_id = consent_id
        session.add_all(rows)
        session.flush()
        # the consent captured with the photos covers them through consent_assets, the same
        # link the consent API writes (Asset.consent_id only records which consent came along)
        session.add_all([ConsentAsset(consent_id=row.consent_id, asset_id=row.id) for row in rows if row.consent_id])
        session.flush()
        by_sha = {row.sha256: row for row in rows}
        for photo in photos:
            if photo is not None:
                photo.asset_id = by_sha[photo.sha256].id
        for index, item, is_new in plan:
            if not is_new:
                if item.sha256 in existing:
                    photos[index] = StoredPhoto(**{**asdict(existing[item.sha256]), "filename": item.filename})
                else:  # the same file twice in one request: one asset
                    photos[index] = _as_existing(by_sha[item.sha256], item.filename)
        audit.append_many(session, [
            # IHE BALP import (110107): the photo and its patient as entities, with the DICOM UIDs added
            audit.AuditEntry(
                type_code=audit.IMPORT, action="C", subtype=source, outcome=audit.SUCCESS,
                agent_who=actor.who, agent_role=actor.role, agent_network=actor.network,
                purpose_of_use=actor.purpose_of_use, patient_id=patient_id,
                entities=[
                    {"type": "asset", "id": row.id, "role": "stored", "sop_instance_uid": row.sop_instance_uid,
                     "study_uid": row.study_uid},
                    {"type": "patient", "id": patient_id},
                ],
                detail={"source": source, "sha256": row.sha256, "media_type": row.media_type,
                        "filename": row.original_filename, "consent_id": row.consent_id, "status": row.status,
                        **({"agent_name": actor.name} if actor.name else {})},
            )
            for row in rows
        ])
        result = IngestResult(patient_id=patient_id, photos=[p for p in photos if p is not None], consent_id=consent_id)
        if idempotency_key:
            session.add(IdempotencyKey(caller=actor.who, key=idempotency_key, request_hash=request_hash, response=result.to_dict()))
            session.flush()
    return result


def _placeholder_patient(session: Session, meta: PhotoMetadata) -> Patient:
    """Quarantine: a patient row holding only the identifier, for a records officer to reconcile."""
    found = find_patient(session, meta.patient_system, meta.patient_value)
    if found is not None:  # registered meanwhile
        return found
    patient = Patient()
    patient.identifiers = [PatientIdentifier(system=meta.patient_system, value=meta.patient_value,
                                             type_code="NH" if meta.patient_system == NHS_SYSTEM else None)]
    session.add(patient)
    session.flush()
    return patient
