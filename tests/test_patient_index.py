"""The protocol-free patient index: merges, identifier changes, merged-identifier policy, out-of-order rule."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.core.patients import (
    Actor,
    EncounterData,
    IdentifierData,
    Part,
    PatientData,
    PatientIndex,
    PatientIndexError,
    Problem,
)
from gateway.hl7.committer import GroupCommitter
from gateway.hl7.config import Hl7Settings
from gateway.hl7.listener import build_processor
from mapping.message import parse
from store import audit
from store.models import Asset, AuditEvent, Consent, Encounter, Patient, PatientIdentifier
from store.patients import find_patient, identifiers_of

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hl7"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
MRN = "https://clinphoto.local/Id/mrn/RX1"
T0 = datetime(2024, 3, 1, 10, 0, tzinfo=timezone.utc)


def ident(value, system=MRN):
    return IdentifierData(system=system, value=value, type_code="MR", assigner="RX1")


def apply(db, fn, policy="reject"):
    with db.write() as s:
        index = PatientIndex(s, Actor(who="test"), policy)
        out = fn(index)
        audit.append_many(s, out.audit)
        return out


def live_id(db, system, value):
    with db.read() as s:
        p = find_patient(s, system, value)
        return p.id if p else None


def add_photo_and_consent(db, patient_id, sha):
    with db.write() as s:
        s.add(Asset(patient_id=patient_id, study_uid="1.2.3", series_uid="1.2.3.1", sop_instance_uid=f"1.2.3.{sha}",
                    sha256=sha * 64, size=1, media_type="image/jpeg", source="upload"))
        s.add(Consent(patient_id=patient_id, level="record", given_by="patient"))


def test_register_then_update_and_out_of_order(db):
    out = apply(db, lambda i: i.upsert_patient(PatientData([ident("A1")], family_name="ONE"), T0))
    pid = out.patient_id
    apply(db, lambda i: i.upsert_patient(PatientData([ident("A1")], family_name="TWO"), T0 + timedelta(hours=1)))
    late = apply(db, lambda i: i.upsert_patient(PatientData([ident("A1")], family_name="OLD"), T0 + timedelta(minutes=30)))
    assert late.notes and "older" in late.notes[0]
    with db.read() as s:
        p = s.get(Patient, pid)
        assert p.family_name == "TWO"
        assert p.last_event_at.replace(tzinfo=timezone.utc) == T0 + timedelta(hours=1)


def test_identifier_added_by_later_message(db):
    pid = apply(db, lambda i: i.upsert_patient(PatientData([ident("A1")]), T0)).patient_id
    apply(db, lambda i: i.upsert_patient(PatientData([ident("A1"), ident("9449305552", NHS)]), T0))
    assert live_id(db, NHS, "9449305552") == pid


def test_identifiers_of_two_patients_in_one_message_is_an_error(db):
    apply(db, lambda i: i.upsert_patient(PatientData([ident("A1")]), T0))
    apply(db, lambda i: i.upsert_patient(PatientData([ident("B1")]), T0))
    with pytest.raises(PatientIndexError) as err:
        apply(db, lambda i: i.upsert_patient(PatientData([ident("A1"), ident("B1")]), T0))
    assert err.value.problem == Problem.CONFLICT


def test_merge_moves_encounters_photos_consents_and_old_ids_resolve(db):
    survivor = apply(db, lambda i: i.upsert_patient(PatientData([ident("S1"), ident("9449305552", NHS)]), T0)).patient_id
    merged = apply(db, lambda i: i.upsert_patient(PatientData([ident("M1")]), T0)).patient_id
    apply(db, lambda i: i.upsert_encounter(merged, EncounterData(visit_number="V1", status="in-progress"), T0))
    add_photo_and_consent(db, merged, "a")
    add_photo_and_consent(db, survivor, "b")
    out = apply(db, lambda i: i.merge(PatientData([ident("S1")]), [ident("M1")], T0 + timedelta(days=1)))
    assert out.patient_id == survivor
    with db.read() as s:
        m = s.get(Patient, merged)
        assert m.merged_into_id == survivor and m.merged_at is not None
        assert {e.patient_id for e in s.execute(select(Encounter)).scalars()} == {survivor}
        assert {a.patient_id for a in s.execute(select(Asset)).scalars()} == {survivor}
        assert {c.patient_id for c in s.execute(select(Consent)).scalars()} == {survivor}
        # the merged record keeps its identifiers, so look-ups by them reach the survivor
        assert s.execute(select(PatientIdentifier.patient_id).where(PatientIdentifier.value == "M1")).scalar() == merged
        assert {i.value for i in identifiers_of(s, survivor)} == {"S1", "9449305552", "M1"}
        subtypes = [e.subtype for e in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]
        assert "merge" in subtypes and "merged-into" in subtypes
        assert audit.verify(s).ok
    assert live_id(db, MRN, "M1") == survivor


def test_merge_moves_a_photo_the_survivor_already_holds(db):
    survivor = apply(db, lambda i: i.upsert_patient(PatientData([ident("S1")]), T0)).patient_id
    merged = apply(db, lambda i: i.upsert_patient(PatientData([ident("M1")]), T0)).patient_id
    with db.write() as s:
        for pid, uid in ((survivor, "1"), (merged, "2")):
            s.add(Asset(patient_id=pid, study_uid="1", series_uid="1", sop_instance_uid=uid, sha256="c" * 64, size=1,
                        media_type="image/jpeg", source="upload"))
    out = apply(db, lambda i: i.merge(PatientData([ident("S1")]), [ident("M1")], T0))
    assert out.audit[-2].detail["assets_moved"] == 1
    with db.read() as s:
        held = s.execute(select(Asset.patient_id, Asset.filed_patient_id).order_by(Asset.sop_instance_uid)).all()
    assert held == [(survivor, survivor), (survivor, merged)]


def test_later_message_about_merged_identifier_follows_policy(db):
    survivor = apply(db, lambda i: i.upsert_patient(PatientData([ident("S1")], family_name="SURV"), T0)).patient_id
    apply(db, lambda i: i.upsert_patient(PatientData([ident("M1")]), T0))
    apply(db, lambda i: i.merge(PatientData([ident("S1")]), [ident("M1")], T0))
    later = PatientData([ident("M1")], family_name="VIA-OLD-ID")
    with pytest.raises(PatientIndexError) as err:
        apply(db, lambda i: i.upsert_patient(later, T0 + timedelta(days=1)), policy="reject")
    assert err.value.problem == Problem.MERGED
    out = apply(db, lambda i: i.upsert_patient(later, T0 + timedelta(days=1)), policy="survivor")
    assert out.patient_id == survivor
    with db.read() as s:
        assert s.get(Patient, survivor).family_name == "VIA-OLD-ID"


def test_merge_of_unknown_prior_patient_leaves_a_pointer(db):
    survivor = apply(db, lambda i: i.upsert_patient(PatientData([ident("S1")]), T0)).patient_id
    out = apply(db, lambda i: i.merge(PatientData([ident("S1")]), [ident("GHOST")], T0))
    assert "not known" in out.notes[-1]
    assert live_id(db, MRN, "GHOST") == survivor


def test_merge_into_itself_and_repeat_merge(db):
    apply(db, lambda i: i.upsert_patient(PatientData([ident("S1")]), T0))
    with pytest.raises(PatientIndexError) as err:
        apply(db, lambda i: i.merge(PatientData([ident("S1")]), [ident("S1")], T0))
    assert err.value.problem == Problem.CONFLICT
    apply(db, lambda i: i.upsert_patient(PatientData([ident("M1")]), T0))
    apply(db, lambda i: i.merge(PatientData([ident("S1")]), [ident("M1")], T0))
    again = apply(db, lambda i: i.merge(PatientData([ident("S1")]), [ident("M1")], T0), policy="reject")
    assert "already merged" in again.notes[-1]


def test_merge_chains_stay_one_hop(db):
    a = apply(db, lambda i: i.upsert_patient(PatientData([ident("A")]), T0)).patient_id
    apply(db, lambda i: i.upsert_patient(PatientData([ident("B")]), T0))
    c = apply(db, lambda i: i.upsert_patient(PatientData([ident("C")]), T0)).patient_id
    apply(db, lambda i: i.merge(PatientData([ident("B")]), [ident("A")], T0))
    apply(db, lambda i: i.merge(PatientData([ident("C")]), [ident("B")], T0))
    with db.read() as s:
        assert s.get(Patient, a).merged_into_id == c
    assert live_id(db, MRN, "A") == c


def test_change_identifier(db):
    pid = apply(db, lambda i: i.upsert_patient(PatientData([ident("OLD")]), T0)).patient_id
    apply(db, lambda i: i.change_identifier([ident("NEW")], [ident("OLD")], T0))
    assert live_id(db, MRN, "NEW") == pid and live_id(db, MRN, "OLD") is None
    # a repeat finds it already done
    again = apply(db, lambda i: i.change_identifier([ident("NEW")], [ident("OLD")], T0))
    assert again.notes == ["identifier already changed"]
    with pytest.raises(PatientIndexError) as err:
        apply(db, lambda i: i.change_identifier([ident("X")], [ident("NOBODY")], T0))
    assert err.value.problem == Problem.UNKNOWN
    apply(db, lambda i: i.upsert_patient(PatientData([ident("TAKEN")]), T0))
    with pytest.raises(PatientIndexError) as err:
        apply(db, lambda i: i.change_identifier([ident("TAKEN")], [ident("NEW")], T0))
    assert err.value.problem == Problem.CONFLICT


def test_encounter_of_another_patient_is_refused(db):
    a = apply(db, lambda i: i.upsert_patient(PatientData([ident("A")]), T0)).patient_id
    b = apply(db, lambda i: i.upsert_patient(PatientData([ident("B")]), T0)).patient_id
    apply(db, lambda i: i.upsert_encounter(a, EncounterData(visit_number="V1"), T0))
    with pytest.raises(PatientIndexError) as err:
        apply(db, lambda i: i.upsert_encounter(b, EncounterData(visit_number="V1"), T0))
    assert (err.value.problem, err.value.part) == (Problem.CONFLICT, Part.VISIT)


# -- the same through HL7 fixtures (A40, A34, A47, A35) ------------------------------------------


def test_hl7_merge_and_identifier_change_fixtures(db):
    processor = build_processor(Hl7Settings())
    committer = GroupCommitter(db, processor)

    def send(name=None, raw=None):
        raw = raw or (FIX / name).read_bytes()
        return committer.apply_now([processor.prepare(raw)])[0]

    send("adt_a01_admit.hl7")  # survivor: NHS 9449305552, RX10001, encounter V900001
    mrn = "MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240301090000||ADT^A28|PRE-{n}|P|2.4\rPID|1||{id}^^^RX1^MR||DUPLICATE\r"
    send(raw=mrn.format(n=1, id="RX19999").encode())
    send(raw=mrn.format(n=2, id="RX18888").encode())
    victim = live_id(db, MRN, "RX19999")
    r = send("adt_a40_merge.hl7")
    assert parse(r.ack).segment("MSA").get(1) == "AA"
    survivor = live_id(db, NHS, "9449305552")
    assert live_id(db, MRN, "RX19999") == survivor and victim != survivor
    r = send("adt_a34_merge_legacy.hl7")
    assert parse(r.ack).segment("MSA").get(1) == "AA" and live_id(db, MRN, "RX18888") == survivor
    r = send("adt_a47_change_id.hl7")  # RX10001 -> RX10005
    assert parse(r.ack).segment("MSA").get(1) == "AA"
    assert live_id(db, MRN, "RX10005") == survivor and live_id(db, MRN, "RX10001") is None
    r = send("adt_a35_change_id_legacy.hl7")  # RX10005 -> RX10006
    assert parse(r.ack).segment("MSA").get(1) == "AA" and live_id(db, MRN, "RX10006") == survivor
    # default policy: a message about a merged identifier gets AE
    later = "MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240310090000||ADT^A08|LATER-1|P|2.4\rPID|1||RX19999^^^RX1^MR||X\r"
    r = send(raw=later.encode())
    msa = parse(r.ack).segment("MSA")
    assert msa.get(1) == "AE" and parse(r.ack).segment("ERR").get(3) == "204"
    # A40 without MRG is understood but not applicable
    r = send(raw=b"MSH|^~\\&|PAS|RX1|CP|RX1|20240310||ADT^A40|NOMRG|P|2.4\rPID|1||RX10006^^^RX1^MR\r")
    assert parse(r.ack).segment("MSA").get(1) == "AE"


def test_hl7_merged_policy_survivor(db):
    processor = build_processor(Hl7Settings(merged_policy="survivor"))
    committer = GroupCommitter(db, processor)
    for raw in (b"MSH|^~\\&|PAS|RX1|CP|RX1|20240301||ADT^A28|1|P|2.4\rPID|1||S^^^RX1^MR||SURV\r",
                b"MSH|^~\\&|PAS|RX1|CP|RX1|20240301||ADT^A28|2|P|2.4\rPID|1||M^^^RX1^MR||MERGED\r",
                b"MSH|^~\\&|PAS|RX1|CP|RX1|20240302||ADT^A40|3|P|2.4\rPID|1||S^^^RX1^MR\rMRG|M^^^RX1^MR\r",
                b"MSH|^~\\&|PAS|RX1|CP|RX1|20240303||ADT^A08|4|P|2.4\rPID|1||M^^^RX1^MR||RENAMED\r"):
        r = committer.apply_now([processor.prepare(raw)])[0]
        assert parse(r.ack).segment("MSA").get(1) == "AA"
    with db.read() as s:
        assert find_patient(s, MRN, "S").family_name == "RENAMED"


def test_the_name_key_follows_every_name_the_index_writes(db):
    """patients.name_key (what PatientName, family and given are matched against) on the index's plain-statement
    writes: a registration, a change of both parts, of one part (the other as stored), a merge placeholder."""
    def key(value):
        with db.read() as s:
            return s.scalar(select(Patient.name_key).where(Patient.id == live_id(db, MRN, value)))

    apply(db, lambda ix: ix.upsert_patient(PatientData(identifiers=[ident("K1")], family_name="O'Brien_%", given_names="Siobhán"), T0))
    assert key("K1") == "o'brien_%^siobhán"
    apply(db, lambda ix: ix.upsert_patient(PatientData(identifiers=[ident("K1")], family_name="Ó SÚILLEABHÁIN"), T0 + timedelta(hours=1)))
    assert key("K1") == "ó súilleabháin^siobhán"
    apply(db, lambda ix: ix.upsert_patient(PatientData(identifiers=[ident("K1")], given_names=None), T0 + timedelta(hours=2)))
    assert key("K1") == "ó súilleabháin^"
    apply(db, lambda ix: ix.merge(PatientData(identifiers=[ident("K1")]), [ident("K0")], T0 + timedelta(hours=3)))
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Patient).where(Patient.name_key.is_(None))) == 0
