"""Apply a mapping to a tokenized HL7 message: plain patient / encounter data for the patient index."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from gateway.core import nhs
from gateway.core.patients import UNSET, EncounterData, IdentifierData, PatientData
from mapping.message import Message, Segment, component, parse_path
from mapping.schema import _PLACEHOLDER, FieldSpec, IdentifierRule, Mapping

HL7_NULL = '""'

# column sizes of store/models.py: a longer value is an AE naming the field, on every backend
LIMITS = {
    "family_name": 200, "given_names": 200, "name_prefix": 50, "sex": 1, "nhs_number_status": 20,
    "visit_number": 100, "visit_system": 200, "class_code": 10, "location": 200, "specialty": 10,
    "attending_id": 100, "attending_name": 200,
}


def _field_getter(path: str) -> Callable[[Message, Segment | None], str]:
    """Mapper._get for one path, parsed once: the decoded value ("" when absent)."""
    name, fld, rep, comp, sub = parse_path(path)
    whole = comp == 1 and sub == 1

    def get(msg: Message, seg: Segment | None) -> str:
        s = seg if seg is not None and seg.name == name else msg.segment(name)
        if s is None:
            return ""
        if fld <= 2 and name == "MSH":
            return s.get(fld, comp, sub, rep)
        reps = s.repetitions(fld)
        if rep > len(reps):
            return ""
        value = reps[rep - 1]
        enc = msg.enc
        if not whole or enc.comp in value or enc.sub in value:
            value = component(value, comp, sub, enc)
        return msg.decode(value) if enc.esc in value else value

    return get


class MappingFault(Exception):
    """The message is understood but cannot be mapped; code from HL7 table 0357."""

    def __init__(self, code: str, text: str, location: str | None) -> None:
        super().__init__(text)
        self.code, self.text, self.location = code, text, location


@dataclass
class MappedPatient:
    patient: PatientData
    # MRG-1 identifiers (A40/A47/A34/A35): the record being merged or re-identified
    prior: list[IdentifierData] = field(default_factory=list)


_DTM = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?\Z")


def parse_dtm(value: str, zone: ZoneInfo) -> datetime:
    """HL7 DTM/TS (YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]); no offset means the mapping's zone."""
    m = _DTM.match(value.strip())
    if not m:
        raise ValueError(value)
    y, mo, d, h, mi, s, frac, off = m.groups()
    micro = int((frac or "0").ljust(6, "0")[:6])
    dt = datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0), micro)
    if off:
        sign = 1 if off[0] == "+" else -1
        delta = timedelta(hours=int(off[1:3]), minutes=int(off[3:5]))
        if delta > timedelta(hours=14):
            raise ValueError(value)
        dt = dt.replace(tzinfo=timezone(sign * delta))
    else:
        dt = dt.replace(tzinfo=zone)
    return dt.astimezone(UTC)


EARLIEST_DATE = date(1850, 1, 1)  # no living person's record is older: 00010101 is a PAS default, not a birth date


def parse_date(value: str, today: date | None = None) -> date:
    """HL7 DT (YYYYMMDD...); a date before 1850 or after `today` is refused as implausible."""
    v = value.strip()
    if len(v) < 8 or not v[:8].isdigit():
        raise ValueError(value)
    parsed = date(int(v[:4]), int(v[4:6]), int(v[6:8]))
    if parsed < EARLIEST_DATE or (today is not None and parsed > today):
        raise ImplausibleDate(value)
    return parsed


class ImplausibleDate(ValueError):
    """A well-formed date no record should hold (before 1850, or in the future)."""


