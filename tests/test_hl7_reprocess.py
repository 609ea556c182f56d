"""`clinphoto hl7 reprocess`: stored messages applied again after a mapping fix, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from gateway.hl7.committer import GroupCommitter
from gateway.hl7.config import Hl7Settings
from gateway.hl7.listener import build_processor
from mapping.message import parse
from store import audit
from store.models import Hl7Message
from store.patients import find_patient

ROOT = Path(__file__).resolve().parent.parent
MRN_SYSTEM = "https://clinphoto.local/Id/mrn/RX1"

# a PAS that types its hospital numbers PI instead of MR: the default mapping finds no identifier
PI_TYPED = [
    b"MSH|^~\\&|PAS|RX1|CP|RX1|20240301100000||ADT^A28|PI-1|P|2.4\rPID|1||H1^^^RX1^PI||FIRST\r",
    b"MSH|^~\\&|PAS|RX1|CP|RX1|20240301100100||ADT^A28|PI-2|P|2.4\rPID|1||H2^^^RX1^PI||SECOND\r",
]


def fixed_mapping(tmp_path: Path) -> Path:
    text = (ROOT / "mapping" / "default.yaml").read_text()
    text = text.replace("  - when: {type: [MR]}", "  - when: {type: [MR, PI]}")
    path = tmp_path / "fixed.yaml"
    path.write_text(text)
    return path


def cli(settings_env: dict, *args: str, command: str = "reprocess") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update(settings_env)
    return subprocess.run([sys.executable, "-m", "gateway.cli", "hl7", command, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_reprocess_by_status_and_by_id(db, database_url, tmp_path):
    processor = build_processor(Hl7Settings())
    committer = GroupCommitter(db, processor)
    results = committer.apply_now([processor.prepare(raw) for raw in PI_TYPED])
    assert [r.status for r in results] == ["error", "error"]
    first_ack = results[0].ack
    env = {"CLINPHOTO_DATA_DIR": str(tmp_path), "CLINPHOTO_DATABASE_URL": database_url}

    # still the old mapping: stays an error; the line says which message, the change and why, and the exit
    # status says the feed is not clean yet (a script reprocessing after a fix must not read success)
    res = cli(env, str(results[0].message_id))
    assert res.returncode == 1 and "error (AE)" in res.stdout, res.stderr
    assert (f"message {results[0].message_id}: control id PI-1, ADT^A28: error -> error (AE): "
            "101 PID-3: no usable patient identifier") in res.stdout
    res = cli(env, "--status", "error")
    assert res.returncode == 1 and "reprocessed 2 message(s): 2 error" in res.stdout
    assert "2 message(s) still not applied" in res.stderr

    env["CLINPHOTO_HL7__MAPPING_FILE"] = str(fixed_mapping(tmp_path))
    res = cli(env, "--status", "error")
    assert res.returncode == 0, res.stderr
    assert "reprocessed 2 message(s): 2 applied" in res.stdout
    assert f"message {results[1].message_id}: control id PI-2, ADT^A28: error -> applied (AA)\n" in res.stdout
    with db.read() as s:
        assert find_patient(s, MRN_SYSTEM, "H1").family_name == "FIRST"
        assert find_patient(s, MRN_SYSTEM, "H2").family_name == "SECOND"
        rows = s.execute(select(Hl7Message).order_by(Hl7Message.id)).scalars().all()
        assert [r.status for r in rows] == ["applied", "applied"] and all(r.error is None for r in rows)
        assert audit.verify(s).ok
    # a resend of the same message now gets the new ACK (AA), not the stored AE, and is not applied twice
    again = committer.apply_now([processor.prepare(PI_TYPED[0])])[0]
    assert again.duplicate and parse(again.ack).segment("MSA").get(1) == "AA" and again.ack != first_ack

    res = cli(env, "999999")
    assert res.returncode == 1 and "no stored HL7 message" in res.stderr
    res = cli(env)
    assert res.returncode == 2


def test_list_stored_messages_without_patient_data(db, database_url, tmp_path):
    processor = build_processor(Hl7Settings())
    committer = GroupCommitter(db, processor)
    fixtures = ROOT / "fixtures" / "hl7"
    raws = [(fixtures / "adt_a01_admit.hl7").read_bytes(), *PI_TYPED, b"MSH|^~\\&|PAS|RX1|CP|RX1|x||ADT^A01|R-1|P|9.9\r"]
    results = committer.apply_now([processor.prepare(raw) for raw in raws])
    assert [r.status for r in results] == ["applied", "error", "error", "rejected"]
    env = {"CLINPHOTO_DATA_DIR": str(tmp_path), "CLINPHOTO_DATABASE_URL": database_url}

    res = cli(env, command="list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["ID", "RECEIVED", "(UTC)", "SENDER", "CONTROL", "ID", "TYPE", "STATUS", "ERROR"]
    body = lines[1:]
    assert [line.split()[0] for line in body] == [str(r.message_id) for r in reversed(results)]  # newest first
    a01 = body[-1]
    assert "PAS/RX1" in a01 and "A01-0001" in a01 and "ADT^A01" in a01 and "applied" in a01
    assert "ADT^A28" in body[1] and "error" in body[1] and "101 PID-3: no usable patient identifier" in body[1]
    assert "rejected" in body[0] and "203 MSH-12" in body[0]
    # an operator list: no names or NHS numbers (the fixture's patient is SMITH, 9449305552)
    assert "SMITH" not in res.stdout and "9449305552" not in res.stdout and "FIRST" not in res.stdout

    res = cli(env, "--status", "error", "--limit", "1", command="list")
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()[1:]] == [str(results[2].message_id)]
    res = cli(env, "--status", "ignored", command="list")
    assert res.returncode == 0 and "no stored messages with status ignored" in res.stdout
    res = cli(env, "--status", "eror", command="list")
    assert res.returncode == 2 and "must be one of" in res.stderr
