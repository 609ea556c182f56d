"""`clinphoto hl7 send`: the fixtures' files (and files an editor touched) over MLLP, each ACK printed, the exit
status saying whether every message was accepted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.hl7.mllp import frame
from gateway.hl7.sender import BadMessageFile, ack_code, split_messages
from tests.net import free_port
from tests.test_mllp_listener import FIX, count, running

A01 = (FIX / "adt_a01_admit.hl7").read_bytes()
A08 = (FIX / "adt_a08_update.hl7").read_bytes()
CLINPHOTO = [sys.executable, "-m", "gateway.cli"]


def send(*args: str, port: int, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env["CLINPHOTO_MLLP_PORT"] = str(port)
    return subprocess.run([*CLINPHOTO, "hl7", "send", *args], env=env, input=stdin, capture_output=True, timeout=120)


def test_split_reads_the_fixtures_and_what_editors_and_engines_make_of_them():
    assert split_messages(A01) == [A01]  # as fixtures/hl7 holds it: segments ended by CR
    crlf = A01.replace(b"\r", b"\r\n") + b"\r\n" + A08.replace(b"\r", b"\n")
    assert split_messages(b"\xef\xbb\xbf" + crlf) == [A01, A08]
    assert split_messages(frame(A01.rstrip(b"\r")) + frame(A08)) == [A01.rstrip(b"\r"), A08]
    assert ack_code(b"MSH|^~\\&|CLINPHOTO|||||||ACK|1|P|2.4\rMSA|AE|A01-0001\rERR|||103\r") == "AE"
    assert ack_code(b"MSH|^~\\&|X\r") == ""


@pytest.mark.parametrize("data, says", [
    (b"PID|1||9449305552\r", "the first segment is 'PID'"),
    (b"\r\n\r\n", "no HL7 message"),
    (b"\x0bMSH|^~\\&|PAS\r", "not ended"),
])
def test_split_names_what_is_not_a_message(data, says):
    with pytest.raises(BadMessageFile, match=says):
        split_messages(data, "feed.hl7")


@pytest.mark.parametrize("backend", ["sqlite"])  # the listener's store is not what is tested here
def test_send_prints_each_ack_and_fails_on_a_refusal(db, tmp_path, backend):
    edited = tmp_path / "two.hl7"
    edited.write_bytes(A01.replace(b"\r", b"\r\n") + A08.replace(b"\r", b"\r\n"))
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(A08.replace(b"A08-0001", b"A08-0002").replace(b"9449305552", b"9449305553"))  # check digit wrong
    with running(db) as listener:
        ok = send(str(edited), port=listener.port)
        assert ok.returncode == 0, ok.stderr
        lines = ok.stdout.decode().splitlines()
        assert [line for line in lines if line.startswith("MSA|")] == ["MSA|AA|A01-0001", "MSA|AA|A08-0001"]
        assert lines[0].startswith("MSH|") and "" in lines and b"\r" not in ok.stdout  # a segment a line, ACKs apart
        refused = send("-", port=listener.port, stdin=bad.read_bytes())  # from standard input
        assert refused.returncode == 1 and b"MSA|AE|A08-0002" in refused.stdout
        assert b"1 of 1 message(s) not accepted" in refused.stderr
    assert count(db) == 3


def test_send_says_why_nothing_was_sent(tmp_path):
    nobody = send(str(FIX / "adt_a01_admit.hl7"), port=free_port())
    assert nobody.returncode == 1 and b"127.0.0.1:" in nobody.stderr and b"refused" in nobody.stderr.lower(), nobody.stderr
    missing = send(str(tmp_path / "nothing.hl7"), port=free_port())
    assert missing.returncode == 2 and b"nothing.hl7" in missing.stderr


def test_send_options_out_of_range_are_usage_errors():
    """--timeout 1e308 was a traceback (socket.settimeout: OverflowError: timestamp out of range) and --port -1 a
    resolver error; both are now usage errors (exit 2) before any connection is tried."""
    for option in (("--timeout", "1e308"), ("--port", "-1"), ("--port", "70000")):
        res = send(str(FIX / "adt_a01_admit.hl7"), *option, port=free_port())
        assert res.returncode == 2 and b"Traceback" not in res.stderr, res.stderr
