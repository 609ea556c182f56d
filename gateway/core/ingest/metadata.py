"""The photo metadata every door hands to the pipeline, validated with messages that name the key."""

from __future__ import annotations

import json
import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.core.ingest.errors import BAD_METADATA, IngestRejected
from gateway.core import nhs

NHS_SYSTEM = nhs.NHS_NUMBER_SYSTEM
SYSTEM_ALIASES = {"nhs": NHS_SYSTEM, "nhs-number": NHS_SYSTEM}


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


class BodySiteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(description="SNOMED CT concept id of the body structure")
    laterality: Literal["left", "right", "both"] | None = None
    display: str | None = Field(None, max_length=64)

    @field_validator("code")
    @classmethod
    def _sctid(cls, v: str) -> str:
        v = v.strip()
        if not (v.isdigit() and 6 <= len(v) <= 18 and _verhoeff_ok(v)):
            raise ValueError(f"{v!r} is not a SNOMED CT concept id (6-18 digits with a valid check digit)")
        return v

    @property
    def meaning(self) -> str:
        return self.display or BODY_SITE_MEANINGS.get(self.code) or f"SNOMED CT {self.code}"


class ConsentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    level: Literal["record", "teaching", "publication"]
    given_by: Literal["patient", "parent", "best-interests"] = Field(alias="givenBy")
    captured_by: str | None = Field(None, alias="capturedBy", max_length=200)
    date: dt.date | None = None
    purpose: str | None = Field(None, description="for publication consent: the specific use consented to")


class PhotoMetadata(BaseModel):
    """Keys of the upload API's `metadata` part (and of import manifests)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    patient: str = Field(description="system|value, e.g. https://fhir.nhs.uk/Id/nhs-number|9449305552 or nhs|9449305552")
    encounter: str | None = Field(None, max_length=100, description="visit number")
    body_site: BodySiteIn | None = Field(None, alias="bodySite")
    view: str | None = Field(None, max_length=100)
    specialty: str | None = Field(None, description="NHS Treatment Function code, e.g. 330")
    sensitivity: Literal["N", "R", "V"] = "N"
    consent: ConsentIn | None = None
    consent_id: str | None = Field(None, alias="consentId", max_length=32)
    photographer: str | None = Field(None, max_length=200)
    device: str | None = Field(None, max_length=200)
    taken_at: dt.datetime | None = Field(None, alias="takenAt")
    description: str | None = Field(None, max_length=10000)

    @field_validator("patient")
    @classmethod
    def _patient(cls, v: str) -> str:
        system, sep, value = v.partition("|")
        if not sep or not system.strip() or not value.strip():
            raise ValueError(f"{v!r} must be system|value, e.g. nhs|9449305552")
        system, value = system.strip(), value.strip()
        if SYSTEM_ALIASES.get(system, system) == NHS_SYSTEM:
            # a mistyped NHS number is a typo to fix, not an unknown patient
            reason = nhs.invalid_reason(value)
            if reason:
                raise ValueError(f"{value!r} is not a valid NHS number: {reason}")
            value = nhs.normalise(value)
        return f"{system}|{value}"

    @field_validator("specialty")
    @classmethod
    def _specialty(cls, v: str | None) -> str | None:
        if v is not None and not (v.isdigit() and len(v) == 3):
            raise ValueError(f"{v!r} is not an NHS Treatment Function code (3 digits, e.g. 330)")
        return v

    @model_validator(mode="after")
    def _one_consent(self) -> PhotoMetadata:
        if self.consent is not None and self.consent_id is not None:
            raise ValueError("give either consent or consentId, not both")
        return self

    @property
    def patient_system(self) -> str:
        system = self.patient.partition("|")[0]
        return SYSTEM_ALIASES.get(system.lower(), system)

    @property
    def patient_value(self) -> str:
        return self.patient.partition("|")[2]

    def canonical(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True, separators=(",", ":"))


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after",)) or "metadata"


def _nul_key(value, where: str = "") -> str | None:
    """The first key (dotted) whose name or text value holds a NUL byte, or None."""
    if isinstance(value, str):
        return (where or "metadata") if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and "\x00" in key:
            return path
        found = _nul_key(item, path)
        if found is not None:
            return found
    return None


def parse_metadata(raw: str | bytes | dict) -> PhotoMetadata:
    """Validate; a bad key or value raises IngestRejected(BAD_METADATA) naming every problem."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IngestRejected(BAD_METADATA, f"metadata is not valid JSON: {exc}", field="metadata") from None
    if not isinstance(raw, dict):
        raise IngestRejected(BAD_METADATA, "metadata must be a JSON object", field="metadata")
    nul = _nul_key(raw)
    if nul is not None:
        # PostgreSQL text cannot hold NUL: refused here, naming the key, rather than failing at the insert
        raise IngestRejected(BAD_METADATA, f"invalid metadata: {nul!r} must not contain NUL bytes", field=nul)
    try:
        return PhotoMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = []
        fields = []
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
        raise IngestRejected(BAD_METADATA, "invalid metadata: " + "; ".join(problems), field=",".join(fields)) from None
