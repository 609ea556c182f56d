"""Operator commands: the audit trail readable without SQL, and no command quietly making an empty store elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from store import audit
from store.audit import AuditEntry
from store.models import Patient, PatientIdentifier
from tests.test_policy import add_patient

REPO = Path(__file__).resolve().parent.parent
NHS = "https://fhir.nhs.uk/Id/nhs-number"


def cli(env: dict[str, str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env={**base, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def trail(gw, database_url, tmp_path) -> tuple[dict[str, str], int]:
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add(PatientIdentifier(patient_id=patient.id, system=NHS, value="9990000018"))
        audit.append_many(session, [
            AuditEntry(type_code=audit.QUERY, action="E", subtype="search", agent_who="dr.derm", agent_network="10.0.0.5",
                       patient_id=patient.id),
            AuditEntry(type_code=audit.SECURITY_ALERT, action="E", subtype="refused", outcome=audit.MINOR_FAILURE,
                       outcome_desc="no need to know\nthis patient", agent_who="dr.plastics", patient_id=patient.id),
            AuditEntry(type_code=audit.IMPORT, action="C", agent_who="mi.jones"),
            # a DICOM peer: its imports recorded as ae:TITLE, its queries as TITLE
            AuditEntry(type_code=audit.IMPORT, action="C", agent_who="ae:PACS1", agent_network="10.0.0.9"),
            AuditEntry(type_code=audit.QUERY, action="E", subtype="search", agent_who="PACS1", agent_network="10.0.0.9"),
        ])
    return {"CLINPHOTO_DATA_DIR": str(tmp_path), "CLINPHOTO_DATABASE_URL": database_url}, patient.id


def test_audit_list_filters_newest_first_without_names(trail, gw):
    env, pid = trail
    with gw.db.read() as session:
        public_id = session.scalar(select(Patient.public_id).where(Patient.id == pid))
    res = cli(env, "audit", "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["SEQ", "TIME", "(UTC)"]
    seqs = [int(line.split()[0]) for line in lines[1:]]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) >= 3
    assert "Security Alert" in res.stdout and "refused - no need to know this patient" in res.stdout  # one line each

    by_patient = cli(env, "audit", "list", "--patient", "nhs|999 000 0018")
    assert by_patient.returncode == 0, by_patient.stderr
    assert {line.split()[-1] for line in by_patient.stdout.splitlines()[1:]} >= {"search"}
    # the PATIENT column is the id the API and `patients list` show, and that id filters as well as the others
    assert all(f" {public_id} " in line for line in by_patient.stdout.splitlines()[1:])
    assert cli(env, "audit", "list", "--patient", str(pid)).stdout == by_patient.stdout
    assert cli(env, "audit", "list", "--patient", public_id).stdout == by_patient.stdout

    failures = cli(env, "audit", "list", "--outcome", "failure", "--json")
    records = [json.loads(line) for line in failures.stdout.splitlines()]
    assert [(r["agent"], r["outcomeName"]) for r in records] == [("dr.plastics", "minor failure")]
    assert records[0]["patientId"] == pid and records[0]["recordedAt"].endswith("Z")
    assert records[0]["patientPublicId"] == public_id

    typed = cli(env, "audit", "list", "--type", "security alert", "--user", "dr.plastics", "--since", "1h", "--json")
    assert [json.loads(line)["type"] for line in typed.stdout.splitlines()] == ["110113"]
    assert "no audit records match" in cli(env, "audit", "list", "--user", "nobody").stdout
    # a peer's AE title finds all it did, its C-STOREs (ae:PACS1) too, whichever form is given
    for user in ("PACS1", "ae:PACS1"):
        peer = [json.loads(line) for line in cli(env, "audit", "list", "--user", user, "--json").stdout.splitlines()]
        assert sorted(r["type"] for r in peer) == ["110107", "110112"], user
    assert cli(env, "audit", "list", "--type", "nonsense").returncode == 2
    assert cli(env, "audit", "list", "--patient", "nhs|1234567890").returncode == 2  # a mistyped NHS number
    unknown = cli(env, "audit", "list", "--patient", "nhs|9990000026")
    assert unknown.returncode == 1 and "no patient" in unknown.stderr


def test_audit_show_prints_one_record_in_full(trail):
    env, pid = trail
    seq = json.loads(cli(env, "audit", "list", "--user", "dr.derm", "--json").stdout.splitlines()[0])["seq"]
    res = cli(env, "audit", "show", str(seq))
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert (record["seq"], record["agent"], record["agentNetwork"], record["patientId"]) == (seq, "dr.derm", "10.0.0.5", pid)
    assert len(record["hash"]) == 64 and record["typeName"] == "Query"
    missing = cli(env, "audit", "show", "999999")
    assert missing.returncode == 1 and "no audit record 999999" in missing.stderr


@pytest.mark.parametrize("command", [("audit", "verify"), ("audit", "list"), ("store", "check"), ("hl7", "list"),
                                     ("token", "--sub", "x", "--role", "clinician")])
def test_commands_refuse_a_data_directory_that_does_not_exist(tmp_path, command):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = cli({}, *command, cwd=elsewhere)
    assert res.returncode == 2
    assert f"no data directory at {elsewhere / 'var'}" in res.stderr and "CLINPHOTO_DATA_DIR" in res.stderr
    assert not (elsewhere / "var").exists()  # nothing made there
    named = cli({"CLINPHOTO_DATA_DIR": str(tmp_path / "typo")}, *command, cwd=elsewhere)
    assert named.returncode == 2 and "(CLINPHOTO_DATA_DIR)" in named.stderr


def test_setting_up_commands_create_it_and_say_where_with_v(tmp_path):
    res = cli({}, "-v", "db", "upgrade", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"data directory {tmp_path / 'var'}" in res.stderr and (tmp_path / "var").is_dir()
    verified = cli({}, "-v", "audit", "verify", cwd=tmp_path)
    assert verified.returncode == 0 and f"data directory {tmp_path / 'var'}" in verified.stderr


def test_patients_list_and_show_for_operators(trail):
    env, pid = trail
    listed = cli(env, "patients", "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:2] == ["ID", "IDENTIFIERS"] and "nhs|9990000018" in row
    public_id = row.split()[0]
    assert len(public_id) == 32 and public_id != str(pid)
    assert cli(env, "patients", "list", "--identifier", "nhs|9990000018").stdout == listed.stdout
    assert "no patients match" in cli(env, "patients", "list", "--merged").stderr
    shown = json.loads(cli(env, "patients", "show", public_id).stdout)
    assert shown["id"] == public_id and shown["identifiers"][0]["value"] == "9990000018"
    assert json.loads(cli(env, "patients", "show", "nhs|9990000018").stdout) == shown
    assert cli(env, "patients", "show", "nhs|9449305552").returncode == 1
    ops = json.loads(cli(env, "audit", "list", "--type", "application activity", "--json").stdout.splitlines()[0])
    assert ops["subtype"] == "patients-show" and ops["agent"].startswith("os:")


HUGE = "99999999999999999999999"  # more than any row id (SQLite INTEGER, PostgreSQL bigint) holds


@pytest.mark.parametrize("command, status", [
    (("outbox", "retry", HUGE), 2), (("outbox", "cancel", HUGE), 2), (("audit", "show", HUGE), 2),
    (("hl7", "reprocess", HUGE), 2), (("hl7", "list", "--limit", HUGE), 2), (("hl7", "reprocess", "--status", "error",
                                                                              "--limit", "-1"), 2),
    (("audit", "list", "--patient", HUGE), 1), (("audit", "list", "--since", "99999999999d"), 2),
    (("store", "gc", "--dry-run", "--older-than", "99999999999d"), 2)])
def test_numbers_out_of_range_are_refused_in_one_line(trail, command, status):
    """Each was a traceback: the id passed to the driver (OverflowError: Python int too large to convert to SQLite
    INTEGER), an age too long for a timedelta; hl7 reprocess --limit -1 was "no limit" to SQLite."""
    env, _ = trail
    res = cli(env, *command)
    assert res.returncode == status and "Traceback" not in res.stderr, res.stderr


def test_an_age_before_year_one_lists_every_record(trail):
    env, _ = trail
    res = cli(env, "audit", "list", "--since", "800000d")  # was OverflowError: date value out of range
    assert res.returncode == 0 and len(res.stdout.splitlines()) > 3, res.stderr


def test_token_with_an_unusable_signing_key_is_one_line(tmp_path):
    """A key path that is a folder or a file that is not a PEM key (and a read-only data directory, where the key
    cannot be made) were tracebacks from `clinphoto token`; now one line and exit 2."""
    folder = tmp_path / "folder"
    (folder / "auth" / "dev-signing-key.pem").mkdir(parents=True)
    junk = tmp_path / "junk"
    (junk / "auth").mkdir(parents=True)
    (junk / "auth" / "dev-signing-key.pem").write_text("not a key\n")
    for data_dir, says in ((folder, "Is a directory"), (junk, "not a PEM private key")):
        res = cli({"CLINPHOTO_DATA_DIR": str(data_dir)}, "token", "--sub", "x", "--role", "clinician")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and says in res.stderr and "dev-signing-key.pem" in res.stderr


@pytest.mark.parametrize("command", [("hl7", "reprocess", "--status", "eror"), ("outbox", "list", "--status", "pendng")])
def test_a_mistyped_status_is_refused_not_an_empty_success(trail, command):
    """`hl7 reprocess --status eror` said "nothing to do" and `outbox list --status pendng` printed an empty outbox,
    both with exit 0: a script after a mapping fix took the feed for clean. Now exit 2 naming the statuses."""
    env, _ = trail
    res = cli(env, *command)
    assert res.returncode == 2 and "must be one of" in res.stderr, (res.stdout, res.stderr)


def test_a_family_name_longer_than_any_stored_is_a_usage_error(trail):
    """A 60,000-character --family was a traceback (SQLite: LIKE or GLOB pattern too complex); now exit 2."""
    env, _ = trail
    res = cli(env, "patients", "list", "--family", "a" * 60_000)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "longer than any stored name" in res.stderr, res.stderr
    assert cli(env, "patients", "list", "--family", "a" * 401).returncode == 0  # as long as a name can be: no match


def test_every_command_names_its_operator_alike_and_outbox_changes_are_audited(trail, gw, fx):
    """`audit list --user os:NAME` finds all of one operator's CLI actions: the commands once named the same OS
    account root, os:root and cli:root. An outbox item that is not there is said to be missing, not 'not dead'."""
    import getpass

    from gateway.core import routing
    from gateway.core.ingest.pipeline import ingest
    from gateway.core.ingest.request import ImageFile
    from gateway.core.routing import Route
    from store.models import AuditEvent, OutboxItem
    from tests.ingest_helpers import capture

    env, _pid = trail
    me = f"os:{getpass.getuser()}"
    assert cli(env, "patients", "list").returncode == 0
    gw.settings.routing.routes = [Route(destination="PACS1", specialties=["330"])]
    stored = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], {"patient": f"{NHS}|9990000018", "specialty": "330"}))
    assert stored.photos
    with gw.db.read() as session:
        item = session.scalar(select(OutboxItem.id))
    assert routing.cancel(gw, item)
    retried = cli(env, "outbox", "retry", str(item))
    assert retried.returncode == 0 and "pending again" in retried.stdout, retried.stderr
    again = cli(env, "outbox", "retry", str(item))
    assert again.returncode == 1 and "it is pending; only dead or cancelled items can be" in again.stderr
    missing = cli(env, "outbox", "cancel", "999999")
    assert missing.returncode == 1 and "outbox item 999999: no such item" in missing.stderr
    with gw.db.read() as session:
        mine = session.execute(select(AuditEvent.subtype, AuditEvent.outcome).where(AuditEvent.agent_who == me)
                               .order_by(AuditEvent.seq)).all()
    assert [(s, o) for s, o in mine] == [("patients-list", audit.SUCCESS), ("outbox-retry", audit.SUCCESS),
                                         ("outbox-retry", audit.MINOR_FAILURE), ("outbox-cancel", audit.MINOR_FAILURE)]
    listed = cli(env, "audit", "list", "--user", me)
    assert listed.returncode == 0 and listed.stdout.count("outbox-") == 3, listed.stdout
