"""Tables of the clinphoto store.

Protocol-free: HL7, DICOM and FHIR modules translate to and from these rows.
Times are stored as timezone-aware UTC; codes are the plain strings of the
code systems named beside each column.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    FetchedValue,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class UtcDateTime(TypeDecorator[datetime]):
    """A moment, written as UTC and read back aware, on both backends. SQLite keeps a datetime's wall-clock text
    and drops its offset, while PostgreSQL converts: a photo taken at 14:22+01:00 read back 14:22 on one and
    13:22 on the other. A naive value is taken as UTC (what SQLite reads back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime()}


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # the id the doors show (REST, FHIR Patient.id): opaque and stable, made by the database (migration 0003)
    public_id: Mapped[str] = mapped_column(String(32), server_default=FetchedValue())
    family_name: Mapped[str | None] = mapped_column(String(200))
    given_names: Mapped[str | None] = mapped_column(String(200))
    name_prefix: Mapped[str | None] = mapped_column(String(50))
    # "family^given" lower-cased by Python, set on every write (name_key_of): names are matched without regard to
    # case against this. SQL's lower() folds only ASCII on SQLite (and on PostgreSQL under the C locale), so
    # "Ó Súilleabháin" matched neither itself in capitals nor "ó*" (migration 0011)
    name_key: Mapped[str | None] = mapped_column(String(401))
    birth_date: Mapped[date | None] = mapped_column(Date)
    # administrative sex as in HL7 table 0001 / FHIR: M F O U (A N stored as given)
    sex: Mapped[str | None] = mapped_column(String(1))
    deceased_at: Mapped[datetime | None]
    # PID-32 NHS number verification status (e.g. 01 verified, NSTS01..08)
    nhs_number_status: Mapped[str | None] = mapped_column(String(20))
    # set when this record was merged (A40) into a survivor; never deleted
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"))
    merged_at: Mapped[datetime | None]
    # event time (EVN-2 / MSH-7) of the last demographic change applied: an
    # older message must not overwrite newer demographics
    last_event_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    identifiers: Mapped[list[PatientIdentifier]] = relationship(
        back_populates="patient", cascade="all, delete-orphan"
    )

    __table_args__ = (Index("ix_patients_merged_into", "merged_into_id"), Index("uq_patients_public_id", "public_id", unique=True))


def name_key_of(family: str | None, given: str | None) -> str:
    """What a patient's name is matched by: the PN form family^given, folded to lower case (Unicode)."""
    return f"{family or ''}^{given or ''}".lower()


@event.listens_for(Patient, "before_insert")
@event.listens_for(Patient, "before_update")
def _keep_name_key(_mapper: Mapper[Patient], _connection: object, patient: Patient) -> None:
    patient.name_key = name_key_of(patient.family_name, patient.given_names)


class PatientIdentifier(Base):
    __tablename__ = "patient_identifiers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    # a URI such as https://fhir.nhs.uk/Id/nhs-number, or a local MRN system
    system: Mapped[str] = mapped_column(String(200))
    value: Mapped[str] = mapped_column(String(100))
    # HL7 table 0203 identifier type: NH, MR, ...
    type_code: Mapped[str | None] = mapped_column(String(10))
    # assigning authority (e.g. the trust's ODS code), used as DICOM IssuerOfPatientID
    assigner: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="identifiers")

    __table_args__ = (
        UniqueConstraint("system", "value", name="uq_identifier_system_value"),
        # a DICOM PatientID without an issuer is looked up by value under any system (C-FIND, QIDO-RS)
        Index("ix_patient_identifiers_value", "value"),
    )


class Encounter(Base):
    __tablename__ = "encounters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    # PV1-19 visit number; unique within its system (the sending trust)
    visit_system: Mapped[str] = mapped_column(String(200), default="")
    visit_number: Mapped[str | None] = mapped_column(String(100))
    # HL7 v3 ActCode: IMP inpatient, AMB outpatient, EMER emergency, ...
    class_code: Mapped[str | None] = mapped_column(String(10))
    # FHIR Encounter.status: planned, in-progress, finished, cancelled
    status: Mapped[str] = mapped_column(String(20), default="in-progress")
    location: Mapped[str | None] = mapped_column(String(200))
    # NHS Treatment Function code (e.g. 330 Dermatology)
    specialty: Mapped[str | None] = mapped_column(String(10))
    attending_id: Mapped[str | None] = mapped_column(String(100))
    attending_name: Mapped[str | None] = mapped_column(String(200))
    admitted_at: Mapped[datetime | None]
    discharged_at: Mapped[datetime | None]
    last_event_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        UniqueConstraint("visit_system", "visit_number", name="uq_encounter_visit"),
        Index("ix_encounters_patient_admitted", "patient_id", "admitted_at"),
    )


