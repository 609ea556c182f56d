"""The hot-path tokenizer, checked against hl7apy (structure) and python-hl7 (escapes) as oracles."""

from __future__ import annotations

import re

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapping.escape import escape, unescape
from mapping.message import Hl7Error, parse, parse_path

MSH = "MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240301101500||ADT^A01^ADT_A01|{cid}|P|2.5"

text_chars = st.text(alphabet=st.sampled_from(list("ABCxyz019 .-'/")), min_size=1, max_size=6)
# hl7apy strips whitespace at the end of a segment; we keep values as sent, so the oracle gets none
structural_chars = st.text(alphabet=st.sampled_from(list("ABCxyz019.-'/")), min_size=1, max_size=6)
# hl7apy re-escapes \\Xhh\\ when it writes a field back, so the structural oracle sees delimiter escapes only
delimiter_escape = st.sampled_from(["\\F\\", "\\S\\", "\\T\\", "\\R\\", "\\E\\"])
escape_seq = st.one_of(delimiter_escape, st.sampled_from(["\\X41\\", "\\X4a4B\\"]))
atom = st.lists(st.one_of(text_chars, escape_seq), min_size=1, max_size=3).map("".join)
structural_atom = st.lists(st.one_of(structural_chars, delimiter_escape), min_size=1, max_size=3).map("".join)
subcomponents = st.lists(structural_atom, min_size=1, max_size=3).map("&".join)
components = st.lists(subcomponents, min_size=1, max_size=4).map("^".join)
repetitions = st.lists(components, min_size=1, max_size=3).map("~".join)
field_value = st.one_of(st.just(""), repetitions)
segment_name = st.sampled_from(["ZAA", "ZPI", "ZQX", "ZV1"])
segment = st.tuples(segment_name, st.lists(field_value, min_size=1, max_size=8)).map(
    lambda t: t[0] + "|" + "|".join(t[1]).rstrip("|") if any(t[1]) else t[0] + "|x")
message = st.lists(segment, min_size=1, max_size=4).map(lambda segs: "\r".join([MSH.format(cid="1")] + segs) + "\r")


def _position(name: str, default: int) -> int:
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else default


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message)
def test_structure_matches_hl7apy(text):
    ours = parse(text.encode())
    oracle = parse_message(text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT)
    oracle_segments = list(oracle.children)
    assert [s.name for s in ours.segments] == [s.name for s in oracle_segments]
    for mine, theirs in zip(ours.segments[1:], oracle_segments[1:]):
        reps_seen: dict[int, int] = {}
        for f in theirs.children:
            n = _position(f.name, 0)
            k = reps_seen.get(n, 0)
            reps_seen[n] = k + 1
            assert mine.repetitions(n)[k] == f.to_er7()
            comps = mine.repetitions(n)[k].split("^")
            for i, c in enumerate(f.children, start=1):
                pos = _position(c.name, i)
                assert comps[pos - 1] == c.to_er7()
        # nothing of ours the oracle does not have
        for n in range(1, len(mine.fields)):
            assert len(mine.repetitions(n)) == reps_seen.get(n, 0)


@settings(max_examples=300, deadline=None)
@given(atom)
def test_escapes_match_python_hl7(value):
    oracle = hl7.parse(MSH.format(cid="1") + "\r").unescape(value)
    assert unescape(value, "|", "^", "~", "\\", "&") == oracle


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_escape_round_trip(value):
    value = value.replace("\r", "\n")
    assert unescape(escape(value), "|", "^", "~", "\\", "&") == value


def test_escape_sequences_decoded_on_access():
    raw = (MSH.format(cid="9") + "\rPID|1||1^^^X^MR||O\\T\\BRIEN^ANN\\F\\MARIE\\S\\X^^^DR\\E\\\\X2D\\\\.br\\Z||\r").encode()
    msg = parse(raw)
    assert msg.get("PID-5.1") == "O&BRIEN"
    assert msg.get("PID-5.2") == "ANN|MARIE^X"
    assert msg.get("PID-5.5") == "DR\\-\nZ"
    assert msg.segment("PID").get(5, 1, decode=False) == "O\\T\\BRIEN"


def test_highlight_and_formatting_sequences_carry_no_text():
    assert unescape("\\H\\bold\\N\\ plain\\.sp2\\", "|", "^", "~", "\\", "&") == "bold plain"
    # an unterminated escape is kept as sent, never dropped
    assert unescape("a\\Fb", "|", "^", "~", "\\", "&") == "a\\Fb"


def test_hex_escape_uses_the_message_charset():
    assert unescape("\\XC3A9\\", "|", "^", "~", "\\", "&", "utf-8") == "é"
    assert unescape("\\XE9\\", "|", "^", "~", "\\", "&", "latin-1") == "é"


