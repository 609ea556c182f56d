"""The MLLP listener over real sockets on 127.0.0.1, with a raw-socket client and python-hl7's mllp_send."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.hl7.config import Hl7Settings
from gateway.hl7.listener import MAX_IN_FLIGHT, MllpListener
from gateway.hl7.mllp import START, FrameTooLarge, MllpDecoder, frame
from gateway.serve import new_event_loop
from mapping.message import parse
from store.models import Hl7Message, Patient

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hl7"
MLLP_SEND = Path(sys.executable).with_name("mllp_send")


def adt(cid: str, nhs: str = "9449305552", extra: str = "") -> bytes:
    return (f"MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240301101500||ADT^A28^ADT_A05|{cid}|P|2.4\r"
            f"EVN|A28|20240301101500\rPID|1||{nhs}^^^NHS^NH~M{cid}^^^RX1^MR||SMITH{extra}^ANN||19800101|F\r").encode()


# -- framing ------------------------------------------------------------------------------


def test_decoder_split_and_concatenated_frames():
    d = MllpDecoder()
    whole = frame(b"ONE") + frame(b"TWO") + frame(b"THREE")
    out = []
    for i in range(len(whole)):  # one byte per read, END split across reads too
        msgs, dropped, truncated = d.feed(whole[i:i + 1])
        out += msgs
        assert dropped == 0 and truncated == 0
    assert out == [b"ONE", b"TWO", b"THREE"]
    assert d.feed(whole) == ([b"ONE", b"TWO", b"THREE"], 0, 0)


def test_decoder_drops_bytes_outside_frames_and_truncated_frames():
    d = MllpDecoder()
    assert d.feed(b"noise\r\n" + frame(b"A") + b"xx") == ([b"A"], 9, 0)
    # a frame that never ended, then a new one: the partial one is dropped, never delivered
    assert d.feed(START + b"PARTIAL" + frame(b"B")) == ([b"B"], 0, 1)
    assert d.feed(b"\x1c\x0d") == ([], 2, 0)


def test_decoder_frame_limit():
    d = MllpDecoder(max_frame=1000)
    d.feed(START + b"x" * 900)
    with pytest.raises(FrameTooLarge):
        d.feed(b"x" * 200)
    d = MllpDecoder(max_frame=1000)
    with pytest.raises(FrameTooLarge):
        d.feed(frame(b"y" * 1001))


# -- a listener on a real socket --------------------------------------------------------------


@contextmanager
def running(db, **settings):
    """The listener in its own event loop thread, as `clinphoto serve` runs it."""
    loop = new_event_loop()
    listener = MllpListener(db, Hl7Settings(**settings), "127.0.0.1", 0)
    started = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(listener.start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield listener
    finally:
        asyncio.run_coroutine_threadsafe(listener.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


class Client:
    def __init__(self, port: int, timeout: float = 10, rcvbuf: int = 0, sndbuf: int = 0) -> None:
        self.sock = socket.socket()
        for option, size in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, sndbuf)):
            if size:  # before connect(): the window scale is agreed then
                self.sock.setsockopt(socket.SOL_SOCKET, option, size)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = MllpDecoder()
        self.pending: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.pending += self.decoder.feed(data)[0]
        return self.pending.pop(0)

    def call(self, message: bytes) -> bytes:
        self.send_raw(frame(message))
        return self.recv()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:  # closed with our bytes unread
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def msa(ack: bytes) -> tuple[str, str]:
    m = parse(ack).segment("MSA")
    return m.get(1), m.get(2)


def count(db, model=Hl7Message) -> int:
    with db.read() as s:
        return s.execute(select(func.count()).select_from(model)).scalar()


def test_raw_socket_round_trip_and_nodelay(db):
    with running(db) as listener:
        c = Client(listener.port)
        assert msa(c.call(adt("1"))) == ("AA", "1")
        # several frames in one write, and one frame split over writes
        c.send_raw(frame(adt("2")) + frame(adt("3")))
        assert [msa(c.recv()) for _ in range(2)] == [("AA", "2"), ("AA", "3")]
        f = frame(adt("4"))
        c.send_raw(f[:10])
        time.sleep(0.05)
        c.send_raw(f[10:-1])
        time.sleep(0.05)
        c.send_raw(f[-1:])
        assert msa(c.recv()) == ("AA", "4")
        c.close()
    assert count(db) == 4 and count(db, Patient) == 1


def test_mllp_send_as_independent_client(db, tmp_path):
    framed = tmp_path / "framed.mllp"  # mllp_send's plain mode reads MLLP-framed messages
    framed.write_bytes(frame((FIX / "adt_a01_admit.hl7").read_bytes()))
    with running(db) as listener:
        res = subprocess.run([str(MLLP_SEND), "--port", str(listener.port), "--file", str(framed),
                              "127.0.0.1"], capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert b"MSA|AA|A01-0001" in res.stdout
        loose = tmp_path / "loose.hl7"
        loose.write_bytes((FIX / "adt_a08_update.hl7").read_bytes().replace(b"\r", b"\r\n"))
        res = subprocess.run([str(MLLP_SEND), "--loose", "--port", str(listener.port), "--file", str(loose),
                              "127.0.0.1"], capture_output=True, timeout=60)
        assert res.returncode == 0 and b"MSA|AA|A08-0001" in res.stdout, res.stdout + res.stderr
    assert count(db) == 2


def test_many_concurrent_connections(db):
    with running(db) as listener:
        errors = []

        def worker(n):
            try:
                c = Client(listener.port)
                for i in range(20):
                    code, cid = msa(c.call(adt(f"{n}-{i}", extra=str(n))))
                    assert (code, cid) == ("AA", f"{n}-{i}")
                c.close()
            except Exception as exc:  # collected and reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        # messages from different connections shared commits
        assert listener.committer.messages == 240 and listener.committer.batches < 240
    assert count(db) == 240


def test_messages_sent_ahead_of_their_acks_are_answered_in_order_after_their_commit(db):
    """A sender that does not wait for each ACK: the next messages are read while earlier ones commit, and each
    connection's ACKs come back in the order sent, each after its message was committed; the same patient updated
    many times ends with the last update, and a refused message in the middle holds up nobody."""
    with running(db) as listener:
        senders = [Client(listener.port) for _ in range(3)]
        sent: dict[int, list[str]] = {}
        for n, c in enumerate(senders):
            cids = [f"P{n}-{i}" for i in range(40)]
            sent[n] = cids
            data = b"".join(frame(adt(cid, nhs=("9449305552", "9449305560", "9449305579")[n], extra=f"V{i:02d}")
                                  if i != 17 else b"MSH|^~\\&|PAS|RX1\rPID|broken\r")
                            for i, cid in enumerate(cids))
            c.send_raw(data)  # all forty at once
        for n, c in enumerate(senders):
            answers = [msa(c.recv()) for _ in range(40)]
            assert [cid for _code, cid in answers[:17] + answers[18:]] == sent[n][:17] + sent[n][18:]
            assert answers[17][0] == "AR" and {code for code, _cid in answers[:17] + answers[18:]} == {"AA"}
            with db.read() as s:  # every message answered is stored
                stored = set(s.scalars(select(Hl7Message.control_id).where(Hl7Message.control_id.like(f"P{n}-%"))))
            assert stored == set(sent[n][:17] + sent[n][18:])
            c.close()
        assert listener.committer.batches < listener.committer.messages  # read while earlier ones committed
    with db.read() as s:
        families = set(s.scalars(select(Patient.family_name)))
    assert families == {"SMITHV39"}  # one patient per sender (same numbers), each at its last update


def test_bytes_outside_frames_are_ignored_and_logged(db, caplog):
    with caplog.at_level(logging.WARNING, logger="clinphoto.hl7.mllp"):
        with running(db) as listener:
            c = Client(listener.port)
            c.send_raw(b"GET / HTTP/1.0\r\n\r\n" + frame(adt("1")))
            assert msa(c.recv()) == ("AA", "1")
            c.close()
    assert any("outside a frame ignored" in r.getMessage() for r in caplog.records)


def test_frame_size_limit_closes_the_connection(db, caplog):
    with caplog.at_level(logging.WARNING, logger="clinphoto.hl7.mllp"):
        with running(db, max_frame_bytes=64 * 1024) as listener:
            c = Client(listener.port)
            try:
                c.send_raw(START + b"MSH|" + b"x" * (200 * 1024))
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert c.closed()
            # the listener is still serving others
            c2 = Client(listener.port)
            assert msa(c2.call(adt("2"))) == ("AA", "2")
            c2.close()
    assert any("larger than 65536 bytes" in r.getMessage() for r in caplog.records)
    assert count(db) == 1


def test_idle_timeout_closes_the_connection(db):
    with running(db, idle_timeout=0.3) as listener:
        c = Client(listener.port)
        time.sleep(0.8)
        assert c.closed()


def test_allow_list(db):
    with running(db, allowed_sources=["10.0.0.0/8"]) as listener:
        c = Client(listener.port)
        c.send_raw(frame(adt("1")))
        assert c.closed()
    assert count(db) == 0
    with running(db, allowed_sources=["127.0.0.0/8", "::1"]) as listener:
        c = Client(listener.port)
        assert msa(c.call(adt("1"))) == ("AA", "1")
        c.close()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls(db, tmp_path):
    cert, key = _self_signed(tmp_path)
    with running(db, tls_cert=cert, tls_key=key) as listener:
        ctx = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(frame(adt("T1")))
                d = MllpDecoder()
                msgs = []
                while not msgs:
                    msgs = d.feed(s.recv(65536))[0]
                assert msa(msgs[0]) == ("AA", "T1")
        # plain text on the TLS port gets nothing and does not hurt the listener
        c = Client(listener.port)
        c.send_raw(frame(adt("PLAIN")))
        assert c.closed()
    assert count(db) == 1


# -- malformed input: never a crash, never an AA ----------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"PID|1||9449305552^^^NHS^NH\r",  # no MSH
    b"MSH|^^^^|PAS|RX1\r",  # odd encoding characters
    b"MSH|\r",
    b"MSH|^~\\&|PAS|RX1|CP|RX1|2024||ADT^A01|X|P|2.4|||||GBR|KOI8\r",
    b"\x00\xff\xfe",
    b"",
])
def test_malformed_messages_get_ar_not_aa(db, payload):
    with running(db) as listener:
        c = Client(listener.port)
        code, _ = msa(c.call(payload))
        assert code == "AR"
        assert msa(c.call(adt("after")))[0] == "AA"
        c.close()


def test_truncated_frame_then_disconnect(db):
    with running(db) as listener:
        c = Client(listener.port)
        c.send_raw(START + adt("TRUNC")[:40])
        c.close()
        c = Client(listener.port)
        assert msa(c.call(adt("2"))) == ("AA", "2")
        c.close()
    with db.read() as s:
        assert s.execute(select(Hl7Message.control_id)).scalars().all() == ["2"]


def test_100kb_fields(db):
    with running(db) as listener:
        c = Client(listener.port)
        big = "A" * 100_000
        ack = c.call(adt("BIG", extra=big))
        assert msa(ack)[0] == "AE"  # a 100 KB family name cannot be stored in a 200-character column
        zsegment = adt("BIGZ") + f"ZXX|{big}\r".encode()
        assert msa(c.call(zsegment))[0] == "AA"  # a large Z segment is kept raw, not in a column
        c.close()
    with db.read() as s:
        assert len(s.execute(select(Hl7Message.raw).where(Hl7Message.control_id == "BIGZ")).scalar_one()) > 100_000


def test_random_byte_strings_never_crash_and_never_get_aa(db):
    rng = random.Random(1234)
    alphabet = bytes(range(256))
    acks = 0
    with running(db) as listener:
        c = Client(listener.port, timeout=30)
        for i in range(10_000):
            n = rng.randint(0, 60)
            junk = bytes(rng.choice(alphabet) for _ in range(n)).replace(START, b"").replace(b"\x1c", b"")
            if i % 2:
                junk = b"MSH|^~\\&|" + junk  # looks like a header, then garbage
            c.send_raw(frame(junk))
            code = msa(c.recv())[0]
            assert code in ("AR", "AE"), junk
            acks += 1
        # raw junk outside frames, too
        c.send_raw(bytes(rng.choice(alphabet) for _ in range(5000)).replace(START, b""))
        c.close()
        c = Client(listener.port)
        assert msa(c.call(adt("alive")))[0] == "AA"
        c.close()
    assert acks == 10_000
    assert count(db, Patient) == 1


def test_stop_finishes_in_flight_work(db):
    with running(db) as listener:
        c = Client(listener.port)
        for i in range(50):
            c.send_raw(frame(adt(f"S{i}")))
        acks = [msa(c.recv()) for _ in range(50)]
        c.close()
    assert all(a[0] == "AA" for a in acks)
    assert count(db) == 50


def test_readme_commands_for_sending_the_fixtures(db, tmp_path):
    """The `clinphoto hl7 send` lines README's "Sending test messages" shows, run as written (the port from
    CLINPHOTO_MLLP_PORT, as on the gateway's machine)."""
    readme = (FIX.parent.parent / "README.md").read_text()
    section = readme[readme.index("### Sending test messages"):]
    block = section[section.index("```\n") + 4:]
    block = block[:block.index("```")]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2 and all(c.startswith("clinphoto hl7 send ") for c in commands)
    with running(db) as listener:
        script = "set -eo pipefail\n" + "\n".join(commands)
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CLINPHOTO_MLLP_PORT": str(listener.port)}
        res = subprocess.run(["bash", "-c", script], cwd=FIX.parent.parent, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
    # one ACK per message, segments on their own lines
    assert [line for line in res.stdout.splitlines() if line.startswith("MSA|")] == [
        "MSA|AA|A01-0001", "MSA|AA|A01-0001", "MSA|AA|A08-0001", "MSA|AA|A03-0001"]
    assert "\r" not in res.stdout
    assert count(db) == 3  # the second A01 is the same message again: its original ACK, stored once


@pytest.mark.parametrize("backend", ["sqlite"])  # the write lock held from outside is SQLite's BEGIN IMMEDIATE
def test_a_locked_database_never_blocks_the_event_loop(db, backend):
    """One message waiting for the SQLite write lock must not stall the loop that HTTP, DICOM and the other
    MLLP connections share; its ACK still follows the durable commit."""
    import sqlite3

    path = db.engine.url.database
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # COMMIT from a timer thread
    hold = 5.0  # long beside a loaded machine's scheduling delays, so "at once" and "after the lock" stay apart
    with running(db) as listener:
        c = Client(listener.port)
        holder.execute("BEGIN IMMEDIATE")
        released = threading.Timer(hold, holder.execute, ("COMMIT",))
        t0 = time.monotonic()
        released.start()
        try:
            c.send_raw(frame(adt("LOCK1")))
            time.sleep(0.3)  # the message is read and waiting for the lock
            # the loop answers at once: a callback run on it, and a second connection accepted and served
            probe = time.monotonic()
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), listener.loop).result(timeout=hold)
            assert time.monotonic() - probe < 1.0
            other = Client(listener.port)
            probe = time.monotonic()
            other.send_raw(b"noise outside a frame\r")  # handled (and dropped) by the loop without the database
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), listener.loop).result(timeout=hold)
            assert time.monotonic() - probe < 1.0
            assert time.monotonic() - t0 < hold - 0.5  # all of this while the lock was still held
            ack = c.recv()
            assert time.monotonic() - t0 >= hold - 0.1  # the ACK only after the commit, after the lock
            assert msa(ack) == ("AA", "LOCK1")
            other.close()
        finally:
            released.join()
            holder.close()
            c.close()
    assert count(db) == 1