class Consent(Base):
    __tablename__ = "consents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    # record < teaching < publication (IMI levels 1-3)
    level: Mapped[str] = mapped_column(String(20))
    # patient, parent, best-interests
    given_by: Mapped[str] = mapped_column(String(20))
    captured_by: Mapped[str | None] = mapped_column(String(200))
    consent_date: Mapped[date | None] = mapped_column(Date)
    # active or withdrawn
    status: Mapped[str] = mapped_column(String(20), default="active")
    withdrawn_at: Mapped[datetime | None]
    # patient (all photos), encounter (one episode) or photos (only assets linked to it)
    scope: Mapped[str] = mapped_column(String(20), default="patient")
    encounter_id: Mapped[int | None] = mapped_column(ForeignKey("encounters.id"))
    # for publication consent: the specific use consented to
    purpose_note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def _filed_under_patient(context) -> int:
    return context.get_current_parameters()["patient_id"]


class Asset(Base):
    """One clinical photograph, stored once, with everything derived from it."""

    __tablename__ = "assets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    # the patient the photo was first filed under; differs from patient_id after a merge moved it
    filed_patient_id: Mapped[int] = mapped_column(Integer, default=_filed_under_patient)
    encounter_id: Mapped[int | None] = mapped_column(ForeignKey("encounters.id"))
    # the consent captured with the photo at upload (informational); what covers the photo
    # is in consent_assets (and patient/encounter-scoped consents), see gateway/core/policy/rules.py
    consent_id: Mapped[str | None] = mapped_column(ForeignKey("consents.id"))

    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="1.2.840.10008.5.1.4.1.1.77.1.4")
    instance_number: Mapped[int | None] = mapped_column(Integer)

    # the original as received (sealed evidence; may be dropped by setting)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))
    original_kept: Mapped[bool] = mapped_column(Boolean, default=True)
    original_filename: Mapped[str | None] = mapped_column(String(255))
    # base64 SHA-1 of the original and of the preview, and the preview's size: what a FHIR Attachment states
    # about the bytes at its url (worked out at ingest; none for photos stored before migration 0004)
    sha1: Mapped[str | None] = mapped_column(String(28))
    preview_sha1: Mapped[str | None] = mapped_column(String(28))
    preview_size: Mapped[int | None] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # derived objects (blob hashes), all free of location and owner metadata
    dicom_sha256: Mapped[str | None] = mapped_column(String(64))
    dicom_size: Mapped[int | None] = mapped_column(BigInteger)
    dicom_transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    preview_sha256: Mapped[str | None] = mapped_column(String(64))
    thumbnail_sha256: Mapped[str | None] = mapped_column(String(64))
    # NULL: the renditions are made; "due": a received object answered before its pixels were decoded
    # (gateway/core/ingest/deferred.py makes them); "failed": its pixels did not decode
    rendition_state: Mapped[str | None] = mapped_column(String(10))
    # attempts at making a due photo's renditions that ended without an answer (counted before each decode, so a
    # process killed by it counts too), and the time before which the renderer leaves it (migration 0009)
    rendition_tries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rendition_after: Mapped[datetime | None]

    taken_at: Mapped[datetime | None]
    # SNOMED CT body structure and laterality (left, right, both)
    body_site_code: Mapped[str | None] = mapped_column(String(20))
    body_site_display: Mapped[str | None] = mapped_column(String(200))
    laterality: Mapped[str | None] = mapped_column(String(10))
    view: Mapped[str | None] = mapped_column(String(100))
    # NHS Treatment Function code
    specialty: Mapped[str | None] = mapped_column(String(10))
    # HL7 v3 confidentiality: N normal, R restricted, V very restricted
    sensitivity: Mapped[str] = mapped_column(String(1), default="N")
    photographer: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    # upload, import, dimse, stow, demo
    source: Mapped[str] = mapped_column(String(20))
    # subject (user id or AE title) that stored it
    uploaded_by: Mapped[str | None] = mapped_column(String(200))
    # active, quarantined, entered-in-error
    status: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        # one stored copy per patient and content (a repeat upload finds this row); after a
        # merge the survivor may hold the same content twice, once from each original record
        UniqueConstraint("patient_id", "sha256", "filed_patient_id", name="uq_asset_patient_content"),
        Index("ix_assets_patient_taken", "patient_id", "taken_at"),
        Index("ix_assets_study", "study_uid"),
        Index("ix_assets_series", "series_uid"),
        Index("ix_assets_encounter", "encounter_id"),
        Index("ix_assets_consent", "consent_id"),
        Index("ix_assets_created", "created_at"),
        Index("ix_assets_rendition_state", "rendition_state"),
    )


class ConsentAsset(Base):
    """Which photos a photo-scoped consent covers. A link table, not Asset.consent_id, because
    one photo may carry several consents (e.g. record and publication) and recording one must
    not take away another's cover. Asset.consent_id stays as the consent captured at upload."""

    __tablename__ = "consent_assets"

    consent_id: Mapped[str] = mapped_column(ForeignKey("consents.id"), primary_key=True)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # the policy's correlated EXISTS looks links up by photo
    __table_args__ = (Index("ix_consent_assets_asset", "asset_id"),)