class Mapper:
    def __init__(self, mapping: Mapping, variables: dict[str, str] | None = None) -> None:
        self.m = mapping
        self.zone = ZoneInfo(mapping.timezone)
        self.variables = dict(variables or {})
        self.variables.setdefault("mrn_system", "https://clinphoto.local/Id/mrn/{authority}")
        # each field spec compiled once into a function: the mapping runs ~15 lookups per ADT message
        self._compiled: dict[int, Callable] = {}
        self._patient_fields = [(name, self._compile(spec, name)) for name in type(mapping.patient).model_fields
                                if (spec := getattr(mapping.patient, name)) is not None]
        # identifier systems built only from {authority} and variables depend on CX.4 alone: memoised
        from_message = [k for t in (*(r.system for r in mapping.identifiers), *self.variables.values())
                        for k in _PLACEHOLDER.findall(t) if k != "authority" and k not in self.variables]
        self._systems: dict[tuple[int, str], str] | None = None if from_message else {}
        em = mapping.encounter
        self._encounter_fields = [] if em is None else [
            (name, self._compile(spec, name)) for name in type(em).model_fields
            if name not in ("visit_number", "visit_system") and (spec := getattr(em, name)) is not None]

    # -- values ---------------------------------------------------------------

    def _get(self, msg: Message, path: str, seg: Segment | None) -> tuple[str, str]:
        """(decoded value, location) for a path; seg replaces the first segment of its name (A40 groups)."""
        name, fld, rep, comp, sub = parse_path(path)
        s = seg if seg is not None and seg.name == name else msg.segment(name)
        if s is None:
            return "", path
        if fld <= 2 and name == "MSH":
            return s.get(fld, comp, sub, rep), path
        reps = s.repetitions(fld)
        if rep > len(reps):
            return "", path
        value = reps[rep - 1]
        if comp != 1 or sub != 1 or msg.enc.comp in value or msg.enc.sub in value:
            value = component(value, comp, sub, msg.enc)
        return (msg.decode(value) if msg.enc.esc in value else value), path

    def _template(self, msg: Message, text: str, seg: Segment | None, extra: dict[str, str] | None = None) -> str:
        if "{" not in text:  # most systems are plain URIs: no regex pass
            return text

        def sub(m: re.Match) -> str:
            key = m.group(1)
            if extra and key in extra:
                return extra[key]
            if key in self.variables:
                return self.variables[key]
            return self._get(msg, key, seg)[0]

        return _PLACEHOLDER.sub(sub, text)

    def value(self, msg: Message, spec: FieldSpec, seg: Segment | None = None, target: str | None = None):
        """UNSET when not sent, None for the HL7 null, else the converted value."""
        fn = self._compiled.get(id(spec))
        if fn is None or fn.spec is not spec or fn.target != target:  # type: ignore[attr-defined]
            fn = self._compile(spec, target)
        return fn(msg, seg)

    def _template_source(self, text: str) -> Callable[[Message, Segment | None], str]:
        """`_template` for one text, split once into literal text, variables and field getters."""
        pieces: list = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            pieces.append(text[pos:m.start()])
            key = m.group(1)
            if key in self.variables:
                pieces.append(self.variables[key])
            else:
                try:
                    pieces.append(_field_getter(key))
                except ValueError:  # e.g. {authority} outside an identifier rule: fail per message, as _template does
                    pieces.append(lambda msg, seg, key=key: self._get(msg, key, seg)[0])
            pos = m.end()
        pieces.append(text[pos:])
        if all(isinstance(p, str) for p in pieces):
            constant = "".join(pieces)
            return lambda msg, seg: constant
        return lambda msg, seg: "".join(p if isinstance(p, str) else p(msg, seg) for p in pieces)

    def _compile(self, spec: FieldSpec, target: str | None) -> Callable:
        """A function (msg, seg) -> value doing what `_value` and the length check do, with the path parsed once."""
        limit = spec.max_length or LIMITS.get(target or "")
        where = spec.location
        if spec.template is not None:
            source, loc = self._template_source(spec.template), spec.template
        elif spec.join is not None:
            getters, sep, loc = [_field_getter(p) for p in spec.join], spec.sep, spec.join[0]

            def source(msg: Message, seg: Segment | None):
                parts = [g(msg, seg) for g in getters]
                if any(parts) and all(p == HL7_NULL for p in parts if p):
                    return HL7_NULL  # every part sent as the HL7 null: clear the value
                return sep.join(p for p in parts if p and p != HL7_NULL)
        else:
            field = spec.field or ""  # the schema gives every spec exactly one of field, join, template
            source, loc = _field_getter(field), field
        required, table_name, unmapped, kind = spec.required, spec.table, spec.unmapped, spec.type
        table = self.m.tables[table_name] if table_name else None
        zone = self.zone

        def fn(msg: Message, seg: Segment | None):
            raw = source(msg, seg)
            if raw == HL7_NULL:
                return None
            else:
                raw = raw.strip()
                if not raw:
                    if required:
                        raise MappingFault("101", f"{loc} is required but empty", loc)
                    return UNSET
                if table is not None:
                    if raw in table:
                        raw = table[raw]
                    elif unmapped == "error":
                        raise MappingFault("103", f"{loc}: code {raw!r} is not in table {table_name}", loc)
                    elif unmapped == "drop":
                        return UNSET
                value: date | datetime | str
                if kind == "date":
                    try:
                        value = parse_date(raw, datetime.now(zone).date())
                    except ImplausibleDate:
                        raise MappingFault("102", f"{loc} is not a plausible date (before {EARLIEST_DATE:%Y%m%d} or in "
                                                  "the future)", loc) from None
                    except ValueError:
                        raise MappingFault("102", f"{loc} is not a valid date (expected YYYYMMDD)", loc) from None
                elif kind == "datetime":
                    try:
                        value = parse_dtm(raw, zone)
                    except ValueError:
                        raise MappingFault("102", f"{loc} is not a valid HL7 date/time (expected YYYYMMDDHHMMSS[+ZZZZ])",
                                           loc) from None
                else:
                    value = raw
            if limit and isinstance(value, str) and len(value) > limit:
                raise MappingFault("102", f"{where} is longer than {limit} characters", where)
            return value

        fn.target, fn.spec = target, spec  # type: ignore[attr-defined]  # keeps spec alive: its id stays unique
        self._compiled[id(spec)] = fn
        return fn

    def _value(self, msg: Message, spec: FieldSpec, seg: Segment | None = None):
        if spec.template is not None:
            raw, loc = self._template(msg, spec.template, seg), spec.template
        elif spec.join is not None:
            parts = [self._get(msg, p, seg)[0] for p in spec.join]
            if all(p == HL7_NULL for p in parts if p) and any(parts):
                return None
            raw, loc = spec.sep.join(p for p in parts if p and p != HL7_NULL), spec.join[0]
        else:
            raw, loc = self._get(msg, spec.field or "", seg)
        if raw == HL7_NULL:
            return None
        raw = raw.strip()
        if not raw:
            if spec.required:
                raise MappingFault("101", f"{loc} is required but empty", loc)
            return UNSET
        if spec.table:
            table = self.m.tables[spec.table]
            if raw in table:
                raw = table[raw]
            elif spec.unmapped == "error":
                raise MappingFault("103", f"{loc}: code {raw!r} is not in table {spec.table}", loc)
            elif spec.unmapped == "drop":
                return UNSET
        if spec.type == "date":
            try:
                return parse_date(raw, datetime.now(self.zone).date())
            except ImplausibleDate:
                raise MappingFault("102", f"{loc} is not a plausible date (before {EARLIEST_DATE:%Y%m%d} or in the future)",
                                   loc) from None
            except ValueError:
                raise MappingFault("102", f"{loc} is not a valid date (expected YYYYMMDD)", loc) from None
        if spec.type == "datetime":
            try:
                return parse_dtm(raw, self.zone)
            except ValueError:
                raise MappingFault("102", f"{loc} is not a valid HL7 date/time (expected YYYYMMDDHHMMSS[+ZZZZ])", loc) from None
        return raw

    # -- identifiers ------------------------------------------------------------

    def identifiers(self, msg: Message, path: str, seg: Segment | None = None) -> list[IdentifierData]:
        name, fld, _rep, _c, _s = parse_path(path)
        s = seg if seg is not None and seg.name == name else msg.segment(name)
        if s is None:
            return []
        out: list[IdentifierData] = []
        seen: set[tuple[str, str]] = set()  # a set, not a scan of `out`: 20,000 repetitions once took 37 s
        for r in range(1, len(s.repetitions(fld)) + 1):
            ident = self._identifier(msg, s, fld, r, f"{name}-{fld}({r})" if r > 1 else f"{name}-{fld}")
            if ident is not None and (ident.system, ident.value) not in seen:
                seen.add((ident.system, ident.value))
                out.append(ident)
        return out

    def _identifier(self, msg: Message, s: Segment, fld: int, r: int, loc: str) -> IdentifierData | None:
        # CX.1, CX.4 and CX.5 from one split of the repetition (what s.get(fld, n, 1, r) returns for each)
        enc = msg.enc
        comps = s.repetitions(fld)[r - 1].split(enc.comp)
        cx = [c.split(enc.sub, 1)[0] if enc.sub in c else c for c in comps[:5]]
        cx += [""] * (5 - len(cx))
        if enc.esc in comps[0] or (len(comps) > 3 and (enc.esc in comps[3] or (len(comps) > 4 and enc.esc in comps[4]))):
            cx = [msg.decode(c) for c in cx]
        value = cx[0].strip()
        if not value or value == HL7_NULL:
            return None
        authority = cx[3].strip()
        type_code = cx[4].strip()
        for n, rule in enumerate(self.m.identifiers):
            if not self._matches(rule, type_code, authority):
                continue
            if rule.require_authority and not authority:
                continue
            if rule.check == "nhs-number":
                value = nhs.normalise(value)
                reason = nhs.invalid_reason(value)
                if reason:
                    if rule.invalid == "skip":
                        return None
                    raise MappingFault("102", f"{loc}.1: invalid NHS number: {reason}", f"{loc}.1")
            systems = self._systems if "{" not in authority and len(authority) <= 64 else None
            system = systems.get((n, authority)) if systems is not None else None
            if system is None:
                system = self._template(msg, self._template(msg, rule.system, s, {"authority": authority}), s,
                                        {"authority": authority})
                if systems is not None and len(systems) < 4096:  # bounded: authorities come from the feed
                    systems[(n, authority)] = system
            if not system:
                continue
            if len(value) > 100:
                raise MappingFault("102", f"{loc}.1: identifier longer than 100 characters", f"{loc}.1")
            return IdentifierData(system=system, value=value, type_code=type_code or None,
                                  assigner=authority or None, location=loc)
        return None

    @staticmethod
    def _matches(rule: IdentifierRule, type_code: str, authority: str) -> bool:
        w = rule.when
        if w.type is not None and type_code not in w.type:
            return False
        if w.authority is not None and authority not in w.authority:
            return False
        return True

    # -- whole message -------------------------------------------------------------

    def patient(self, msg: Message, pid: Segment | None = None) -> PatientData:
        pid = pid or msg.segment("PID")
        if pid is None:
            raise MappingFault("100", "the message has no PID segment", "PID")
        idents: list[IdentifierData] = []
        seen: set[tuple[str, str]] = set()
        for path in self.m.identifier_fields:
            for i in self.identifiers(msg, path, pid):
                if (i.system, i.value) not in seen:
                    seen.add((i.system, i.value))
                    idents.append(i)
        if not idents:
            fields = ", ".join(self.m.identifier_fields)
            raise MappingFault("101", f"no usable patient identifier in {fields} under mapping {self.m.name!r}",
                               self.m.identifier_fields[0])
        data = PatientData(identifiers=idents)
        for name, fn in self._patient_fields:
            setattr(data, name, fn(msg, pid))
        return data

    def patients(self, msg: Message) -> list[MappedPatient]:
        """Each PID with the MRG that follows it (A40 may carry several pairs)."""
        out = []
        segs = msg.segments
        for i, s in enumerate(segs):
            if s.name != "PID":
                continue
            mrg = None
            for t in segs[i + 1:]:
                if t.name == "PID":
                    break
                if t.name == "MRG":
                    mrg = t
                    break
            prior = self.identifiers(msg, "MRG-1", mrg) if mrg is not None else []
            out.append(MappedPatient(self.patient(msg, s), prior))
        if not out:
            raise MappingFault("100", "the message has no PID segment", "PID")
        return out

    def encounter(self, msg: Message) -> EncounterData | None:
        if self.m.encounter is None or msg.segment("PV1") is None:
            return None
        em = self.m.encounter
        number = self.value(msg, em.visit_number, None, "visit_number")
        data = EncounterData(visit_number=number or None)
        if em.visit_system is not None:
            system = self.value(msg, em.visit_system, None, "visit_system")
            data.visit_system = system or ""
        for name, fn in self._encounter_fields:
            setattr(data, name, fn(msg, None))
        return data

    def event_time(self, msg: Message) -> datetime | None:
        """EVN-2, else MSH-7."""
        for path in ("EVN-2", "MSH-7"):
            raw = msg.get(path).strip()
            if raw:
                try:
                    return parse_dtm(raw, self.zone)
                except ValueError:
                    raise MappingFault("102", f"{path} is not a valid HL7 date/time", path) from None
        return None