# -- ACKs a sender does not read: its reading held, never its frame's time --------------------------------------


def small_kernel_buffers(listener: MllpListener) -> None:
    """8 KiB kernel buffers on the gateway's side of the connections accepted from now on (accepted sockets inherit
    them), so ACKs a sender leaves unread reach the transport's own buffer within tens of KiB, not megabytes."""
    for sock in listener._socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)


def small_window_client(port: int, timeout: float) -> Client:
    """A Client whose kernel takes in 4 KiB of ACKs at most while it reads none (and holds 8 KiB unsent)."""
    return Client(port, timeout, rcvbuf=4096, sndbuf=8192)


def wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def the_connection(listener: MllpListener):
    wait_for(lambda: len(listener.connections) == 1)
    return next(iter(listener.connections))


class WriteBuffer:
    """The transport buffer of the listener's one connection, sampled on its loop every 5 ms."""

    def __init__(self) -> None:
        self.most = 0  # the most bytes it held
        self.waiting_since: float | None = None  # since when it has held some, without a break
        self.ended: float | None = None  # when the connection was first seen gone


@contextmanager
def watching(listener: MllpListener):
    buffer, stop = WriteBuffer(), threading.Event()

    async def sample() -> None:
        seen = False
        while not stop.is_set() and buffer.ended is None:
            now = time.monotonic()
            for conn in list(listener.connections):
                seen = True
                size = conn.transport.get_write_buffer_size() if conn.transport is not None else 0
                buffer.most = max(buffer.most, size)
                if not size:
                    buffer.waiting_since = None
                elif buffer.waiting_since is None:
                    buffer.waiting_since = now
            if seen and not listener.connections:
                buffer.ended = now
            await asyncio.sleep(0.005)

    done = asyncio.run_coroutine_threadsafe(sample(), listener.loop)
    try:
        yield buffer
    finally:
        stop.set()
        done.result(5)


