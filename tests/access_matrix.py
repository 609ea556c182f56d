"""The access matrix: 21 callers x 42 photos with the expected visibility of each pair.

Every exit (REST photos API, FHIR, C-FIND/C-GET/C-MOVE, QIDO/WADO, viewer,
exports) runs this same matrix through its own path and must find zero
leaks and zero misses:

    from tests.access_matrix import USERS, PEERS, build_access_matrix, dicom_peers
    world = build_access_matrix(gw)            # rows + blobs, through the store
    gw.settings.auth.dicom_peers = dicom_peers()   # DICOM doors: PEERS as configured AEs
    for user in USERS:                         # or PEERS for DICOM doors
        headers = world.headers(gw, user)      # dev JWT + purpose/break-glass headers
        expected = world.visible_asset_ids(user)       # set of Asset.id
        expected_of_pa = world.visible_asset_ids(user, patient="PA")
        problems += world.problems(user, ids_the_door_returned, door="C-FIND")
    assert not problems, "\n".join(problems)

The expected visibility is computed by `expected_visible()` below, written
from the rules as the issue states them (and as gateway/core/policy/settings.py
documents the role defaults), independently of gateway/core/policy/rules.py:

 1. Only photos with status 'active' are ever shown.
 2. Roles act only for their purposes: clinician TREAT/ETREAT/TRAIN;
    medical-illustration TREAT/TRAIN/HRESCH/PUBLISH; educator TRAIN;
    researcher HRESCH; integration-engineer and admin none. DICOM peers act
    for their configured purpose.
 3. ETREAT is break-glass: it needs a reason and only clinicians may use it.
    It lifts the specialty rule and permits R photos, never V.
 4. SMART scopes narrow: a user/ or system/ scope reading Media (or *) allows
    every patient; a patient/ scope only the patient in the token; no such
    scope, nothing. Scopes on other types (DocumentReference, Binary,
    ImagingStudy) grant no photos here, and a scope with a query part
    (`?security-label=N`) grants nothing, since it may only narrow.
 5. Consent that applies to a photo: every consent linked to the photo (the
    one captured with it and any photo-scoped consent naming it; a photo may
    have several), one of its patient with scope 'patient', or with scope
    'encounter' for the photo's encounter. Care (TREAT/ETREAT) needs any applying consent; a withdrawn one
    still counts for photos stored before the withdrawal. Teaching and research
    need an active teaching or publication consent; publication needs an active
    publication consent; a best-interests decision only ever counts for care.
 6. Sensitivity: N for clinicians, medical illustration, educators and
    researchers; R for medical illustration and for clinicians of the photo's
    own specialty; V only for the uploader and the people on its access list.
    A DICOM peer sees the sensitivities it is configured for (V as for people,
    named on the access list as ae:AETITLE).
 7. Specialty (clinicians, and peers configured with specialties): the photo's
    specialty is one of theirs, or, for an N photo, the patient has a current
    (in-progress, not discharged) encounter in one of their specialties.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from gateway.core.identity import PeerPermissions, Subject
from gateway.core.policy.settings import DicomPeer
from store.models import Asset, AssetAccess, Consent, ConsentAsset, Encounter, Patient, PatientIdentifier

MRN_SYSTEM = "https://trust.example.nhs.uk/Id/mrn"
MRN_ASSIGNER = "RXX"

# ---------------------------------------------------------------------------
# Patients, their encounters and consents (ages in days before "now")

PATIENTS = {
    "PA": dict(
        name=("ADAMS", "Alice"), mrn="MA0001",
        encounters={"PA-derm": dict(specialty="330", current=True)},
        consents={"PA-teach": dict(level="teaching", given_by="patient", status="active", scope="patient")},
    ),
    "PB": dict(
        name=("BROWN", "Bob"), mrn="MB0002",
        encounters={"PB-plas": dict(specialty="160", current=False)},
        consents={
            "PB-rec": dict(level="record", given_by="patient", status="active", scope="patient"),
            "PB-pub": dict(level="publication", given_by="patient", status="withdrawn", withdrawn_days=10, scope="patient"),
        },
    ),
    "PC": dict(  # a child: parent's consent for the paediatric episode only
        name=("CLARK", "Cara"), mrn="MC0003",
        encounters={"PC-paeds": dict(specialty="420", current=True), "PC-old": dict(specialty="100", current=False)},
        consents={"PC-enc": dict(level="teaching", given_by="parent", status="active", scope="encounter", encounter="PC-paeds")},
    ),
    "PD": dict(  # lacks capacity: best-interests decision, record use only
        name=("DAVIES", "Dan"), mrn="MD0004",
        encounters={"PD-burns": dict(specialty="161", current=True)},
        consents={"PD-bi": dict(level="teaching", given_by="best-interests", status="active", scope="patient")},
    ),
    "PE": dict(  # consent per photo only
        name=("EVANS", "Eve"), mrn="ME0005",
        encounters={},
        consents={
            "PE-pub": dict(level="publication", given_by="patient", status="active", scope="photos"),
            "PE-rec": dict(level="record", given_by="patient", status="active", scope="photos"),
            "PE-teach-wd": dict(level="teaching", given_by="patient", status="withdrawn", withdrawn_days=5, scope="photos"),
        },
    ),
    "PF": dict(  # withdrew their only consent ten days ago
        name=("FOSTER", "Fay"), mrn="MF0006",
        encounters={"PF-derm": dict(specialty="330", current=True)},
        consents={"PF-rec-wd": dict(level="record", given_by="patient", status="withdrawn", withdrawn_days=10, scope="patient")},
    ),
}


@dataclass(frozen=True)
class Photo:
    key: str
    patient: str
    sensitivity: str
    specialty: str | None
    encounter: str | None = None
    consent: str | None = None  # consent captured with the photo (Asset.consent_id), linked in consent_assets
    also_linked: tuple[str, ...] = ()  # further photo-scoped consents naming it (consent_assets only)
    uploaded_by: str | None = "mi.jones"
    access: tuple[str, ...] = ()
    status: str = "active"
    age_days: int = 30  # stored this many days ago


PHOTOS = [
    Photo("PA-01", "PA", "N", "330", encounter="PA-derm"),
    Photo("PA-02", "PA", "N", "160"),
    Photo("PA-03", "PA", "R", "330", encounter="PA-derm"),
    Photo("PA-04", "PA", "R", "160"),
    Photo("PA-05", "PA", "V", "330", uploaded_by="dr.derm", access=("dr.named",)),
    Photo("PA-06", "PA", "N", None),
    Photo("PA-07", "PA", "N", "330", status="quarantined"),
    Photo("PA-08", "PA", "V", None, uploaded_by="mi.jones"),
    Photo("PA-09", "PA", "N", "420"),
    Photo("PA-10", "PA", "R", None),
    Photo("PB-01", "PB", "N", "160", encounter="PB-plas"),
    Photo("PB-02", "PB", "N", "330"),
    Photo("PB-03", "PB", "R", "160", encounter="PB-plas"),
    Photo("PB-04", "PB", "N", "160", age_days=2),
    # "PACS_DERM" without the ae: prefix is a user's name, not the peer's: it must not open the photo to the peer
    Photo("PB-05", "PB", "V", "160", uploaded_by="dr.plastics", access=("dr.derm", "PACS_DERM")),
    Photo("PB-06", "PB", "N", "100"),
    Photo("PB-07", "PB", "N", None),
    Photo("PB-08", "PB", "N", "160", status="entered-in-error"),
    Photo("PC-01", "PC", "N", "420", encounter="PC-paeds"),
    Photo("PC-02", "PC", "N", "100", encounter="PC-old"),
    Photo("PC-03", "PC", "N", "330", encounter="PC-paeds"),
    Photo("PC-04", "PC", "R", "420", encounter="PC-paeds"),
    Photo("PC-05", "PC", "N", "420"),
    Photo("PC-06", "PC", "V", "420", encounter="PC-paeds", uploaded_by="dr.paeds", access=("mi.jones",)),
    Photo("PC-07", "PC", "N", "100", encounter="PC-paeds"),
    Photo("PC-08", "PC", "R", "330", encounter="PC-paeds"),
    Photo("PD-01", "PD", "N", "161", encounter="PD-burns"),
    Photo("PD-02", "PD", "R", "161", encounter="PD-burns"),
    Photo("PD-03", "PD", "N", "330"),
    Photo("PD-04", "PD", "V", "161", uploaded_by="dr.burns", access=("dr.named", "ed.teacher", "ae:PACS_ALL")),
    Photo("PE-01", "PE", "N", "330", consent="PE-pub"),
    Photo("PE-02", "PE", "N", "330", consent="PE-rec"),
    Photo("PE-03", "PE", "N", "330"),
    Photo("PE-04", "PE", "R", "330", consent="PE-pub"),
    Photo("PE-05", "PE", "N", "330", consent="PE-teach-wd", age_days=30),
    Photo("PE-06", "PE", "N", "330", consent="PE-teach-wd", age_days=2),
    Photo("PE-07", "PE", "V", "330", consent="PE-pub", uploaded_by="mi.pub", access=("ed.teacher", "res.smith")),
    # captured with record consent, later also named by the publication consent: both cover it
    Photo("PE-08", "PE", "N", "330", consent="PE-rec", also_linked=("PE-pub",)),
    Photo("PF-01", "PF", "N", "330", age_days=30),
    Photo("PF-02", "PF", "N", "330", age_days=2),
    Photo("PF-03", "PF", "R", "160", age_days=30),
    Photo("PF-04", "PF", "N", "420", age_days=30),
]


@dataclass(frozen=True)
class User:
    key: str
    sub: str
    role: str
    specialties: tuple[str, ...] = ()
    purpose: str = "TREAT"
    break_glass: str | None = None
    scopes: tuple[str, ...] = ("user/Media.rs", "user/Patient.rs")
    patient: str | None = None  # patient key for patient/ scopes
    # DICOM peers only
    sensitivities: tuple[str, ...] | None = None


USERS = [
    User("derm", "dr.derm", "clinician", ("330",)),
    User("plastics", "dr.plastics", "clinician", ("160",)),
    User("paeds", "dr.paeds", "clinician", ("420",)),
    User("multi", "dr.multi", "clinician", ("100", "330")),
    User("burns", "dr.burns", "clinician", ("161",)),
    User("ed-breakglass", "dr.ed", "clinician", ("180",), purpose="ETREAT", break_glass="unconscious patient in resus"),
    User("ed-treat", "dr.ed", "clinician", ("180",)),
    User("named", "dr.named", "clinician", ()),
    User("derm-teaching", "dr.derm", "clinician", ("330",), purpose="TRAIN"),
    User("derm-patient-scope", "dr.derm", "clinician", ("330",), scopes=("patient/Media.rs",), patient="PA"),
    User("derm-no-media-scope", "dr.derm", "clinician", ("330",), scopes=("user/Patient.rs",)),
    User("illustration", "mi.jones", "medical-illustration"),
    User("illustration-publish", "mi.pub", "medical-illustration", purpose="PUBLISH"),
    User("illustration-research", "mi.jones", "medical-illustration", purpose="HRESCH"),
    User("educator", "ed.teacher", "educator", purpose="TRAIN"),
    User("researcher", "res.smith", "researcher", purpose="HRESCH"),
    User("engineer", "int.eng", "integration-engineer"),
    User("admin", "root", "admin"),
    User("educator-treat", "ed.teacher", "educator"),
    # scopes that must not widen access: a query part we do not enforce, and other resource types
    User("derm-label-scope", "dr.derm", "clinician", ("330",), scopes=("user/Media.rs?security-label=N", "user/Patient.rs")),
    User("derm-other-types", "dr.derm", "clinician", ("330",), scopes=("user/DocumentReference.rs", "user/Binary.r", "user/ImagingStudy.rs")),
]

# DICOM peers (role system): subject = AE title
PEERS = [
    User("pacs-derm", "PACS_DERM", "system", ("330",), scopes=("system/*.rs",), sensitivities=("N",)),
    User("pacs-all", "PACS_ALL", "system", (), scopes=("system/*.rs",), sensitivities=("N", "R")),
]

ROLE_PURPOSES = {
    "clinician": {"TREAT", "ETREAT", "TRAIN"},
    "medical-illustration": {"TREAT", "TRAIN", "HRESCH", "PUBLISH"},
    "educator": {"TRAIN"},
    "researcher": {"HRESCH"},
}


# ---------------------------------------------------------------------------
# Expected visibility, from the written rules


def _consent_counts(user: User, photo: Photo, consent_key: str, consent: dict) -> bool:
    patient = PATIENTS[photo.patient]
    applies = (
        consent_key == photo.consent
        or consent_key in photo.also_linked
        or (consent_key in patient["consents"] and consent["scope"] == "patient")
        or (consent_key in patient["consents"] and consent["scope"] == "encounter" and photo.encounter is not None
            and consent.get("encounter") == photo.encounter)
    )
    if not applies:
        return False
    if user.purpose in ("TREAT", "ETREAT"):
        if consent["status"] == "active":
            return True
        # withdrawn: still part of the record for photos stored before the withdrawal
        return consent["withdrawn_days"] < photo.age_days
    if consent["status"] != "active" or consent["given_by"] == "best-interests":
        return False
    if user.purpose in ("TRAIN", "HRESCH"):
        return consent["level"] in ("teaching", "publication")
    if user.purpose == "PUBLISH":
        return consent["level"] == "publication"
    return False


def _all_consents() -> dict[str, dict]:
    return {k: c for p in PATIENTS.values() for k, c in p["consents"].items()}


def expected_visible(user: User, photo: Photo, resource: str = "Media", *, consent_and_scope: bool = True) -> bool:
    """Whether the user sees the photo asked for as `resource` (SMART scopes are per type: the FHIR door serves a
    photo as Media, DocumentReference and Binary). consent_and_scope=False: by every rule but those two (what the
    need-to-know rule for patients reads)."""
    if photo.status != "active":
        return False
    # purposes of the role
    if user.role == "system":
        pass  # a peer acts for its configured purpose
    elif user.purpose not in ROLE_PURPOSES.get(user.role, set()):
        return False
    breaking = user.purpose == "ETREAT"
    if breaking and (not user.break_glass or user.role != "clinician"):
        return False
    if user.break_glass and not breaking:
        return False
    # scopes
    media_scopes = [s for s in user.scopes if "?" not in s and s.split("/")[1].split(".")[0] in (resource, "*")]
    if consent_and_scope and not media_scopes:
        return False
    if consent_and_scope and not any(s.startswith(("user/", "system/")) for s in media_scopes) and photo.patient != user.patient:
        return False
    # consent
    if consent_and_scope and not any(_consent_counts(user, photo, k, c) for k, c in _all_consents().items()):
        return False
    # sensitivity
    if photo.sensitivity == "V":
        # peers are named on access lists as ae:AETITLE
        listed_as = f"ae:{user.sub}" if user.role == "system" else user.sub
        if user.sub != photo.uploaded_by and listed_as not in photo.access:
            return False
    elif photo.sensitivity == "R":
        if user.role == "system":
            if "R" not in user.sensitivities:
                return False
        elif user.role not in ("medical-illustration", "clinician"):
            return False
    elif photo.sensitivity == "N":
        if user.role == "system" and "N" not in user.sensitivities:
            return False
        if user.role not in ("clinician", "medical-illustration", "educator", "researcher", "system"):
            return False
    # specialty (need to know)
    bound = user.role == "clinician" or (user.role == "system" and user.specialties)
    if bound and not breaking and photo.sensitivity != "V":
        if photo.specialty in user.specialties:
            return True
        if photo.sensitivity == "R":
            return False
        current = [e["specialty"] for e in PATIENTS[photo.patient]["encounters"].values() if e["current"]]
        return any(s in user.specialties for s in current)
    return True


def expected_knows_patient(user: User, patient: str) -> bool:
    """The need-to-know rule for a patient's records beyond photos (Patient, Consent), from the written rules: a
    role not bound by the specialty rule (or a valid break-glass) knows every patient; a bound one knows a patient
    with a current encounter in one of its specialties, or one it could see a photo of by every rule but consent
    and scopes. (Scopes, and a role that may not act for its purpose at all, are the door's refusals.)"""
    bound = user.role == "clinician" or (user.role == "system" and bool(user.specialties))
    breaking = user.purpose == "ETREAT" and bool(user.break_glass) and user.role == "clinician"
    if not bound or breaking:
        return True
    current = {e["specialty"] for e in PATIENTS[patient]["encounters"].values() if e["current"]}
    if current & set(user.specialties):
        return True
    return any(expected_visible(user, p, consent_and_scope=False) for p in PHOTOS if p.patient == patient)


# ---------------------------------------------------------------------------
# Putting the matrix into a store


def small_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


RENDITION_SIZES = {"original": (64, 48), "preview": (32, 24), "thumbnail": (16, 12)}


@dataclass
class MatrixWorld:
    now: datetime
    patient_ids: dict[str, int] = field(default_factory=dict)
    patient_public_ids: dict[str, str] = field(default_factory=dict)
    asset_ids: dict[str, str] = field(default_factory=dict)
    asset_keys: dict[str, str] = field(default_factory=dict)  # asset id -> photo key
    sha256: dict[tuple[str, str], str] = field(default_factory=dict)  # (photo key, rendition) -> blob hash

    def identifier(self, patient_key: str) -> tuple[str, str]:
        return MRN_SYSTEM, PATIENTS[patient_key]["mrn"]

    def visible_keys(self, user: User, patient: str | None = None, resource: str = "Media") -> set[str]:
        return {p.key for p in PHOTOS if expected_visible(user, p, resource) and (patient is None or p.patient == patient)}

    def visible_asset_ids(self, user: User, patient: str | None = None, resource: str = "Media") -> set[str]:
        return {self.asset_ids[k] for k in self.visible_keys(user, patient, resource)}

    def problems(self, user: User, got_asset_ids, patient: str | None = None, door: str = "") -> list[str]:
        """'LEAK ...' / 'MISS ...' lines for what a door returned to this user (empty when exactly right)."""
        got, want = set(got_asset_ids), self.visible_asset_ids(user, patient)
        where = f"{door}: " if door else ""
        return [f"{where}LEAK {user.key} sees {self.asset_keys.get(a, a)}" for a in sorted(got - want)] + [
            f"{where}MISS {user.key} does not see {self.asset_keys[a]}" for a in sorted(want - got)
        ]

    def subject(self, user: User, network_address: str = "127.0.0.1") -> Subject:
        return Subject(
            sub=user.sub, role=user.role, specialties=user.specialties, scopes=user.scopes,
            # the patient in context by opaque id as a SMART launch names it (tokens below: by row id, as older ones)
            patient=self.patient_public_ids[user.patient] if user.patient else None,
            purpose_of_use=user.purpose, break_glass_reason=user.break_glass,
            network_address=network_address, sensitivities=user.sensitivities,
            peer=PeerPermissions(ae_title=user.sub) if user.role == "system" else None,
        )

    def headers(self, gw, user: User) -> dict[str, str]:
        from tests.auth_helpers import auth_headers

        return auth_headers(
            gw, role=user.role, sub=user.sub, specialties=user.specialties, scopes=" ".join(user.scopes),
            purpose=user.purpose, break_glass=user.break_glass,
            patient=self.patient_ids[user.patient] if user.patient else None,
        )


def dicom_peers(host: str = "127.0.0.1") -> list[DicomPeer]:
    """Settings entries for PEERS (add to settings.auth.dicom_peers)."""
    return [
        DicomPeer(ae_title=p.sub, hosts=[host], purpose_of_use=p.purpose, sensitivities=list(p.sensitivities),
                  specialties=list(p.specialties), name=p.key)
        for p in PEERS
    ]


def build_access_matrix(gw, *, with_blobs: bool = True) -> MatrixWorld:
    """Insert the matrix's patients, encounters, consents, photos (with JPEG blobs) and access lists."""
    now = datetime.now(timezone.utc)
    world = MatrixWorld(now=now)
    with gw.db.write() as session:
        encounter_ids, consent_ids = {}, {}
        for key, p in PATIENTS.items():
            patient = Patient(family_name=p["name"][0], given_names=p["name"][1], sex="U")
            session.add(patient)
            session.flush()
            world.patient_ids[key] = patient.id
            world.patient_public_ids[key] = patient.public_id
            session.add(PatientIdentifier(patient_id=patient.id, system=MRN_SYSTEM, value=p["mrn"], type_code="MR", assigner=MRN_ASSIGNER))
            for ekey, e in p["encounters"].items():
                enc = Encounter(
                    patient_id=patient.id, visit_system=MRN_ASSIGNER, visit_number=f"V-{ekey}", specialty=e["specialty"],
                    status="in-progress" if e["current"] else "finished", admitted_at=now - timedelta(days=60),
                    discharged_at=None if e["current"] else now - timedelta(days=40), class_code="AMB",
                )
                session.add(enc)
                session.flush()
                encounter_ids[ekey] = enc.id
            for ckey, c in p["consents"].items():
                consent = Consent(
                    patient_id=patient.id, level=c["level"], given_by=c["given_by"], status=c["status"],
                    withdrawn_at=now - timedelta(days=c["withdrawn_days"]) if c["status"] == "withdrawn" else None,
                    scope=c["scope"], encounter_id=encounter_ids.get(c.get("encounter")), captured_by="mi.jones",
                    consent_date=(now - timedelta(days=90)).date(),
                )
                session.add(consent)
                session.flush()
                consent_ids[ckey] = consent.id
        for n, photo in enumerate(PHOTOS):
            hashes = {}
            for rendition, size in RENDITION_SIZES.items():
                data = small_jpeg(n, size)
                ref = gw.blobs.put_bytes(data) if with_blobs else None
                hashes[rendition] = ref.sha256 if ref else uuid.uuid4().hex * 2
                world.sha256[(photo.key, rendition)] = hashes[rendition]
            created = now - timedelta(days=photo.age_days)
            asset = Asset(
                patient_id=world.patient_ids[photo.patient],
                encounter_id=encounter_ids.get(photo.encounter),
                consent_id=consent_ids.get(photo.consent),
                study_uid=f"2.25.{uuid.uuid4().int}", series_uid=f"2.25.{uuid.uuid4().int}", sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                instance_number=1, sha256=hashes["original"], size=len(small_jpeg(n, RENDITION_SIZES["original"])),
                media_type="image/jpeg", original_filename=f"{photo.key}.jpg", width=64, height=48,
                preview_sha256=hashes["preview"], thumbnail_sha256=hashes["thumbnail"],
                taken_at=created, body_site_code="39937001", body_site_display="Skin structure", laterality=None,
                specialty=photo.specialty, sensitivity=photo.sensitivity, description=f"matrix photo {photo.key}",
                source="upload", uploaded_by=photo.uploaded_by, status=photo.status, created_at=created,
            )
            session.add(asset)
            session.flush()
            world.asset_ids[photo.key] = asset.id
            world.asset_keys[asset.id] = photo.key
            for ckey in ((photo.consent,) if photo.consent else ()) + photo.also_linked:
                session.add(ConsentAsset(consent_id=consent_ids[ckey], asset_id=asset.id))
            for subject in photo.access:
                session.add(AssetAccess(asset_id=asset.id, subject=subject, granted_by="mi.jones"))
        session.flush()
    return world


@pytest.fixture
def matrix_world(gw) -> MatrixWorld:
    """The matrix in the test's store (import this name into a test module to use it as a fixture)."""
    return build_access_matrix(gw)
