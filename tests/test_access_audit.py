"""Access audit helpers (IHE BALP shapes) and `clinphoto policy explain`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from gateway.core import access_audit
from gateway.core.identity import PeerPermissions, Subject
from gateway.core.policy.rules import resolve
from store import audit
from store.models import AuditEvent
from tests.access_matrix import USERS, build_access_matrix

REPO = Path(__file__).resolve().parent.parent


def rows(gw) -> list[AuditEvent]:
    with gw.db.read() as session:
        found = list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        assert audit.verify(session).ok
        session.expunge_all()
    return found


def test_search_read_and_refusal_entries(gw):
    policy = gw.settings.policy
    peer = Subject(sub="PACS1", role="system", scopes=("system/*.rs",), network_address="10.0.0.9", peer=PeerPermissions("PACS1"))
    ctx = resolve(peer, policy)
    access_audit.write(gw, access_audit.search_entries(ctx, query="C-FIND PatientID=123", results={7: ["a1", "a2"], 3: ["b1"]},
                                                       type_code=audit.QUERY, subtype="C-FIND", channel="dimse"))
    clin = Subject(sub="dr.ed", role="clinician", specialties=("180",), scopes=("user/Media.rs",), network_address="10.0.0.1")
    access_audit.record_refusal(gw, resolve(clin, policy, purpose="ETREAT"), "GET /api/v1/photos")
    access_audit.record_read(gw, resolve(clin, policy), asset_id="a1", patient_id=7, permitted=False,
                             reasons=["purpose: role clinician may act for TREAT", "specialty: DENIED - no specialty match"])
    found = rows(gw)
    searches = [e for e in found if e.subtype == "C-FIND"]
    # one record per patient returned, each naming the query, the patient and that patient's photos
    assert [(e.patient_id, [x["id"] for x in e.entities if x["type"] == "asset"]) for e in searches] == [(3, ["b1"]), (7, ["a1", "a2"])]
    assert all(e.type_code == audit.QUERY and e.action == "E" and e.agent_network == "PACS1@10.0.0.9" for e in searches)
    assert all(e.entities[0] == {"type": "query", "query": "C-FIND PatientID=123", "channel": "dimse"} for e in searches)
    refusal = next(e for e in found if e.subtype == "refused")
    assert refusal.type_code == audit.SECURITY_ALERT and refusal.outcome == audit.MINOR_FAILURE and "reason" in refusal.outcome_desc
    denied = found[-1]
    assert denied.outcome == audit.MINOR_FAILURE and denied.outcome_desc == "denied: specialty: DENIED - no specialty match"
    assert denied.detail["reasons"][1].startswith("specialty: DENIED")


def test_a_retrieve_is_one_instances_transferred_record_per_patient(gw):
    """DICOM's Instances Transferred (PS3.15 A.5.3.2): one record per patient naming every photo sent; a single photo's
    record names it alone, with its transfer syntax, as a read does; under break-glass the alert and override once."""
    peer = Subject(sub="PACS1", role="system", scopes=("system/*.rs",), network_address="10.0.0.9", peer=PeerPermissions("PACS1"))
    ctx = resolve(peer, gw.settings.policy)
    jpeg, explicit = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"
    access_audit.write(gw, access_audit.transfer_entries(ctx, sent={7: ["a1", "a2"], 3: ["b1"]}, type_code=audit.INSTANCES_TRANSFERRED,
                                                         syntaxes={"a1": jpeg, "a2": explicit, "b1": jpeg}))
    found = rows(gw)
    assert [(e.patient_id, [x["id"] for x in e.entities if x["type"] == "asset"]) for e in found] == [(3, ["b1"]), (7, ["a1", "a2"])]
    assert all(e.type_code == audit.INSTANCES_TRANSFERRED and e.action == "R" and e.subtype == "retrieve" for e in found)
    assert all({"type": "patient", "id": e.patient_id} in e.entities and e.agent_network == "PACS1@10.0.0.9" for e in found)
    assert found[0].detail == {"rendition": "dicom", "transfer_syntax": jpeg}
    assert found[1].detail == {"rendition": "dicom", "transfer_syntaxes": sorted([jpeg, explicit]), "count": 2}

    clin = Subject(sub="dr.ed", role="clinician", specialties=("180",), scopes=("user/Media.rs",), network_address="10.0.0.1")
    urgent = resolve(clin, gw.settings.policy, purpose="ETREAT", break_glass="anaphylaxis, no history available")
    entries = access_audit.transfer_entries(urgent, sent={5: ["c1", "c2"]}, type_code=audit.INSTANCES_TRANSFERRED,
                                            syntaxes={"c1": jpeg, "c2": jpeg})
    assert [e.type_code for e in entries] == [audit.INSTANCES_TRANSFERRED, audit.SECURITY_ALERT, audit.EMERGENCY_OVERRIDE]
    assert all(e.patient_id == 5 for e in entries) and {"type": "request", "id": "retrieve c1, c2"} in entries[1].entities


def test_break_glass_adds_alert_and_override_records(gw):
    clin = Subject(sub="dr.ed", role="clinician", specialties=("180",), scopes=("user/Media.rs",), network_address="10.0.0.1", name="Dr Ed")
    ctx = resolve(clin, gw.settings.policy, purpose="ETREAT", break_glass="anaphylaxis, no history available")
    assert ctx.breaking_glass
    access_audit.record_read(gw, ctx, asset_id="a1", patient_id=5, permitted=True)
    found = rows(gw)
    assert [e.type_code for e in found] == [audit.REST, audit.SECURITY_ALERT, audit.EMERGENCY_OVERRIDE]
    for e in found:
        assert e.purpose_of_use == "ETREAT" and e.detail["break_glass_reason"] == "anaphylaxis, no history available"
        assert e.patient_id == 5 and e.agent_who == "dr.ed" and e.detail["agent_name"] == "Dr Ed"
    # an empty search under break-glass still raises the alert
    access_audit.record_search(gw, ctx, query="patient=x|1", results={})
    assert [e.type_code for e in rows(gw)[3:]] == [audit.REST, audit.SECURITY_ALERT, audit.EMERGENCY_OVERRIDE]


def run_cli(gw, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update(CLINPHOTO_DATA_DIR=str(gw.settings.data_dir), CLINPHOTO_DATABASE_URL=gw.settings.database_url)
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_policy_explain_prints_the_decision_and_why(gw):
    world = build_access_matrix(gw, with_blobs=False)
    r_derm = world.asset_ids["PA-03"]  # R, dermatology
    permit = run_cli(gw, "policy", "explain", "--sub", "dr.derm", "--role", "clinician", "--specialty", "330", "--purpose", "TREAT",
                     "--asset", r_derm)
    assert permit.returncode == 0, permit.stderr
    assert "PERMIT" in permit.stdout and "sensitivity R" in permit.stdout and "consent: a consent" in permit.stdout
    deny = run_cli(gw, "policy", "explain", "--sub", "dr.plastics", "--role", "clinician", "--specialty", "160", "--asset", r_derm)
    assert deny.returncode == 1 and "DENY" in deny.stdout
    assert "specialty: DENIED - no specialty match" in deny.stdout
    teach = run_cli(gw, "policy", "explain", "--sub", "ed.teacher", "--role", "educator", "--purpose", "TRAIN", "--asset", world.asset_ids["PB-01"])
    assert teach.returncode == 1 and "consent: DENIED" in teach.stdout and "sensitivity: sensitivity allowed" in teach.stdout
    glass = run_cli(gw, "policy", "explain", "--sub", "dr.ed", "--role", "clinician", "--specialty", "180", "--purpose", "ETREAT", "--asset", r_derm)
    assert glass.returncode == 1 and "needs a reason" in glass.stdout
    glass = run_cli(gw, "policy", "explain", "--sub", "dr.ed", "--role", "clinician", "--specialty", "180", "--purpose", "ETREAT",
                    "--break-glass", "resus", "--asset", r_derm)
    assert glass.returncode == 0 and "break-glass lifts the specialty rule" in glass.stdout
    explained = [e for e in rows(gw) if e.subtype == "policy-explain"]
    # the operator explained; the explained people read nothing, so the trail says so
    import getpass

    assert len(explained) == 5 and {e.outcome for e in explained} == {audit.SUCCESS}
    assert all(e.type_code == audit.APPLICATION_ACTIVITY and e.action == "E" for e in explained)
    assert {e.agent_who for e in explained} == {f"os:{getpass.getuser()}"}  # as every CLI command names its operator
    assert not [e for e in rows(gw) if e.agent_who in ("dr.derm", "dr.plastics", "ed.teacher", "dr.ed")]
    first = explained[0]
    assert {"type": "asset", "id": r_derm} in first.entities and first.patient_id == world.patient_ids["PA"]
    assert next(x for x in first.entities if x["type"] == "subject")["id"] == "dr.derm"
    assert first.detail["decision"] == "permit" and explained[1].detail["decision"] == "deny"
    assert explained[1].detail["denied_by"] == ["specialty"]
    assert len(USERS) >= 10


def test_audit_writes_take_the_kept_connection_when_free(gw):
    """access_audit.write appends on the Database's kept audit connection when no other thread holds it, in a
    transaction of its own when one does, and again after other writers moved the head (PostgreSQL: its guarded,
    pipelined append fails and is done again reading the head): every record kept, once, the chain sound."""
    ctx = resolve(Subject(sub="PACS1", role="system", scopes=("system/*.rs",), peer=PeerPermissions("PACS1")), gw.settings.policy)

    def entries(n: int) -> list[audit.AuditEntry]:
        return access_audit.search_entries(ctx, query=f"C-FIND {n}", results={}, type_code=audit.QUERY, channel="dimse")

    writer = gw.db.audit_writer()
    access_audit.write(gw, entries(1))
    assert writer.transactions == 1
    with writer.transaction():  # held by "another thread": the record goes in a transaction of its own
        pass
    writer._lock.acquire()
    try:
        access_audit.write(gw, entries(2))
    finally:
        writer._lock.release()
    assert writer.transactions == 2
    for n in range(3, 7):  # other writers append between the kept connection's commits
        with gw.db.write() as session:
            access_audit.append(session, entries(100 + n))
        access_audit.write(gw, entries(n))
    queries = [e.entities[0]["query"] for e in rows(gw)]
    assert sorted(queries) == sorted([f"C-FIND {n}" for n in range(1, 7)] + [f"C-FIND {100 + n}" for n in range(3, 7)])
