"""The upload API's `metadata` JSON (and import manifests): parsed into the core's capture types.

The JSON spells keys in camelCase (`bodySite`, `givenBy`, `consentId`, `takenAt`) and
names the patient as `system|value`; the pipeline never sees this model, only the
PatientRef and Governance it becomes (gateway/core/ingest/request.py, which holds
the rules every door shares). A bad key or value is refused as BAD_METADATA naming
every key at fault as the JSON spells it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from gateway.core.ingest.errors import BAD_METADATA, IngestRejected
from gateway.core.ingest.request import (
    NHS_SYSTEM,
    BodySite,
    ConsentGiven,
    Governance,
    PatientRef,
    refusal_of,
)
from gateway.core.patient_refs import normalise_identifier

__all__ = ["NHS_SYSTEM", "PhotoMetadata", "json_key", "parse_metadata"]

_JSON = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class BodySiteIn(BodySite):
    model_config = _JSON


class ConsentIn(ConsentGiven):
    model_config = _JSON


class PhotoMetadata(Governance):
    """Keys of the upload API's `metadata` part (and of import manifests): Governance's, camelCase, plus `patient`."""

    model_config = _JSON
    patient: str
    body_site: BodySiteIn | None = None
    consent: ConsentIn | None = None

    @field_validator("patient")
    @classmethod
    def _patient(cls, v: str) -> str:
        system, sep, value = v.partition("|")
        if not sep or not system.strip() or not value.strip():
            raise ValueError(f"{v!r} must be system|value, e.g. nhs|9449305552")
        system, value = normalise_identifier(system, value)
        return f"{system}|{value}"

    def patient_ref(self) -> PatientRef:
        system, _, value = self.patient.partition("|")
        return PatientRef(system=system, value=value)

    def governance(self) -> Governance:
        """The core's Governance (not this JSON model): what the pipeline is handed."""
        return Governance.model_validate(self.model_dump(exclude={"patient"}))


def _nul_key(value: Any, where: str = "") -> str | None:
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


def parse_metadata(raw: str | bytes | dict[str, Any]) -> PhotoMetadata:
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
        raise refusal_of(exc) from None


def json_key(path: str) -> str:
    """A core field path as this JSON spells it: 'consent.given_by' -> 'consent.givenBy' (a refusal names
    the key the caller sent); names that are not snake_case (bodySite, PatientID, files) stay as they are."""
    return ".".join(to_camel(part) if "_" in part else part for part in path.split("."))
