"""What the REST door answers, as models: the OpenAPI document shows them, and FastAPI checks every answer
against them, so the documentation cannot drift from the service. camelCase, as every REST body here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(_Out):
    """Every refusal of the REST door: a stable code, a sentence saying what is wrong and what to do, and the
    parameter or key it is about."""

    error: str = Field(description="Stable code: the refusal's kind (bad-request, not-authenticated, forbidden, "
                       "insufficient-scope, not-found, gone, conflict, invalid, ...) or the upload's (corrupt, too-large, "
                       "unknown-patient, bad-metadata, ...)")
    message: str = Field(description="What is wrong, for people")
    detail: str | list[dict[str, Any]] = Field(
        description="The message again, or for a malformed request FastAPI's list of field errors (kept for clients "
        "written against FastAPI's own bodies)")
    field: str | None = Field(None, description="The parameter or metadata key at fault (camelCase, dotted)")


class UploadProblem(Problem):
    """A refused upload: the same body, and which file it is about."""

    item: int | None = Field(None, description="Index of the file in the request (0-based)")
    filename: str | None = None


class PatientLink(_Out):
    id: str = Field(description="The patient's opaque id")
    link: str


class BodySiteOut(_Out):
    system: str
    code: str | None
    display: str | None
    laterality: Literal["left", "right", "both"] | None


class ConsentSummary(_Out):
    id: str
    level: Literal["record", "teaching", "publication"]
    status: Literal["active", "withdrawn"]
    givenBy: str | None


class PhotoOut(_Out):
    id: str
    patient: PatientLink
    description: str | None
    originalFilename: str | None
    bodySite: BodySiteOut | None
    view: str | None
    specialty: str | None = Field(description="NHS Treatment Function code")
    sensitivity: Literal["N", "R", "V"]
    consent: ConsentSummary | None = Field(description="The strongest consent covering the photo")
    takenAt: str | None
    storedAt: str | None
    mediaType: str
    width: int | None
    height: int | None
    studyInstanceUid: str
    sopInstanceUid: str
    links: dict[str, str] = Field(description="self, preview, thumbnail, image, and original for roles allowed it")


class PhotoPage(_Out):
    total: int = Field(description="How many photos of the patient the caller may see")
    offset: int
    limit: int
    items: list[PhotoOut]
    links: dict[str, str] = Field(description="self, and next while there are more")


class AccessEntry(_Out):
    subject: str
    grantedBy: str | None
    grantedAt: str | None


class AccessList(_Out):
    subjects: list[AccessEntry]


class SensitivityOut(_Out):
    id: str
    sensitivity: Literal["N", "R", "V"]


class ConsentOut(_Out):
    id: str
    patient: PatientLink
    level: Literal["record", "teaching", "publication"]
    givenBy: str
    capturedBy: str
    date: str | None
    status: Literal["active", "withdrawn"]
    withdrawnAt: str | None
    scope: Literal["patient", "encounter", "photos"]
    encounter: str | None = Field(description="The visit number, for scope encounter")
    photos: list[str]
    purposeNote: str | None


class ConsentList(_Out):
    total: int
    items: list[ConsentOut]


class UploadedPhoto(_Out):
    assetId: str
    mediaId: str = Field(description="The photo's FHIR Media id (the same as assetId)")
    status: Literal["created", "existing"]
    filename: str | None
    sha256: str
    mediaType: str
    width: int | None
    height: int | None
    studyInstanceUid: str
    seriesInstanceUid: str
    sopInstanceUid: str
    transferSyntaxUid: str | None
    quarantined: bool
    consentCovered: bool = Field(description="False: no consent covers it for care yet, so it stays hidden")
    links: dict[str, str]


class UploadOut(_Out):
    patient: PatientLink
    consentId: str | None = Field(description="The consent captured with the photos, if any")
    replayed: bool = Field(description="True: the answer to an earlier request with the same Idempotency-Key")
    photos: list[UploadedPhoto]
    warnings: list[str] | None = None


class PatientName(_Out):
    family: str | None
    given: str | None
    prefix: str | None


class IdentifierOut(_Out):
    system: str
    value: str
    type: str | None
    assigner: str | None


class EncounterOut(_Out):
    visitNumber: str | None
    class_: str | None = Field(alias="class", serialization_alias="class")
    status: str
    location: str | None
    specialty: str | None
    attending: str | None
    admittedAt: str | None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PatientOut(_Out):
    id: str
    name: PatientName
    birthDate: str | None
    sex: str | None
    deceasedAt: str | None
    nhsNumberStatus: str | None
    identifiers: list[IdentifierOut]
    mergedInto: PatientLink | None = Field(description="For a merged record: the record it was merged into")
    mergedAt: str | None
    currentEncounter: EncounterOut | None
    links: dict[str, str]


class PatientList(_Out):
    total: int
    items: list[PatientOut]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route: each refusal status with its body and when it happens."""
    return {status: {"model": Problem, "description": WHEN[status]} for status in statuses}


WHEN = {
    400: "A malformed parameter or header (patient reference, purpose of use, break-glass without ETREAT)",
    401: "No bearer token, or one that does not verify (WWW-Authenticate says why)",
    403: "The role may not do this, or the token's scopes do not allow it (WWW-Authenticate: insufficient_scope)",
    404: "Not found, or not visible to the caller: the two are answered alike",
    409: "The record's state does not allow it (e.g. a consent already withdrawn)",
    410: "The photo was taken out of the record (entered in error); said only to a caller who could otherwise see it",
    413: "A file over the size limit",
    415: "Not an accepted type",
    422: "A value breaks a rule (named in the body)",
    500: "A stored file is missing (run `clinphoto store check`)",
    503: "Bearer tokens cannot be checked now (the issuer's keys are unreachable)",
}