@contextmanager
def commits_held(listener: MllpListener):
    """The writer thread waits before each commit until the yielded event is set (set at the end in any case)."""
    release = threading.Event()
    commit = listener.committer._commit

    def held(*args, **kwargs):
        release.wait(30)
        return commit(*args, **kwargs)

    listener.committer._commit = held
    try:
        yield release
    finally:
        release.set()


def wide_ack_adt(cid: str) -> bytes:
    """An A28 whose ACK is ~830 bytes (MSH-3, -4, -6 and a 190-character MSH-10 echoed, each within its length):
    200 of them fill the transport's 64 KiB high-water mark and the kernels' buffers, under MAX_IN_FLIGHT."""
    pad = "X" * 180
    return (f"MSH|^~\\&|PAS{pad}|RX1{pad}|CLINPHOTO|RX1{pad}|20240301101500||ADT^A28^ADT_A05|{cid:B>190}|P|2.4\r"
            "EVN|A28|20240301101500\rPID|1||9449305552^^^NHS^NH~M1^^^RX1^MR||SMITH^ANN||19800101|F\r").encode()


def test_a_sender_that_reads_none_of_its_acks_is_held_back_then_closed_after_the_idle_timeout(db, caplog):
    """It sends 12,000 messages and reads nothing: the gateway stops reading from it once its ACKs pass the
    transport's high-water mark (TCP then holds the sender back), instead of buffering them all (1.2 MB, and
    without bound); every message read is committed; the sender, held back by us (mid-frame, as a rule), is not
    taken for a trickler by the frame deadline (0.5 s) but is aborted once it has taken none of its ACKs for the idle
    timeout (1.5 s)."""
    caplog.set_level(logging.INFO, logger="clinphoto.hl7.mllp")
    idle_timeout = 1.5
    with running(db, idle_timeout=idle_timeout, frame_timeout=0.5) as listener:
        small_kernel_buffers(listener)
        data = b"".join(frame(adt(f"N{i}")) for i in range(12_000))
        c = small_window_client(listener.port, timeout=idle_timeout + 10)
        with watching(listener) as buffer:
            sent, error = 0, None
            try:
                while sent < len(data):
                    sent += c.sock.send(data[sent:sent + 16384])
            except OSError as exc:  # ConnectionResetError when aborted; TimeoutError when never closed
                error = exc
                wait_for(lambda: buffer.ended is not None)
        c.close()
    assert buffer.most < 512 * 1024, buffer.most  # the high-water mark (64 KiB) and the ACKs of messages in flight
    assert sent < len(data) and isinstance(error, ConnectionResetError | BrokenPipeError), (sent, error)
    # from when its ACKs began to wait unread (while it still sent, and we read, at first; then held back)
    assert buffer.waiting_since is not None and idle_timeout * 0.9 < buffer.ended - buffer.waiting_since < idle_timeout + 5
    with db.read() as s:
        stored = set(s.scalars(select(Hl7Message.control_id)))
    assert stored and stored == {f"N{i}" for i in range(len(stored))}  # every message read, none lost between
    assert len(stored) == listener.committer.messages
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "none of its ACKs taken in" in lines[0], lines


