"""ADT trigger events through the whole pipeline (tokenize, map, apply, store, ACK) on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy import func, select

from gateway.hl7.committer import GroupCommitter
from gateway.hl7.config import Hl7Settings
from gateway.hl7.listener import build_processor
from mapping.message import parse
from store import audit
from store.models import AuditEvent, Encounter, Hl7Message, Patient
from store.patients import find_patient

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hl7"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
MRN = "https://clinphoto.local/Id/mrn/RX1"


class Feed:
    def __init__(self, db, **settings) -> None:
        self.db = db
        self.settings = Hl7Settings(**settings)
        self.processor = build_processor(self.settings)
        self.committer = GroupCommitter(db, self.processor)

    def send(self, raw: bytes, peer: str = "127.0.0.1:1"):
        return self.committer.apply_now([self.processor.prepare(raw, peer)])[0]

    def fixture(self, name: str):
        return self.send((FIX / name).read_bytes())

    def batch(self, raws: list[bytes]):
        return self.committer.apply_now([self.processor.prepare(r, "127.0.0.1:1") for r in raws])


def ack_fields(ack: bytes) -> dict:
    msg = parse(ack)
    msa = msg.segment("MSA")
    err = msg.segment("ERR")
    return {"code": msa.get(1), "control": msa.get(2), "text": msa.get(3),
            "err_code": err.get(3, 1) if err else None, "err_loc": err.raw(2) if err else None,
            "err_text": err.get(8) if err else None, "msh": msg.msh, "n_err": len(msg.all("ERR"))}


def msh(event: str, cid: str, t: str = "20240301101500", v: str = "2.4", extra: str = "") -> str:
    return f"MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|{t}||ADT^{event}|{cid}|P|{v}{extra}"


def build(*segs: str) -> bytes:
    return ("\r".join(segs) + "\r").encode()


@pytest.fixture
def feed(db) -> Feed:
    return Feed(db)


def patient_by(db, system, value) -> Patient | None:
    with db.read() as s:
        p = find_patient(s, system, value)
        if p is not None:
            s.refresh(p)
            s.expunge(p)  # a detached snapshot the test can read after the session ends
        return p


def test_a01_creates_patient_encounter_message_and_audit(feed, db):
    r = feed.fixture("adt_a01_admit.hl7")
    a = ack_fields(r.ack)
    assert (r.status, a["code"], a["control"]) == ("applied", "AA", "A01-0001")
    # the ACK's MSH swaps sender and receiver
    assert a["msh"].get(3) == "CLINPHOTO" and a["msh"].get(5) == "PAS" and a["msh"].get(6) == "RX1"
    assert a["msh"].get(9, 1) == "ACK" and a["msh"].get(9, 2) == "A01" and a["msh"].get(12) == "2.4"
    p = patient_by(db, NHS, "9449305552")
    assert p is not None and p.family_name == "SMITH" and p.given_names == "JOHN PAUL"
    assert patient_by(db, MRN, "RX10001").id == p.id
    with db.read() as s:
        enc = s.execute(select(Encounter).where(Encounter.patient_id == p.id)).scalar_one()
        assert (enc.status, enc.specialty, enc.class_code, enc.visit_number) == ("in-progress", "160", "IMP", "V900001")
        row = s.execute(select(Hl7Message)).scalar_one()
        assert (row.status, row.control_id, row.message_type, row.trigger_event, row.patient_id) == (
            "applied", "A01-0001", "ADT", "A01", p.id)
        assert row.ack == r.ack and row.raw == (FIX / "adt_a01_admit.hl7").read_bytes()
        events = s.execute(select(AuditEvent).where(AuditEvent.patient_id == p.id)).scalars().all()
        assert {e.type_code for e in events} == {audit.PATIENT_RECORD}
        assert any(e.action == "C" for e in events)
        assert audit.verify(s).ok
        # no patient name or NHS number in the audit detail
        assert "SMITH" not in str([e.detail for e in events]) and "9449305552" not in str([e.detail for e in events])


def test_ack_structure_is_valid_for_hl7apy(feed):
    r = feed.send(build(msh("A01", "X1", v="2.5"), "PID|1||9449305553^^^NHS^NH||X"))
    text = r.ack.decode().replace("\n", "\r")
    ack = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert ack.msa.msa_1.to_er7() == "AE" and ack.msa.msa_2.to_er7() == "X1"
    assert ack.err.err_3.to_er7().startswith("102^Data type error^HL70357")
    assert ack.err.err_2.to_er7() == "PID^1^3^1^1"
    assert ack.err.err_4.to_er7() == "E"
    # v2.4 and older receivers read ERR-1 (ELD): segment^sequence^field^code&text&HL70357
    r = feed.send(build(msh("A01", "X2", v="2.4"), "PID|1||9449305553^^^NHS^NH||X"))
    err = parse(r.ack).segment("ERR")
    assert err.raw(1) == "PID^1^3^102&Data type error&HL70357"


@pytest.mark.parametrize("name,event", [
    ("adt_a01_admit.hl7", "A01"), ("adt_a04_register.hl7", "A04"), ("adt_a05_preadmit.hl7", "A05"),
    ("adt_a08_update.hl7", "A08"), ("adt_a28_add_person.hl7", "A28"), ("adt_a31_update_person.hl7", "A31"),
    ("adt_a01_v23.hl7", "A01"), ("adt_a01_v231.hl7", "A01"), ("adt_a08_v25.hl7", "A08"), ("adt_a31_v251.hl7", "A31"),
    ("adt_a02_transfer.hl7", "A02"), ("adt_a03_discharge.hl7", "A03"), ("adt_a11_cancel_admit.hl7", "A11"),
    ("adt_a12_cancel_transfer.hl7", "A12"), ("adt_a13_cancel_discharge.hl7", "A13"),
])
def test_every_fixture_is_applied(feed, db, name, event):
    r = feed.fixture(name)
    a = ack_fields(r.ack)
    enhanced = parse((FIX / name).read_bytes()).msh.get(15)
    assert r.status == "applied" and a["code"] == ("CA" if enhanced else "AA"), a
    assert parse(r.ack).trigger_event == event


def test_encounter_lifecycle_transfer_discharge_cancel(feed, db):
    feed.fixture("adt_a01_admit.hl7")
    feed.fixture("adt_a02_transfer.hl7")

    def enc():
        with db.read() as s:
            e = s.execute(select(Encounter).where(Encounter.visit_number == "V900001")).scalar_one()
            s.expunge(e)
            return e

    e = enc()
    assert (e.location, e.specialty, e.attending_name) == ("BURNS / 1 / 2", "161", "RAJ PATEL")
    feed.fixture("adt_a03_discharge.hl7")
    e = enc()
    assert e.status == "finished" and e.discharged_at is not None
    feed.fixture("adt_a13_cancel_discharge.hl7")
    e = enc()
    assert e.status == "in-progress" and e.discharged_at is None


def test_a11_cancels_admission(feed, db):
    feed.fixture("adt_a01_admit.hl7")
    feed.fixture("adt_a11_cancel_admit.hl7")
    with db.read() as s:
        assert s.execute(select(Encounter.status)).scalar_one() == "cancelled"


def test_a12_cancel_transfer_restores_location(feed, db):
    feed.fixture("adt_a01_admit.hl7")
    feed.fixture("adt_a02_transfer.hl7")
    feed.fixture("adt_a12_cancel_transfer.hl7")
    with db.read() as s:
        e = s.execute(select(Encounter)).scalar_one()
        assert (e.location, e.specialty) == ("WARD7 / B / 3", "160")


def test_a08_updates_demographics_and_out_of_order_is_kept(feed, db):
    feed.fixture("adt_a01_admit.hl7")
    feed.fixture("adt_a08_update.hl7")  # 2 March
    assert patient_by(db, NHS, "9449305552").given_names == "JONATHAN PAUL"
    late = build(msh("A08", "LATE-1", t="20240301120000"), "EVN|A08|20240301120000",
                 "PID|1||9449305552^^^NHS^NH||SMYTHE^JON")
    r = feed.send(late)
    a = ack_fields(r.ack)
    assert a["code"] == "AA" and "older than the last update" in a["text"]
    p = patient_by(db, NHS, "9449305552")
    assert (p.family_name, p.given_names) == ("SMITH", "JONATHAN PAUL")
    with db.read() as s:
        row = s.execute(select(Hl7Message).where(Hl7Message.control_id == "LATE-1")).scalar_one()
        assert row.status == "applied" and "older than" in row.error


def test_duplicate_returns_original_ack_without_reapplying(feed, db):
    first = feed.fixture("adt_a01_admit.hl7")
    # the patient changes in between; a resend of the old message must not undo it
    feed.fixture("adt_a08_update.hl7")
    again = feed.fixture("adt_a01_admit.hl7")
    assert again.duplicate and again.ack == first.ack
    assert patient_by(db, NHS, "9449305552").given_names == "JONATHAN PAUL"
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Hl7Message)).scalar() == 2


def test_duplicate_within_one_batch(feed, db):
    raw = (FIX / "adt_a01_admit.hl7").read_bytes()
    r1, r2 = feed.batch([raw, raw])
    assert r2.duplicate and r1.ack == r2.ack


def test_same_control_id_from_another_sender_is_not_a_duplicate(feed, db):
    raw = (FIX / "adt_a01_admit.hl7").read_bytes()
    feed.send(raw)
    r = feed.send(raw.replace(b"|PAS|RX1|", b"|OTHERPAS|RX1|", 1))
    assert not r.duplicate and r.status == "applied"


@pytest.mark.parametrize("segments,code,loc,err", [
    (["PID|1||9449305553^^^NHS^NH||X"], "AE", "PID^1^3^1^1", "102"),
    (["PID|1||12345^^^^MR||X"], "AE", "PID^1^3", "101"),
    (["PID|1||9449305552^^^NHS^NH||X||19801345"], "AE", "PID^1^7", "102"),
    (["PID|1||9449305552^^^NHS^NH||X||19800101|Q"], "AE", "PID^1^8", "103"),
    (["PV1|1|I"], "AE", "PID", "100"),
])
def test_understood_but_unappliable_gets_ae(feed, db, segments, code, loc, err):
    r = feed.send(build(msh("A01", "E1"), "EVN|A01|20240301101500", *segments))
    a = ack_fields(r.ack)
    assert (a["code"], a["err_code"]) == (code, err)
    assert a["err_loc"].startswith(loc) and a["err_text"]
    assert r.status == "error"
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 0
        assert s.execute(select(Hl7Message.status)).scalar_one() == "error"


@pytest.mark.parametrize("raw,err,loc", [
    (build(msh("A01", "R1", v="3.0"), "PID|1||9449305552^^^NHS^NH"), "203", "MSH^1^12"),
    (build("MSH|^~\\&|PAS|RX1|CP|RX1|20240301||ADT^A01||P|2.4", "PID|1"), "101", "MSH^1^10"),
    (build("MSH|^~\\&|PAS|RX1|CP|RX1|20240301||^A01|R3|P|2.4"), "101", "MSH^1^9"),
    (b"PID|1||9449305552\r", "100", "MSH"),
    (b"MSH|^^^^|PAS|X\r", "102", "MSH^1^2"),
    (build("MSH|^~\\&|PAS|RX1|CP|RX1|20240301||ADT^A01|R4|P|2.4|||||GBR|EBCDIC"), "103", "MSH^1^18"),
])
def test_unreadable_header_or_unsupported_version_gets_ar(feed, db, raw, err, loc):
    r = feed.send(raw)
    a = ack_fields(r.ack)
    assert a["code"] == "AR" and a["err_code"] == err and a["err_loc"].startswith(loc), a
    assert r.status == "rejected"
    with db.read() as s:
        assert s.execute(select(Hl7Message.raw)).scalar_one() == raw


def test_unknown_event_accepted_without_change_or_rejected_per_type(db):
    accept = Feed(db)
    r = accept.send(build(msh("A60", "U1"), "PID|1||9449305552^^^NHS^NH"))
    assert ack_fields(r.ack)["code"] == "AA" and r.status == "ignored"
    r = accept.send(build("MSH|^~\\&|LAB|RX1|CP|RX1|20240301||ORU^R01|U2|P|2.4", "PID|1"))
    assert ack_fields(r.ack)["code"] == "AA" and r.status == "ignored"
    strict = Feed(db, type_actions={"ORU": "reject", "ADT^A60": "reject"})
    r = strict.send(build("MSH|^~\\&|LAB|RX1|CP|RX1|20240301||ORU^R01|U3|P|2.4", "PID|1"))
    a = ack_fields(r.ack)
    assert (a["code"], a["err_code"], r.status) == ("AR", "200", "rejected")
    r = strict.send(build(msh("A60", "U4"), "PID|1"))
    assert (ack_fields(r.ack)["code"], ack_fields(r.ack)["err_code"]) == ("AR", "201")
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Hl7Message)).scalar() == 4
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 0


def test_enhanced_mode_accept_acks(feed, db):
    r = feed.fixture("adt_a08_enhanced_mode.hl7")
    assert ack_fields(r.ack)["code"] == "CA"
    r = feed.send(build(msh("A01", "ENH-2", extra="|||AL|AL"), "PID|1||9449305553^^^NHS^NH"))
    assert ack_fields(r.ack)["code"] == "CE"
    r = feed.send(build(msh("A01", "ENH-3", v="9.9", extra="|||AL|AL"), "PID|1"))
    assert ack_fields(r.ack)["code"] == "CR"
    # NE: never send an accept ACK; ER: only on error; SU: only on success
    assert feed.send(build(msh("A28", "ENH-4", extra="|||NE|AL"), "PID|1||9449305552^^^NHS^NH")).ack is None
    assert feed.send(build(msh("A28", "ENH-5", extra="|||ER|AL"), "PID|1||9449305552^^^NHS^NH")).ack is None
    assert ack_fields(feed.send(build(msh("A28", "ENH-6", extra="|||ER|AL"), "PID|1||1^^^^MR")).ack)["code"] == "CE"
    assert ack_fields(feed.send(build(msh("A28", "ENH-7", extra="|||SU|AL"), "PID|1||9449305552^^^NHS^NH")).ack)["code"] == "CA"
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Hl7Message)).scalar() == 7


def test_one_bad_message_does_not_spoil_its_batch(feed, db):
    good1 = build(msh("A28", "B1"), "PID|1||9449305552^^^NHS^NH||ONE")
    bad = build(msh("A28", "B2"), "PID|1||9449305553^^^NHS^NH||TWO")
    # a conflict found only in the database: the NHS number of one patient with the MRN of another
    good2 = build(msh("A28", "B3"), "PID|1||9449306060^^^NHS^NH~RX5^^^RX1^MR||THREE")
    conflict = build(msh("A28", "B4"), "PID|1||9449305552^^^NHS^NH~RX5^^^RX1^MR||FOUR")
    results = feed.batch([good1, bad, good2, conflict])
    assert [r.status for r in results] == ["applied", "error", "applied", "error"]
    assert ack_fields(results[3].ack)["err_code"] == "205"
    assert patient_by(db, NHS, "9449305552").family_name == "ONE"
    assert patient_by(db, NHS, "9449306060").family_name == "THREE"
    with db.read() as s:
        assert audit.verify(s).ok


def test_charsets_and_escapes_are_decoded_in_stored_values(feed, db):
    feed.fixture("adt_a08_v25.hl7")  # MSH-18 8859/1
    assert patient_by(db, NHS, "9990000018").family_name == "MÜLLER"
    feed.fixture("adt_a31_v251.hl7")  # WILLIAMS^ANN \T\ BOB\S\X
    assert patient_by(db, NHS, "9990000026").given_names == "ANN & BOB^X"
    feed.fixture("adt_a04_register.hl7")  # UTF-8
    assert patient_by(db, NHS, "9449306060").given_names == "SIÂN"


def test_no_names_or_nhs_numbers_logged_at_info(feed, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        feed.fixture("adt_a01_admit.hl7")
        feed.send(build(msh("A01", "L2"), "PID|1||9449305553^^^NHS^NH||SECRETNAME"))
        feed.fixture("adt_a01_admit.hl7")
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    for secret in ("SMITH", "SECRETNAME", "9449305552", "9449305553"):
        assert secret not in text


def test_strict_validation_with_hl7apy(db):
    feed = Feed(db, strict_validation=True)
    r = feed.fixture("adt_a01_v23.hl7")
    assert ack_fields(r.ack)["code"] in ("AA", "AE")
    r = feed.send(build(msh("A01", "S2"), "PID|1||9449305552^^^NHS^NH", "ZZZZ|bad"))
    assert ack_fields(r.ack)["code"] == "AE"


def _break_message_store(db) -> None:
    """A real failure inside the commit path: the store refuses every new message row."""
    from sqlalchemy import text

    with db.write() as s:
        if db.dialect == "sqlite":
            s.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON hl7_messages BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        else:
            s.execute(text("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"))
            s.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON hl7_messages FOR EACH ROW EXECUTE FUNCTION refuse()"))


def test_nothing_acknowledged_when_the_commit_fails(feed, db):
    _break_message_store(db)
    results = feed.batch([(FIX / "adt_a01_admit.hl7").read_bytes(), (FIX / "adt_a04_register.hl7").read_bytes()])
    for r in results:
        a = ack_fields(r.ack)
        assert a["code"] == "AE" and a["err_code"] == "207" and r.status == "not-stored"
    with db.read() as s:
        # the patient change was rolled back with the message: nothing half-applied
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 0
        assert s.execute(select(func.count()).select_from(AuditEvent)).scalar() == 0


def test_hex_escape_not_valid_in_the_charset_gets_ae_at_its_field(feed, db):
    # \XC3\ alone is not UTF-8; it was stored as U+FFFD under an AA
    raw = build(msh("A01", "X1"), "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||M\\XC3\\LLER^ANN||19800101|F")
    r = feed.send(raw)
    a = ack_fields(r.ack)
    assert (a["code"], a["err_code"]) == ("AE", "102"), a
    assert a["err_loc"].startswith("PID^1^5"), a
    assert r.status == "error"
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 0
        assert s.execute(select(Hl7Message.raw)).scalar_one() == raw
    # a valid one in the same place is still decoded
    ok = feed.send(build(msh("A01", "X2"), "EVN|A01|20240301101500",
                         "PID|1||9449305552^^^NHS^NH||M\\XC39C\\LLER^ANN||19800101|F"))
    assert ack_fields(ok.ack)["code"] == "AA"
    assert patient_by(db, NHS, "9449305552").family_name == "MÜLLER"


def test_hex_escape_not_valid_in_the_header_gets_ar(feed, db):
    raw = build(msh("A01", "X\\XFF\\3"), "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X")
    r = feed.send(raw)
    a = ack_fields(r.ack)
    assert (a["code"], a["err_code"]) == ("AR", "102") and a["err_loc"].startswith("MSH^1^10"), a
    assert r.status == "rejected"


_CTRL = re.compile(rb"[\x00-\x1f\x7f]")


@pytest.mark.parametrize("field,raw", [
    ("MSH^1^10", build("MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240301101500||ADT^A01|N\x001|P|2.4",
                       "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X")),
    ("MSH^1^10", build(msh("A01", "N\\X00\\2"), "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X")),
    ("MSH^1^3", build("MSH|^~\\&|P\x00AS|RX1|CLINPHOTO|RX1|20240301101500||ADT^A01|N3|P|2.4",
                      "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X")),
    ("MSH^1^4", build("MSH|^~\\&|PAS|R\x01X1|CLINPHOTO|RX1|20240301101500||ADT^A01|N4|P|2.4",
                      "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X")),
])
def test_control_characters_in_the_header_get_ar_and_are_stored(feed, db, field, raw):
    for _ in range(2):  # the same again: the same answer, never "not stored; send again"
        r = feed.send(raw)
        a = ack_fields(r.ack)
        assert (a["code"], a["err_code"]) == ("AR", "102") and a["err_loc"].startswith(field), a
        assert r.status == "rejected" and not r.duplicate
        body = r.ack.split(b"\r", 1)[1]
        assert not _CTRL.search(body.replace(b"\r", b"")), r.ack  # nothing echoed raw in MSA / ERR
        assert not _CTRL.search(r.ack.split(b"\r", 1)[0]), r.ack
    with db.read() as s:
        rows = s.execute(select(Hl7Message.raw, Hl7Message.sending_application, Hl7Message.sending_facility,
                                Hl7Message.control_id, Hl7Message.status)).all()
    assert len(rows) == 2 and all(row.raw == raw and row.status == "rejected" for row in rows)
    for row in rows:
        assert not re.search(r"[\x00-\x1f\x7f]", row.sending_application + row.sending_facility + row.control_id)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 0


def test_control_ids_sharing_their_first_200_characters_are_not_duplicates(feed, db):
    stem = "C" * 200
    first = feed.send(build(msh("A01", stem + "1"), "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X"))
    second = feed.send(build(msh("A01", stem + "2"), "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X"))
    for r in (first, second):
        a = ack_fields(r.ack)
        assert (a["code"], a["err_code"]) == ("AR", "102") and a["err_loc"].startswith("MSH^1^10"), a
        assert not r.duplicate and r.status == "rejected"
    assert ack_fields(second.ack)["control"] == stem + "2"  # its own id echoed, not the first message's ACK
    # the longest id that fits is accepted, and is no duplicate of the refused ones cut to the column
    ok = feed.send(build(msh("A01", "C" * 199), "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X"))
    assert ack_fields(ok.ack)["code"] == "AA" and not ok.duplicate and ok.status == "applied"
    again = feed.send(build(msh("A01", "C" * 199), "EVN|A01|20240301101500", "PID|1||9449305552^^^NHS^NH||X"))
    assert again.duplicate and again.ack == ok.ack


@pytest.mark.parametrize("field,raw", [
    ("MSH^1^3", build(f"MSH|^~\\&|{'A' * 201}|RX1|CLINPHOTO|RX1|20240301101500||ADT^A01|L3|P|2.4",
                      "PID|1||9449305552^^^NHS^NH||X")),
    ("MSH^1^4", build(f"MSH|^~\\&|PAS|{'F' * 201}|CLINPHOTO|RX1|20240301101500||ADT^A01|L4|P|2.4",
                      "PID|1||9449305552^^^NHS^NH||X")),
])
def test_over_long_sender_fields_get_ar(feed, db, field, raw):
    for _ in range(2):
        r = feed.send(raw)
        a = ack_fields(r.ack)
        assert (a["code"], a["err_code"]) == ("AR", "102") and a["err_loc"].startswith(field), a
        assert not r.duplicate and r.status == "rejected"