def test_paths_and_repetitions():
    raw = (MSH.format(cid="7") + "\rPID|1||9449305552^^^NHS^NH~633^^^R0A&1.2.3&ISO^MR\r").encode()
    msg = parse(raw)
    assert msg.get("PID-3.1") == "9449305552"
    assert msg.get("PID-3(2).1") == "633"
    assert msg.get("PID-3(2).4") == "R0A"
    assert msg.get("PID-3(2).4.2") == "1.2.3"
    assert msg.get("PID-3(3).1") == ""
    assert msg.get("PV1-3") == ""
    assert msg.get("MSH-9.2") == "A01"
    assert msg.msh.get(1) == "|" and msg.msh.get(2) == "^~\\&"
    assert msg.control_id == "7" and msg.version == "2.5"
    assert parse_path("PID-3(2).4.1") == ("PID", 3, 2, 4, 1)
    with pytest.raises(ValueError):
        parse_path("PID.3")


def test_alternative_encoding_characters():
    raw = b"MSH#$*!@#PAS#RX1#CP#RX1#20240301##ADT$A01#55#P#2.4\rPID###1$$$NHS$NH*2$$$X$MR##SMITH$ANN!T!JO$A@B\r"
    msg = parse(raw)
    assert msg.enc.field == "#" and msg.enc.comp == "$" and msg.enc.rep == "*"
    assert msg.get("PID-3(2).1") == "2"
    assert msg.get("PID-5.2") == "ANN@JO"  # !T! is the subcomponent separator, escaped
    assert msg.get("PID-5.3.2") == "B"
    assert msg.trigger_event == "A01"


def test_segment_terminators_cr_lf_and_crlf():
    for term in ("\r", "\n", "\r\n"):
        msg = parse((MSH.format(cid="1") + term + "PID|1||X^^^A^MR" + term).encode())
        assert [s.name for s in msg.segments] == ["MSH", "PID"]


@pytest.mark.parametrize("declared,codec,text", [
    ("8859/1", "latin-1", "MÜLLER"),
    ("UNICODE UTF-8", "utf-8", "ŁUKASZ Ωmega"),
    ("ASCII", "ascii", "PLAIN"),
    ("", "utf-8", "SIÂN"),
])
def test_msh18_charsets(declared, codec, text):
    raw = (MSH.format(cid="1") + f"||||||{declared}\rPID|1||X^^^A^MR||{text}\r").encode(codec)
    msg = parse(raw)
    assert msg.get("PID-5.1") == text
    assert msg.fault is None


def test_bytes_not_in_the_declared_charset_are_a_fault_not_a_crash():
    raw = (MSH.format(cid="1") + "||||||ASCII\rPID|1||X^^^A^MR||MÜLLER\r").encode("latin-1")
    msg = parse(raw)
    assert msg.fault is not None and msg.fault.location == "MSH-18" and not msg.fault.reject


def test_unknown_charset_is_rejected():
    with pytest.raises(Hl7Error) as err:
        parse((MSH.format(cid="1") + "||||||KLINGON\r").encode())
    assert err.value.reject and err.value.location == "MSH-18"


@pytest.mark.parametrize("raw,location", [
    (b"PID|1||X\r", "MSH"),
    (b"", "MSH"),
    (b"MSH|", "MSH-2"),
    (b"MSH|^~\\|A\r", "MSH-2"),
    (b"MSH|^^\\&|A|B\r", "MSH-2"),
    (b"MSHA^~\\&A\r", "MSH-1"),
    (b"MSH|^~\\&|A|B\rPID|1\rpid|bad\r", None),
])
def test_unreadable_msh_raises_reject(raw, location):
    if location is None:
        msg = parse(raw)  # a bad later segment is a fault of the message (AE), not of the header
        assert msg.fault is not None and not msg.fault.reject
        return
    with pytest.raises(Hl7Error) as err:
        parse(raw)
    assert err.value.reject and err.value.location == location


def test_repr_never_shows_patient_data():
    msg = parse((MSH.format(cid="1") + "\rPID|1||X^^^A^MR||SECRETNAME\r").encode())
    assert "SECRETNAME" not in repr(msg) and "SECRETNAME" not in repr(msg.segment("PID"))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"MSH|^~\\&|" + b)))
def test_prepare_never_raises_on_arbitrary_bytes(raw):
    from gateway.hl7.config import Hl7Settings
    from gateway.hl7.listener import build_processor

    p = build_processor(Hl7Settings()).prepare(raw)
    # junk is either rejected, an error, or (a well-formed header of a type we do not process) ignored
    assert p.reject or p.error or p.ignore or p.mapped is not None
    if p.mapped is not None:
        assert p.mapped.patients and p.mapped.patients[0].patient.identifiers