@pytest.mark.parametrize("holding", ["in_flight", "unread_acks"])
def test_a_sender_we_hold_back_mid_frame_is_not_cut_off_by_the_frame_deadline(db, holding):
    """Reading from it held 3 s, with a frame begun, against a 1.5 s frame deadline: by MAX_IN_FLIGHT messages
    unanswered (their commits held), or by ~170 KB of ACKs it has not read yet. Once we read again, it ends the
    frame and is answered."""
    frame_timeout = 1.5  # the ~170 KB of ACKs are written 0.07-0.13 s after the frame began (commits of 200)
    with running(db, frame_timeout=frame_timeout, idle_timeout=60) as listener:
        small_kernel_buffers(listener)
        c = small_window_client(listener.port, timeout=30)
        conn = the_connection(listener)
        whole = MAX_IN_FLIGHT if holding == "in_flight" else 200
        make = adt if holding == "in_flight" else wide_ack_adt
        with commits_held(listener) as release:
            c.send_raw(b"".join(frame(make(f"H{i}")) for i in range(whole - 1)))
            wait_for(lambda: conn.in_flight == whole - 1)
            last = frame(make("LAST"))
            c.send_raw(frame(make(f"H{whole - 1}")) + last[:40])  # a whole message and a frame begun
            wait_for(lambda: conn.in_flight == whole and conn.decoder.in_frame)
            if holding == "unread_acks":
                release.set()  # their ACKs pass the high-water mark: reading held until the sender takes them
                wait_for(lambda: conn.transport.get_write_buffer_size() > 64 * 1024)
            time.sleep(frame_timeout * 2)
            release.set()
            acks = [msa(c.recv()) for _ in range(whole)]
        assert {code for code, _cid in acks} == {"AA"}
        c.send_raw(last[40:])
        assert msa(c.recv())[0] == "AA"
        c.close()
    assert count(db) == whole + 1


