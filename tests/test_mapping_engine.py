"""Mapping files: validation with file/line/key errors, the NHS default, a US feed, and the CLI bench."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from gateway.core import nhs
from gateway.core.patients import UNSET
from mapping.engine import Mapper, MappingFault, parse_dtm
from mapping.message import parse
from mapping.schema import DEFAULT_MAPPING, MappingFileError, load_mapping, load_mapping_text

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
CLI = [sys.executable, "-m", "gateway.cli"]


def nhs_mapper() -> Mapper:
    return Mapper(load_mapping(DEFAULT_MAPPING), {"mrn_system": "https://trust.example/Id/mrn/{authority}"})


def msg(pid: str, pv1: str = "", msh_extra: str = "") -> bytes:
    segs = [f"MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240301101500||ADT^A01^ADT_A01|1|P|2.4{msh_extra}",
            "EVN|A01|20240301101400", pid]
    if pv1:
        segs.append(pv1)
    return ("\r".join(segs) + "\r").encode()


@pytest.mark.parametrize("number,valid", [
    ("9449305552", True), ("4010232137", True), ("944 930 5552", True), ("9449305553", False),
    ("944930555", False), ("94493055521", False), ("944930555X", False), ("1000000010", False),
])
def test_nhs_number_modulus_11(number, valid):
    assert nhs.is_valid(number) is valid


def test_check_digit_of_ten_means_no_valid_number():
    # 100000001x: weights give remainder 1 -> check digit 10 -> no valid number with these nine digits
    assert nhs.check_digit("100000001") is None or nhs.is_valid("100000001" + str(nhs.check_digit("100000001")))


def test_default_mapping_nhs_conventions():
    m = nhs_mapper()
    message = parse((FIX / "hl7" / "adt_a01_admit.hl7").read_bytes())
    [mp] = m.patients(message)
    p = mp.patient
    assert [(i.system, i.value, i.type_code, i.assigner) for i in p.identifiers] == [
        ("https://fhir.nhs.uk/Id/nhs-number", "9449305552", "NH", "NHS"),
        ("https://trust.example/Id/mrn/RX1", "RX10001", "MR", "RX1"),
    ]
    assert (p.family_name, p.given_names, p.name_prefix) == ("SMITH", "JOHN PAUL", "MR")
    assert p.birth_date == date(1980, 2, 14) and p.sex == "M" and p.nhs_number_status == "01"
    assert p.deceased_at is UNSET
    e = m.encounter(message)
    assert e.visit_number == "V900001" and e.visit_system == "urn:clinphoto:visit:RX1"
    assert e.class_code == "IMP" and e.specialty == "160" and e.location == "WARD7 / B / 3"
    assert e.attending_id == "C1234567" and e.attending_name == "AMY JONES"
    assert e.admitted_at == datetime(2024, 3, 1, 10, 10, tzinfo=timezone.utc)  # GMT in March
    assert m.event_time(message) == datetime(2024, 3, 1, 10, 15, tzinfo=timezone.utc)


def test_summer_times_without_offset_are_london_time():
    assert parse_dtm("20240701120000", nhs_mapper().zone) == datetime(2024, 7, 1, 11, 0, tzinfo=timezone.utc)
    assert parse_dtm("20240701120000+0200", nhs_mapper().zone) == datetime(2024, 7, 1, 10, 0, tzinfo=timezone.utc)
    assert parse_dtm("20240701120000.25", nhs_mapper().zone).microsecond == 250000


def test_invalid_nhs_number_is_an_error_with_location():
    with pytest.raises(MappingFault) as err:
        nhs_mapper().patients(parse(msg("PID|1||RX1^^^RX1^MR~9449305553^^^NHS^NH||X")))
    assert err.value.code == "102" and err.value.location == "PID-3(2).1"
    assert "9449305553" not in err.value.text  # identifiers stay out of ACK texts and logs


def test_no_usable_identifier():
    # MR without an assigning authority is not usable under the NHS mapping
    with pytest.raises(MappingFault) as err:
        nhs_mapper().patients(parse(msg("PID|1||12345^^^^MR||X")))
    assert err.value.code == "101" and err.value.location == "PID-3"


def test_bad_birth_date_and_unknown_sex():
    with pytest.raises(MappingFault) as err:
        nhs_mapper().patients(parse(msg("PID|1||9449305552^^^NHS^NH||X||1980-13-45")))
    assert (err.value.code, err.value.location) == ("102", "PID-7")
    with pytest.raises(MappingFault) as err:
        nhs_mapper().patients(parse(msg("PID|1||9449305552^^^NHS^NH||X||19800101|Q")))
    assert (err.value.code, err.value.location) == ("103", "PID-8")


def test_hl7_null_clears_and_empty_keeps():
    [mp] = nhs_mapper().patients(parse(msg('PID|1||9449305552^^^NHS^NH||SMITH||""')))
    assert mp.patient.birth_date is None and mp.patient.sex is UNSET


def test_unknown_hospital_service_passes_through():
    pv1 = ["PV1", "1", "O"] + [""] * 17
    pv1[10], pv1[19] = "330", "V1"
    e = nhs_mapper().encounter(parse(msg("PID|1||9449305552^^^NHS^NH", "|".join(pv1))))
    assert e.specialty == "330" and e.class_code == "AMB"


def test_us_mapping_fixture():
    m = Mapper(load_mapping(FIX / "mappings" / "us-mrn.yaml"))
    raw = (b"MSH|^~\\&|EPIC|MAINHOSP|CP|MAINHOSP|20240701120000||ADT^A01|5|P|2.5\r"
           b"PID|1||00123456^^^MAINHOSP^MR||DOE^JANE||19700101|F\rPV1|1|I|4W^401^A||||||||||||||||ENC99\r")
    message = parse(raw)
    [mp] = m.patients(message)
    assert [(i.system, i.value) for i in mp.patient.identifiers] == [("urn:mrn:MAINHOSP", "00123456")]
    assert m.encounter(message).location == "4W-401-A"
    assert m.event_time(message) == datetime(2024, 7, 1, 16, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text,line,key,fragment", [
    ("name: x\nidentifiers:\n  - system: s\n    when: {typ: [NH]}\n", 4, "identifiers[0].when.typ", "unknown key"),
    ("name: x\nidentifiers:\n  - system: s\npatient:\n  family_name: PID5\n", 5, "patient.family_name.field", "not an HL7 field path"),
    ("name: x\nidentifiers:\n  - system: s\npatient:\n  sex: {field: PID-8, table: sexes}\n", 5, "patient.sex.table", "no table 'sexes'"),
    ("name: x\nidentifiers: []\n", 2, "identifiers", "at least 1"),
    ("name: x\ntimezone: Mars/Olympus\nidentifiers:\n  - system: s\n", 2, "timezone", "unknown time zone"),
    ("name: x\nidentifiers:\n  - system: 'urn:{nope}'\n", 3, "identifiers[0].system", "placeholder {nope}"),
    ("name: x\nidentifiers:\n  - system: s\n    check: luhn\n", 4, "identifiers[0].check", "nhs-number"),
    ("name: x\nidentifiers:\n  - system: s\nencounter:\n  location: PV1-3\n", 4, "encounter.visit_number", "required"),
    ("name: [x\n", 2, "", "not valid YAML"),
])
def test_mapping_errors_name_file_line_and_key(text, line, key, fragment):
    with pytest.raises(MappingFileError) as err:
        load_mapping_text(text, "site.yaml")
    e = err.value
    assert (e.file, e.line, e.key) == ("site.yaml", line, key), str(e)
    assert fragment in str(e)
    assert str(e).startswith(f"site.yaml:{line}: ")


def run_cli(*args: str, env_extra: dict | None = None, cwd: Path | None = None):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update(env_extra or {})
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=60)


def test_cli_mapping_check(tmp_path):
    ok = run_cli("mapping", "check", str(FIX / "mappings" / "us-mrn.yaml"))
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nidentifiers:\n  - system: s\npatient:\n  birth_date: {field: PID-7, type: dat}\n")
    res = run_cli("mapping", "check", str(bad))
    assert res.returncode == 2
    assert f"{bad}:5: patient.birth_date.type" in res.stderr


def test_cli_mapping_check_lists_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nidentifiers:\n  - system: s\n    when: {typ: [NH]}\npatient:\n"
                   "  birth_date: {field: PID-7, type: dat}\n  sex: {field: PID-8, table: sexes}\n  family_name: PID5\n")
    res = run_cli("mapping", "check", str(bad))
    assert res.returncode == 2
    assert "4 error(s)" in res.stderr and "more)" not in res.stderr
    for where in (f"{bad}:4: identifiers[0].when.typ: unknown key", f"{bad}:6: patient.birth_date.type:",
                  f"{bad}:7: patient.sex.table: no table 'sexes'", f"{bad}:8: patient.family_name.field:"):
        assert where in res.stderr, res.stderr
    # loading elsewhere (e.g. at start-up) still gives one line: the first error and how many more
    with pytest.raises(MappingFileError) as err:
        load_mapping(bad)
    assert str(err.value).startswith(f"{bad}:4: identifiers[0].when.typ: unknown key (and 3 more)")


def test_cli_mapping_test_prints_patient_encounter_and_ack(tmp_path):
    res = run_cli("mapping", "test", str(FIX / "hl7" / "adt_a01_admit.hl7"), "--mapping", str(DEFAULT_MAPPING),
                  env_extra={"CLINPHOTO_DATA_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert '"family_name": "SMITH"' in res.stdout and '"specialty": "160"' in res.stdout
    assert "MSA|AA|A01-0001" in res.stdout
    # nothing committed: no database was even created
    assert not (tmp_path / "clinphoto.db").exists()
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(msg("PID|1||9449305553^^^NHS^NH||X"))
    res = run_cli("mapping", "test", str(bad), env_extra={"CLINPHOTO_DATA_DIR": str(tmp_path)})
    assert res.returncode == 1 and "MSA|AE|1|" in res.stdout and "ERR|" in res.stdout


def test_cli_mapping_test_against_database_rolls_back(tmp_path):
    env = {"CLINPHOTO_DATA_DIR": str(tmp_path)}
    res = run_cli("mapping", "test", str(FIX / "hl7" / "adt_a40_merge.hl7"), "--database", env_extra=env)
    assert res.returncode == 0, res.stderr
    assert "MSA|AA|A40-0001" in res.stdout
    # it says what would happen, not that it happened
    assert '"status": "would be applied"' in res.stdout and '"committed": false' in res.stdout
    assert '"status": "applied"' not in res.stdout
    assert "nothing was committed" in res.stdout
    import sqlite3

    con = sqlite3.connect(tmp_path / "clinphoto.db")
    assert con.execute("SELECT count(*) FROM patients").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM hl7_messages").fetchone()[0] == 0


def test_compiled_field_specs_agree_with_the_generic_path():
    """The mapper compiles each field spec once (hot path); it must give what `_value` gives, faults included."""
    def outcome(fn, *args):
        try:
            return fn(*args)
        except MappingFault as exc:
            return ("fault", exc.code, exc.location)

    extra = [msg("PID|1||9449305552^^^NHS^NH||SM\\T\\ITH^ANN^\"\"||\"\"|Q", "PV1|1|I|\"\"^\"\"|||||||XYZ"),
             msg("PID|1||9449305552^^^NHS^NH||X||1980-13-45", "PV1|1|O|W1^^3||||||||||||||||||||||||||||||||||||||||||bad")]
    for mapping_file in (DEFAULT_MAPPING, FIX / "mappings" / "us-mrn.yaml"):
        m = Mapper(load_mapping(mapping_file))
        for raw in [f.read_bytes() for f in sorted((FIX / "hl7").glob("*.hl7"))] + extra:
            message = parse(raw)
            for section, seg in (("patient", message.segment("PID")), ("encounter", None)):
                model = getattr(m.m, section)
                if model is None:
                    continue
                for name in type(model).model_fields:
                    spec = getattr(model, name)
                    if spec is None:
                        continue
                    compiled = outcome(m.value, message, spec, seg, name)
                    generic = outcome(m._value, message, spec, seg)
                    assert compiled == generic, (mapping_file.name, name, compiled, generic)


def test_mapping_files_not_utf8_or_nested_too_deeply_are_mapping_errors(tmp_path):
    """A Windows-1252 save and ten thousand nested brackets were tracebacks (UnicodeDecodeError, RecursionError) from
    `mapping check` and from start-up; now each is a MappingFileError, the line named where there is one."""
    cp1252 = tmp_path / "cp1252.yaml"
    cp1252.write_bytes((FIX / "mappings" / "us-mrn.yaml").read_bytes() + "# café\n".encode("cp1252"))
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 10000 + "]" * 10000 + "\n")
    with pytest.raises(MappingFileError, match=r"cp1252.yaml:\d+: not UTF-8 text \(byte 0xe9\)"):
        load_mapping(cp1252)
    with pytest.raises(MappingFileError, match="nested too deeply"):
        load_mapping(deep)
    for path in (cp1252, deep):
        res = run_cli("mapping", "check", str(path))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
