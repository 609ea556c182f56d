"""Checks on request parameters shared by the REST doors: a bad value is a 400 naming it, never a 500."""

from __future__ import annotations

from fastapi import HTTPException

# the store's column widths (store/models.py PatientIdentifier): a longer value cannot match anything
MAX_SYSTEM = 200
MAX_VALUE = 100


def parse_patient(text: str, what: str = "patient") -> tuple[str, str]:
    """`system|value` -> (system, value), or 400 saying what is wrong with it."""
    if "\x00" in text:
        raise HTTPException(400, f"{what} must not contain NUL bytes")
    system, sep, value = text.partition("|")
    system, value = system.strip(), value.strip()
    if not sep or not system or not value:
        raise HTTPException(400, f"{what} must be system|value, e.g. https://fhir.nhs.uk/Id/nhs-number|9449305552")
    if len(system) > MAX_SYSTEM or len(value) > MAX_VALUE:
        raise HTTPException(400, f"{what}: the system may have at most {MAX_SYSTEM} characters and the value at most {MAX_VALUE}")
    return system, value


def no_nul(value: str | None) -> str | None:
    """Pydantic validator: text fields never carry NUL bytes (PostgreSQL cannot store them)."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value
