"""The mapping file's model: YAML that integration engineers edit, validated at load.

Every error names the file, the line and the key, e.g.
`site.yaml:14: patient.sex.table: no table 'sexes' under tables (have: administrative_sex)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mapping.message import parse_path

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
TEMPLATE_VARIABLES = {"authority", "mrn_system"}


class MappingFileError(ValueError):
    """The first problem of a mapping file; `problems` holds every one (itself first), for `mapping check`."""

    def __init__(self, file: str, line: int | None, key: str, message: str,
                 more: list[MappingFileError] | None = None) -> None:
        self.file, self.line, self.key, self.message = file, line, key, message
        self.problems: list[MappingFileError] = [self, *(more or [])]
        extra = f" (and {len(more)} more)" if more else ""
        super().__init__(self.where() + extra)

    def where(self) -> str:
        """This one problem as FILE:LINE: KEY: MESSAGE."""
        place = f"{self.file}:{self.line}" if self.line else self.file
        return f"{place}: {self.key}: {self.message}" if self.key else f"{place}: {self.message}"


def _check_path(value: str) -> str:
    try:
        parse_path(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return value


def _check_template(value: str) -> str:
    for name in _PLACEHOLDER.findall(value):
        if name in TEMPLATE_VARIABLES:
            continue
        try:
            parse_path(name)
        except ValueError:
            raise ValueError(
                f"placeholder {{{name}}} is neither an HL7 path (e.g. {{MSH-4.1}}) nor one of {sorted(TEMPLATE_VARIABLES)}"
            ) from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldSpec(_Strict):
    """Where one value comes from. A bare string in YAML means {field: PATH}."""

    field: str | None = Field(None, description="HL7 path: PID-5.1, PV1-3, PID-3(2).4")
    join: list[str] | None = Field(None, description="Several paths joined by sep, empty parts skipped")
    sep: str = " "
    template: str | None = Field(None, description="Text with {PATH} placeholders, e.g. urn:visit:{MSH-4.1}")
    type: Literal["string", "date", "datetime"] = "string"
    table: str | None = Field(None, description="Name of a code table under tables:")
    unmapped: Literal["keep", "error", "drop"] = Field(
        "keep", description="A code missing from the table: keep it as sent, reject the message (AE), or leave empty"
    )
    required: bool = False
    max_length: int | None = None

    @field_validator("field")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return _check_path(v) if v is not None else v

    @field_validator("join")
    @classmethod
    def _paths(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for p in v:
                _check_path(p)
        return v

    @field_validator("template")
    @classmethod
    def _tmpl(cls, v: str | None) -> str | None:
        return _check_template(v) if v is not None else v

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        given = [k for k in ("field", "join", "template") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of field, join or template")
        return self

    @property
    def location(self) -> str:
        return self.field or (self.join[0] if self.join else "") or (self.template or "")


def _spec(v):
    return {"field": v} if isinstance(v, str) else v


class IdentifierMatch(_Strict):
    type: list[str] | None = Field(None, description="CX.5 identifier type codes (table 0203), e.g. [NH]")
    authority: list[str] | None = Field(None, description="CX.4 assigning authorities, e.g. [NHS]")

    @field_validator("type", "authority", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


class IdentifierRule(_Strict):
    when: IdentifierMatch = Field(default_factory=IdentifierMatch)
    system: str = Field(description="Identifier system URI; may use {authority} and {mrn_system}")
    check: Literal["nhs-number"] | None = None
    require_authority: bool = False
    invalid: Literal["error", "skip"] = Field("error", description="An identifier failing its check: AE, or ignore it")

    @field_validator("system")
    @classmethod
    def _tmpl(cls, v: str) -> str:
        return _check_template(v)


class PatientMap(_Strict):
    family_name: FieldSpec | None = None
    given_names: FieldSpec | None = None
    name_prefix: FieldSpec | None = None
    birth_date: FieldSpec | None = None
    sex: FieldSpec | None = None
    deceased_at: FieldSpec | None = None
    nhs_number_status: FieldSpec | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _bare(cls, v):
        return _spec(v)


class EncounterMap(_Strict):
    visit_number: FieldSpec
    visit_system: FieldSpec | None = None
    class_code: FieldSpec | None = None
    location: FieldSpec | None = None
    specialty: FieldSpec | None = None
    attending_id: FieldSpec | None = None
    attending_name: FieldSpec | None = None
    admitted_at: FieldSpec | None = None
    discharged_at: FieldSpec | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _bare(cls, v):
        return _spec(v)


class Mapping(_Strict):
    name: str
    description: str = ""
    timezone: str = Field("Europe/London", description="Zone of HL7 times sent without an offset")
    identifier_fields: list[str] = Field(default_factory=lambda: ["PID-3"], description="CX fields holding patient identifiers")
    identifiers: list[IdentifierRule] = Field(min_length=1)
    patient: PatientMap = Field(default_factory=PatientMap)
    encounter: EncounterMap | None = None
    tables: dict[str, dict[str, str]] = Field(default_factory=dict)

    @field_validator("identifier_fields")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            _check_path(p)
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(v)
        except Exception:
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as Europe/London)") from None
        return v

    @field_validator("tables", mode="before")
    @classmethod
    def _stringify(cls, v):
        # YAML reads 160 or 01 as numbers; codes are text
        if isinstance(v, dict):
            return {k: ({str(c): str(t) for c, t in (tab or {}).items()} if isinstance(tab, dict) else tab)
                    for k, tab in v.items()}
        return v

    def table_refs(self) -> list[tuple[tuple, str]]:
        refs = []
        for section, model in (("patient", self.patient), ("encounter", self.encounter)):
            if model is None:
                continue
            for name in type(model).model_fields:
                spec = getattr(model, name)
                if spec is not None and spec.table:
                    refs.append(((section, name, "table"), spec.table))
        return refs


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(part):
                    nxt = v
                    line = k.start_mark.line + 1
                    break
            if nxt is None:
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "function-plain", "function-wrap") or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def load_mapping_text(text: str, file: str = "<mapping>") -> Mapping:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise MappingFileError(file, mark.line + 1 if mark else None, "", f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:  # thousands of nested brackets: PyYAML recurses per level (was a traceback)
        raise MappingFileError(file, None, "", "not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise MappingFileError(file, 1, "", "a mapping file is a YAML mapping with name, identifiers, patient, encounter, tables")
    problems: list[tuple[tuple, str]] = []
    mapping = None
    try:
        mapping = Mapping.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append((loc, msg))
    # table references from the YAML itself, so they are reported even when other keys are invalid
    tables: dict[str, Any] = data["tables"] if isinstance(data.get("tables"), dict) else {}
    have = ", ".join(sorted(str(t) for t in tables)) or "none"
    for section in ("patient", "encounter"):
        specs = data.get(section)
        if not isinstance(specs, dict):
            continue
        for name, spec in specs.items():
            if isinstance(spec, dict) and isinstance(spec.get("table"), str) and spec["table"] not in tables:
                problems.append(((section, name, "table"), f"no table {spec['table']!r} under tables (have: {have})"))
    if problems:
        errors = [MappingFileError(file, _line_of(node, loc), _key(loc), msg) for loc, msg in problems]
        errors.sort(key=lambda e: e.line or 0)  # file order, as an editor shows them
        first = errors[0]
        raise MappingFileError(first.file, first.line, first.key, first.message, errors[1:]) from None
    assert mapping is not None  # validated, or a problem was raised above
    return mapping


def load_mapping(path: str | Path) -> Mapping:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MappingFileError(str(path), None, "", f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # a Windows-1252 save: a traceback before, from `mapping check` and at start-up
        line = data.count(b"\n", 0, exc.start) + 1
        raise MappingFileError(str(path), line, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None
    return load_mapping_text(text, str(path))


DEFAULT_MAPPING = Path(__file__).with_name("default.yaml")