def test_a_sender_reading_its_acks_slowly_but_steadily_is_not_cut_off(db):
    """2,200 messages sent at once, their ACKs read ~40 KB/s (200 bytes every 5 ms): reading from it is held
    again and again, and it takes longer than twice the idle timeout in all, but never goes an idle timeout
    without taking some of its ACKs."""
    idle_timeout = 2.5  # a reader thread held up a whole 1 s under a loaded CI machine would rightly be cut off
    with running(db, idle_timeout=idle_timeout, frame_timeout=1.0) as listener:
        small_kernel_buffers(listener)
        c = small_window_client(listener.port, timeout=30)
        data = b"".join(frame(adt(f"S{i}")) for i in range(2200))
        sender = threading.Thread(target=c.sock.sendall, args=(data,), daemon=True)
        start = time.monotonic()
        sender.start()
        acks: list[tuple[str, str]] = []
        with watching(listener) as buffer:
            while len(acks) < 2200:
                while not c.pending:
                    chunk = c.sock.recv(200)
                    if not chunk:
                        raise ConnectionError(f"closed after {len(acks)} ACKs")
                    c.pending += c.decoder.feed(chunk)[0]
                    time.sleep(0.005)
                acks.append(msa(c.pending.pop(0)))
        took = time.monotonic() - start
        sender.join(10)
        c.close()
    assert acks == [("AA", f"S{i}") for i in range(2200)]
    assert took > idle_timeout * 2, took
    assert buffer.most > 64 * 1024  # the gateway had ACKs waiting: it held reading from the sender
    assert count(db) == 2200


