"""NHS number: 10 digits, the last a modulus-11 check digit (NHS Data Dictionary)."""

from __future__ import annotations

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"


def normalise(value: str) -> str:
    """Digits only: PAS feeds and people write '944 930 5552' or '944-930-5552'."""
    return value.replace(" ", "").replace("-", "")


def check_digit(first_nine: str) -> int | None:
    """The check digit for nine digits, or None when the remainder makes 10 (no valid number)."""
    total = sum(int(d) * (10 - i) for i, d in enumerate(first_nine))
    digit = 11 - total % 11
    if digit == 11:
        return 0
    if digit == 10:
        return None
    return digit


def is_valid(value: str) -> bool:
    value = normalise(value)
    if len(value) != 10 or not value.isascii() or not value.isdigit():
        return False
    expected = check_digit(value[:9])
    return expected is not None and expected == int(value[9])


def invalid_reason(value: str) -> str | None:
    v = normalise(value)
    if len(v) != 10 or not v.isascii() or not v.isdigit():
        return "an NHS number has exactly 10 digits"
    expected = check_digit(v[:9])  # the format is checked above: only the check digit is left
    if expected is None or expected != int(v[9]):
        return "the NHS number's modulus-11 check digit does not match"
    return None
