"""Checks on request parameters shared by the REST doors: a bad value is a 400 naming it, never a 500."""

from __future__ import annotations

from gateway.core import patient_refs
from gateway.http.errors import DoorError


def parse_patient(text: str, what: str = "patient") -> tuple[str, str]:
    """`system|value` (or nhs|..., mrn|...) -> (system, value), or 400 saying what is wrong with it."""
    try:
        return patient_refs.parse(text)
    except patient_refs.BadPatientRef as exc:
        raise DoorError(400, f"{what}: {exc}", code="bad-request", field=what) from None


def no_nul(value: str | None) -> str | None:
    """Pydantic validator: text fields never carry NUL bytes (PostgreSQL cannot store them)."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value