def test_stop_does_not_leave_a_sender_that_reads_none_of_its_acks_waiting_for_them_to_drain(db):
    with running(db, idle_timeout=60) as listener:
        small_kernel_buffers(listener)
        c = small_window_client(listener.port, timeout=2)
        try:
            c.send_raw(b"".join(frame(adt(f"N{i}")) for i in range(12_000)))
        except TimeoutError:  # held back: the gateway stopped reading from it
            pass
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10
    assert not listener.connections  # ended, not left open waiting for its ACKs to drain (uvloop's close() does)
    c.close()


def test_a_sender_that_half_closes_and_reads_none_of_its_acks_is_not_kept_open_for_ever(db, caplog):
    """300 messages, then EOF: the connection stays open for their ACKs, then closes; ~36 KB of ACKs, under the
    high-water mark, wait unread, and a plain close() would wait for them for ever."""
    caplog.set_level(logging.WARNING, logger="clinphoto.hl7.mllp")
    idle_timeout = 1.0
    with running(db, idle_timeout=idle_timeout) as listener:
        small_kernel_buffers(listener)
        c = small_window_client(listener.port, timeout=10)
        c.send_raw(b"".join(frame(adt(f"E{i}")) for i in range(300)))
        c.sock.shutdown(socket.SHUT_WR)
        conn = the_connection(listener)
        wait_for(lambda: conn.transport is None or conn.transport.is_closing())  # its ACKs written, then close()
        closing = time.monotonic()
        wait_for(lambda: not listener.connections, idle_timeout + 10)
        assert time.monotonic() - closing < idle_timeout + 5
        c.close()
    assert count(db) == 300
    assert any("none of its ACKs taken" in r.getMessage() for r in caplog.records)
