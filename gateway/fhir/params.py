"""FHIR search parameters: dates with prefixes and partial precision, tokens, references, paging and the
handling of parameters this server does not know (lenient by default, refused under Prefer: handling=strict)."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from gateway.core.photo_search import TimeRange
from gateway.fhir.outcome import FhirError
from gateway.http.numbers import NotANumber, whole_number

DEFAULT_COUNT, MAX_COUNT = 20, 200
# the parameters every search takes, whatever the resource
COMMON = {"_count", "_sort", "_include", "_summary", "_elements", "_format", "_cursor", "_total"}
# re.ASCII: \d alone also takes other scripts' digits (٢٠٢٤), which int() reads as 2024
_DATE = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb)?(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$", re.ASCII)


@dataclass
class Query:
    """A search's parameters: each name with every value it was given (repeats AND, commas OR)."""

    values: dict[str, list[str]]
    strict: bool
    ignored: list[str] = field(default_factory=list)

    def get(self, name: str) -> list[str]:
        return self.values.get(name, [])

    def one(self, name: str) -> str | None:
        got = self.get(name)
        if len(got) > 1:
            raise FhirError(400, f"{name} may be given once")
        return got[0] if got else None

    def check_known(self, known: set[str]) -> None:
        """Unknown parameters: refused under handling=strict, else left out and named in the answer."""
        unknown = sorted(n for n in self.values if n not in known and n not in COMMON)
        if unknown and self.strict:
            raise FhirError(400, f"unknown search parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        self.ignored = unknown


def query_of(items: list[tuple[str, str]], prefer: str | None) -> Query:
    values: dict[str, list[str]] = {}
    for name, value in items:
        values.setdefault(name, []).append(value)
    strict = "handling=strict" in (prefer or "").replace(" ", "").lower()
    return Query(values, strict)


def count_of(q: Query) -> int:
    text = q.one("_count")
    if text is None:
        return DEFAULT_COUNT
    try:
        # a larger _count (up to int64) is answered with at most MAX_COUNT entries, as FHIR lets a server do
        return min(whole_number(text, "_count"), MAX_COUNT)
    except NotANumber as exc:
        raise FhirError(400, str(exc)) from None


def date_range(text: str, name: str) -> TimeRange:
    """One date parameter value as a half-open range of instants (FHIR: a value stands for its whole precision)."""
    m = _DATE.match(text.strip())
    if m is None:
        raise FhirError(400, f"{name}: {text!r} is not a FHIR date (e.g. 2024-05-01, ge2024-05, lt2024-05-01T10:00:00Z)")
    prefix, y, mo, d, hh, mi, ss, frac, tz = m.groups()
    prefix = prefix or "eq"
    try:
        if mo is None:
            start = datetime(int(y), 1, 1)
            end = datetime(int(y) + 1, 1, 1)
        elif d is None:
            start = datetime(int(y), int(mo), 1)
            end = start + timedelta(days=calendar.monthrange(int(y), int(mo))[1])
        elif hh is None:
            start = datetime(int(y), int(mo), int(d))
            end = start + timedelta(days=1)
        else:
            if tz is None:
                raise FhirError(400, f"{name}: a time needs its zone (Z or +hh:mm): {text!r}")
            start = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0), int(float(frac or 0) * 1e6))
            end = start + (timedelta(microseconds=1) if frac else timedelta(seconds=1) if ss else timedelta(minutes=1))
    except ValueError:
        raise FhirError(400, f"{name}: {text!r} is not a real date") from None
    zone = timezone.utc
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    # a date without a time is read in UTC: stored times are UTC, and the server has no other zone to prefer
    lower, upper = start.replace(tzinfo=zone), end.replace(tzinfo=zone)
    return {
        "eq": TimeRange(lower, upper),
        "ne": TimeRange(lower, upper, outside=True),
        "gt": TimeRange(upper, None),
        "sa": TimeRange(upper, None),
        "ge": TimeRange(lower, None),
        "lt": TimeRange(None, lower),
        "eb": TimeRange(None, lower),
        "le": TimeRange(None, upper),
    }[prefix]


def birth_date(text: str) -> date:
    try:
        return date.fromisoformat(text.removeprefix("eq"))
    except ValueError:
        raise FhirError(400, f"birthdate: {text!r} is not a full date (YYYY-MM-DD)") from None


def token(text: str) -> tuple[str | None, str]:
    """system|code, |code (no system) or code (any system)."""
    if "|" in text:
        system, _, code = text.partition("|")
        return system, code
    return None, text


def reference_id(text: str, resource: str, name: str) -> str:
    """Patient/abc, abc or an absolute URL ending in Patient/abc: the id."""
    value = text.strip()
    marker = f"{resource}/"
    if marker in value:
        value = value.rsplit(marker, 1)[1]
    elif "/" in value:
        raise FhirError(400, f"{name}: {text!r} is not a reference to a {resource}")
    if not value or len(value) > 64:
        raise FhirError(400, f"{name}: {text!r} names no {resource}")
    return value


def split_or(values: list[str]) -> list[list[str]]:
    """Each repeat of a parameter (AND), split on commas not escaped (OR)."""
    return [[v.replace("\\,", ",") for v in re.split(r"(?<!\\),", value)] for value in values]