class OutboxItem(Base):
    """A photo to send to a DICOM destination (routing): kept until delivered, given up on (dead) or cancelled."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.id"))
    destination: Mapped[str] = mapped_column(String(16))  # a configured DICOM peer's AE title
    # pending, delivered (C-STORE succeeded), committed (the destination confirmed by Storage Commitment), dead
    # (tries used up), cancelled (by an operator)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # when pending: the next try (or the end of a sender's lease); when delivered awaiting commitment: the deadline
    # for the destination's report, after which the item is sent and asked about again
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    # the Storage Commitment Transaction UID asked under, for destinations that commit (N-ACTION / N-EVENT-REPORT)
    commitment_uid: Mapped[str | None] = mapped_column(String(64))
    committed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        UniqueConstraint("asset_id", "destination", name="uq_outbox_asset_destination"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_commitment", "commitment_uid"),
    )


class AssetAccess(Base):
    """Named people allowed to see a very restricted (V) photo."""

    __tablename__ = "asset_access"

    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.id"), primary_key=True)
    subject: Mapped[str] = mapped_column(String(200), primary_key=True)
    granted_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """Replay protection for uploads: the same key from the same caller gets the first answer."""

    __tablename__ = "idempotency_keys"

    caller: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Append-only, hash-chained audit record (FHIR AuditEvent / IHE BALP fields)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False)
    recorded_at: Mapped[datetime]
    # AuditEvent.type (DICOM DCM code, e.g. 110110 Patient Record, or rest) and subtype
    type_code: Mapped[str] = mapped_column(String(50))
    subtype: Mapped[str | None] = mapped_column(String(50))
    # C R U D E
    action: Mapped[str] = mapped_column(String(1))
    # 0 success, 4 minor failure, 8 serious failure, 12 major failure
    outcome: Mapped[str] = mapped_column(String(2))
    outcome_desc: Mapped[str | None] = mapped_column(Text)
    agent_who: Mapped[str | None] = mapped_column(String(200))
    agent_role: Mapped[str | None] = mapped_column(String(100))
    agent_network: Mapped[str | None] = mapped_column(String(200))
    purpose_of_use: Mapped[str | None] = mapped_column(String(20))
    patient_id: Mapped[int | None] = mapped_column(Integer)
    # [{"type": "asset"|"patient"|"query"|"hl7-message"|..., "id": ..., "role": ..., "query": ...}]
    entities: Mapped[list] = mapped_column(JSON, default=list)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_patient", "patient_id", "seq"),
        Index("ix_audit_recorded", "recorded_at"),
    )


class AuditHead(Base):
    """The chain's two keyed marks (store/audit.py). Row 1, the head: the last (seq, hash),
    keyed-hashed, so deleting records from the end of the chain must also rewrite it, which
    needs the audit key; appenders lock it, so the chain never forks. Row 0, the genesis
    record: seq 0, hash = the trail's random id that record 1 chains from, mac its HMAC."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), default=0)
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64), default="")


class Hl7Message(Base):
    """Every HL7 v2 message received, kept raw with what was done with it."""

    __tablename__ = "hl7_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sending_application: Mapped[str] = mapped_column(String(200), default="")
    sending_facility: Mapped[str] = mapped_column(String(200), default="")
    control_id: Mapped[str] = mapped_column(String(200))
    message_type: Mapped[str | None] = mapped_column(String(10))
    trigger_event: Mapped[str | None] = mapped_column(String(10))
    event_time: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    peer: Mapped[str | None] = mapped_column(String(200))
    # applied, ignored, error, rejected
    status: Mapped[str] = mapped_column(String(20))
    ack: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    patient_id: Mapped[int | None] = mapped_column(Integer)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    # set on a different message sent under a sender/control id already used: the id of the message owning that key
    duplicate_of: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        # the sender's key identifies one message; a refused reuse of it (duplicate_of set) is kept beside it
        Index("uq_hl7_sender_control", "sending_application", "sending_facility", "control_id", unique=True,
              sqlite_where=text("duplicate_of IS NULL"), postgresql_where=text("duplicate_of IS NULL")),
        Index("ix_hl7_status", "status"),
    )


class LaunchLink(Base):
    """A viewer launch link handed to an EPR for one user and one patient: short-lived and used at most once.
    Only the SHA-256 of the link's secret is kept, so the table cannot be turned back into working links."""

    __tablename__ = "launch_links"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(Text)  # the user it was issued for (JSON of the core's Subject)
    # None: a patient nobody registered (the link opens an empty viewer, as for a patient the policy hides)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"))
    view: Mapped[str] = mapped_column(Text, default="{}")  # what to show first (JSON: date range, study, most recent)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    used_from: Mapped[str | None] = mapped_column(String(100))
