"""The capture request: what every door hands to the ingest pipeline, protocol-free.

    CaptureRequest(source, items, patient=..., governance=...)

- source: where the request came from (Source): a REST or DICOMweb user, the
  importer, a DICOM peer (ae:AETITLE with its network address), the demo. It is
  named in the audit trail and on each stored photo (Asset.source, Asset.uploaded_by).
- items: image files (ImageFile: JPEG, PNG, HEIC/HEIF, TIFF, sniffed from content)
  and received DICOM objects (ReceivedObject: the Part 10 file as the door got it,
  e.g. a C-STORE's encoded dataset with its file meta, or a STOW-RS part).
- patient: a reference into the patient index (an identifier system + value, or the
  internal patient id). A DICOM object names its own patient (PatientID +
  IssuerOfPatientID); when the request names one too, they must agree.
- governance: what the sender says about the photos (body site, view, specialty,
  sensitivity, consent or consent id, encounter, photographer, device, taken at,
  description).

The types check their own values, so every door gets the same rules (a mistyped NHS
number, a SNOMED CT code with a bad check digit, a specialty that is not a Treatment
Function code are refused as BAD_METADATA naming the field). How a door spells its
keys (the upload API's camelCase JSON, an import manifest's columns) is the door's
business: gateway/core/ingest/metadata.py parses those into these types.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.core import nhs
from gateway.core.identity import Subject
from gateway.core.ingest.errors import BAD_METADATA, IngestRejected
from gateway.core.objects import part10
from gateway.core.patient_refs import normalise_identifier
from gateway.core.policy.rules import AE_PREFIX, access_list_name

NHS_SYSTEM = nhs.NHS_NUMBER_SYSTEM


# --- where the request came from -----------------------------------------------------------------------


class Channel(StrEnum):
    """The door a photo came in by (Asset.source, and the audit records' subtype)."""

    UPLOAD = "upload"  # the REST upload API (capture apps)
    IMPORT = "import"  # `clinphoto import` of a legacy archive
    DIMSE = "dimse"  # DICOM C-STORE from a peer
    STOW = "stow"  # DICOMweb STOW-RS
    FHIR = "fhir"  # FHIR: a transaction Bundle (IHE MHD) or a Media with its image inline
    DEMO = "demo"  # `clinphoto demo`


@dataclass(frozen=True)
class Source:
    """Who stores the photos and by which door, as the audit trail and the stored photo name them."""

    channel: Channel
    who: str  # a user's token sub, "os:<user>" for the importer (or its --as), "ae:<AETITLE>" for a DICOM peer
    role: str | None = None
    network: str | None = None  # the caller's IP address (a DICOM peer's address)
    purpose_of_use: str | None = "TREAT"
    name: str | None = None  # display name, for the audit record

    @classmethod
    def user(cls, subject: Subject, channel: Channel = Channel.UPLOAD) -> Source:
        """A person with a verified token (REST upload, DICOMweb STOW-RS)."""
        return cls(channel=channel, who=subject.sub, role=subject.role, network=subject.network_address,
                   purpose_of_use=subject.purpose_of_use, name=subject.name)

    @classmethod
    def of(cls, subject: Subject, channel: Channel) -> Source:
        """The source a door's Subject stores as: a DICOM peer as ae:AETITLE, anyone else by their token sub."""
        return cls(channel=channel, who=access_list_name(subject), role=subject.role, network=subject.network_address,
                   purpose_of_use=subject.purpose_of_use, name=subject.name)

    @classmethod
    def importer(cls, who: str, network: str = "local") -> Source:
        return cls(channel=Channel.IMPORT, who=who, role="importer", network=network)

    @classmethod
    def dicom_peer(cls, ae_title: str, address: str | None, *, name: str | None = None,
                   purpose_of_use: str = "TREAT") -> Source:
        """A DICOM peer sending by C-STORE: named ae:AETITLE, so it never matches a user of the same name."""
        return cls(channel=Channel.DIMSE, who=f"{AE_PREFIX}{ae_title.strip()}", role="system", network=address,
                   purpose_of_use=purpose_of_use, name=name or ae_title.strip())

    @classmethod
    def demo(cls) -> Source:
        return cls(channel=Channel.DEMO, who="clinphoto-demo", role="medical-illustration", network="local")


# --- which patient ----------------------------------------------------------------------------------------


def _refuse_patient(message: str) -> IngestRejected:
    return IngestRejected(BAD_METADATA, f"invalid metadata: 'patient': {message}", field="patient")


@dataclass(frozen=True)
class PatientRef:
    """A patient: by identifier (system, value), by internal id, or as a DICOM object names it
    (PatientID with IssuerOfPatientID, and the issuer's Universal Entity ID when sent).

    Build it with identifier(), internal() or dicom(); each form resolves through merges to the survivor.
    """

    system: str | None = None
    value: str | None = None  # the identifier's value; for a DICOM object its PatientID
    internal_id: int | None = None
    issuer: str | None = None  # DICOM IssuerOfPatientID
    issuer_uid: str | None = None  # DICOM IssuerOfPatientIDQualifiersSequence > UniversalEntityID

    @classmethod
    def identifier(cls, system: str, value: str) -> PatientRef:
        try:
            system, value = normalise_identifier(system, value)
        except ValueError as exc:
            raise _refuse_patient(str(exc)) from None
        return cls(system=system, value=value)

    @classmethod
    def parse(cls, text: str) -> PatientRef:
        """`system|value`, e.g. nhs|9449305552 or https://fhir.nhs.uk/Id/nhs-number|9449305552."""
        system, sep, value = text.partition("|")
        if not sep:
            raise _refuse_patient(f"{text!r} must be system|value, e.g. nhs|9449305552")
        return cls.identifier(system, value)

    @classmethod
    def internal(cls, patient_id: int) -> PatientRef:
        return cls(internal_id=patient_id)

    @classmethod
    def dicom(cls, patient_id: str, issuer: str, issuer_uid: str | None = None) -> PatientRef:
        return cls(value=patient_id.strip(), issuer=issuer.strip(), issuer_uid=(issuer_uid or "").strip() or None)

    @property
    def kind(self) -> Literal["identifier", "internal", "dicom"]:
        if self.internal_id is not None:
            return "internal"
        return "dicom" if self.system is None else "identifier"

    def label(self) -> str:
        """How messages name the patient (an identifier, never a name)."""
        if self.kind == "internal":
            return f"patient {self.internal_id}"
        if self.kind == "dicom":
            return f"PatientID {self.value!r} (IssuerOfPatientID {self.issuer or '(empty)'!r})"
        return f"{self.system}|{self.value}"


# --- what the sender says about the photos ----------------------------------------------------------------


def _verhoeff_ok(number: str) -> bool:
    # SNOMED CT identifiers end in a Verhoeff check digit
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    c = 0
    for i, ch in enumerate(reversed(number)):
        c = d[c][p[i % 8][int(ch)]]
    return c == 0


def is_sctid(code: str) -> bool:
    return code.isascii() and code.isdigit() and 6 <= len(code) <= 18 and _verhoeff_ok(code)


# Meanings for common photographed sites (CID 4031 / CID 4029), used for CodeMeaning when the caller gives none.
BODY_SITE_MEANINGS = {
    "89545001": "Face", "69536005": "Head", "45048000": "Neck", "51185008": "Thorax", "818983003": "Abdomen",
    "77568009": "Back", "40689003": "Upper arm", "368209003": "Right upper arm", "368208006": "Left upper arm",
    "14975008": "Forearm", "85562004": "Hand", "7569003": "Finger", "61685007": "Lower limb", "68367000": "Thigh",
    "30021000": "Lower leg", "56459004": "Foot", "29707007": "Toe", "76248009": "Breast", "80144004": "Nipple",
    "39937001": "Skin structure", "81745001": "Eye", "117590005": "Ear", "45206002": "Nose", "123851003": "Mouth",
    "72098002": "Knee", "46862004": "Buttock", "18911002": "Genitalia", "181262009": "Perineum", "34402009": "Rectum",
    "53120007": "Arm", "15497006": "Scalp", "64237003": "Lip", "16982005": "Shoulder", "72696002": "Knee region",
    "22943007": "Trunk", "29836001": "Hip",
}


def _no_nul(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL: refused here, naming the field, rather than failing at the insert
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


class _Core(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _no_nul(value)


class BodySite(_Core):
    code: str = Field(description="SNOMED CT concept id of the body structure")
    laterality: Literal["left", "right", "both"] | None = None
    display: str | None = Field(None, max_length=64)

    @field_validator("code")
    @classmethod
    def _sctid(cls, v: str) -> str:
        v = v.strip()
        if not is_sctid(v):
            raise ValueError(f"{v!r} is not a SNOMED CT concept id (6-18 digits with a valid check digit)")
        return v

    @property
    def meaning(self) -> str:
        return self.display or BODY_SITE_MEANINGS.get(self.code) or f"SNOMED CT {self.code}"


class ConsentGiven(_Core):
    """A consent captured with the photos (recorded by the one consent writer, scope 'photos')."""

    level: Literal["record", "teaching", "publication"]
    given_by: Literal["patient", "parent", "best-interests"]
    captured_by: str | None = Field(None, max_length=200)
    date: dt.date | None = None
    purpose: str | None = Field(None, max_length=4000, description="for publication consent: the specific use consented to")


class Governance(_Core):
    """What the sender says about the photos; the same for every item of a request."""

    encounter: str | None = Field(None, max_length=100, description="visit number")
    body_site: BodySite | None = None
    view: str | None = Field(None, max_length=100)
    specialty: str | None = Field(None, description="NHS Treatment Function code, e.g. 330")
    sensitivity: Literal["N", "R", "V"] = "N"
    consent: ConsentGiven | None = None
    consent_id: str | None = Field(None, max_length=32)
    photographer: str | None = Field(None, max_length=200)
    device: str | None = Field(None, max_length=200)
    taken_at: dt.datetime | None = None
    description: str | None = Field(None, max_length=10000)

    @field_validator("specialty")
    @classmethod
    def _specialty(cls, v: str | None) -> str | None:
        if v is not None and not (v.isascii() and v.isdigit() and len(v) == 3):
            raise ValueError(f"{v!r} is not an NHS Treatment Function code (3 digits, e.g. 330)")
        return v

    @model_validator(mode="after")
    def _one_consent(self) -> Governance:
        if self.consent is not None and self.consent_id is not None:
            raise ValueError("give either consent or consentId, not both")
        return self

    def canonical(self) -> str:
        """A stable text of the values (the idempotency check compares requests by it)."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after",)) or "metadata"


def refusal_of(exc: ValidationError) -> IngestRejected:
    """A pydantic validation error as BAD_METADATA naming every key at fault (as the model spells them)."""
    problems: list[str] = []
    fields: list[str] = []
    for err in exc.errors():
        where = _where(err["loc"])
        fields.append(where)
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key {where!r}")
        elif err["type"] == "missing":
            problems.append(f"{where!r} is required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where!r}: {msg}" if where != "metadata" else msg)
    return IngestRejected(BAD_METADATA, "invalid metadata: " + "; ".join(problems), field=",".join(fields))


def governance(**values: Any) -> Governance:
    """Governance from keyword values (a door building it from its own fields), refusals as BAD_METADATA."""
    try:
        return Governance.model_validate(values)
    except ValidationError as exc:
        raise refusal_of(exc) from None


# --- the items ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFile:
    """An image file on local disk (spooled by the door); its type is sniffed from its content."""

    path: Path
    filename: str | None = None
    sha256: str | None = None  # when the door hashed it on the way in
    instance_number: int | None = None  # a door that numbers its photos (the importer's manifest row)
    # a DICOMweb door given JPEG bulk data with the sender's DICOM JSON keeps its instance UID
    sop_instance_uid: str | None = None
    # the bytes sent, when the door kept none of them for being over ingest.max_bytes as they came (as ReceivedObject)
    received_size: int | None = None


@dataclass(frozen=True)
class ReceivedObject:
    """A received DICOM object: its Part 10 file (preamble, file meta, data set) exactly as received.

    A C-STORE door writes the association's encoded data set behind its file meta (pynetdicom's
    event.encoded_dataset()); a STOW-RS door spools the application/dicom part. The bytes are kept
    as they are, so a door must not re-encode the data set.
    """

    path: Path
    filename: str | None = None
    sha256: str | None = None  # given by a door that hashed the bytes as they came
    # the door wrote `path` into the gateway's spool for this request and will only delete it: the store may
    # link that file in as the blob instead of copying it (never set for a caller's own file, which could change)
    spooled: bool = False
    # the file's header, when the door read it already (part10.read_head) for a check of its own: not read twice
    head: part10.Head | None = field(default=None, compare=False, repr=False)
    # the bytes the sender sent, when the door kept none of them for being over ingest.max_bytes as they came
    # (the file is then empty): refused as too large, and audited, as a file over the limit is
    received_size: int | None = None


Item = ImageFile | ReceivedObject


@dataclass(frozen=True)
class CaptureRequest:
    """Photos for one patient from one source, stored all or nothing."""

    source: Source
    items: Sequence[Item]
    patient: PatientRef | None = None  # required for image files; DICOM objects name their patient
    governance: Governance = field(default_factory=Governance)
    idempotency_key: str | None = None  # a repeat with the same key (and request) gets the first answer
    session_key: str | None = None  # photos sharing one are one capture session (one series)
    # image files only: a door that keeps the sender's study/series (DICOM objects keep their own)
    study_uid: str | None = None
    series_uid: str | None = None
