"""Slow and idle HTTP clients are timed out (gateway/http/bounded_head.py), on a real socket, both backends.

uvicorn alone waits for ever on a connection that sends nothing, or sends its head or body a byte at a time; each
such connection holds a descriptor of the limit every door shares. Here the read timeout is 1 s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager
from functools import partial

import pytest
import uvicorn
from sqlalchemy import func, select

from gateway.app import create_app
from gateway.http.bounded_head import BoundedHeadProtocol
from store.models import Asset
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import add_patient

READ_TIMEOUT = 1.0
MiB = 1024 * 1024


@contextmanager
def serving(app, sndbuf: int | None = None):
    """`app` behind the gateway's HTTP protocol with a 1 s read timeout, on a free port; yields the port."""
    sock = socket.socket()
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           http=partial(BoundedHeadProtocol, read_timeout=READ_TIMEOUT)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def port(gw):
    with serving(create_app(gw)) as bound:
        yield bound


async def timing_app(scope, receive, send):
    """/slow answers after 2.5 s; /wait-then-read waits 2.5 s before it reads the body; /big answers 64 MiB."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path in ("/slow", "/wait-then-read"):
        await asyncio.sleep(2.5)
    size = 0
    if path == "/wait-then-read":
        while (message := await receive())["type"] == "http.request":
            size += len(message["body"])
            if not message.get("more_body"):
                break
    body = path.encode() + b" " + str(size).encode()
    if path == "/sized":  # one write of ?bytes=N
        size = int(scope["query_string"].decode().partition("=")[2])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(size).encode())]})
        await send({"type": "http.response.body", "body": b"~" * size})
        return
    if path == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(64 * MiB).encode())]})
        for _ in range(64):
            await send({"type": "http.response.body", "body": b"z" * MiB, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def timing_port():
    with serving(timing_app) as bound:
        yield bound


@pytest.fixture(scope="module")
def small_buffer_port():
    """timing_app on a socket whose kernel send buffer is small (accepted sockets inherit it), so an answer of some
    tens of KiB stays partly in the protocol's own write buffer."""
    with serving(timing_app, sndbuf=8192) as bound:
        yield bound


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def asset_count(gw) -> int:
    with gw.db.read() as s:
        return s.scalar(select(func.count()).select_from(Asset))


def upload_head(gw, port: int, body_length: int, boundary: str) -> bytes:
    headers = {**auth_headers(gw), "Content-Type": f"multipart/form-data; boundary={boundary}",
               "Content-Length": str(body_length), "Host": f"127.0.0.1:{port}"}
    return ("POST /api/v1/photos HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


def upload_body(patient: dict, photo: bytes, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n"
            f"{json.dumps({'patient': 'nhs|' + patient['nhs']})}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"p.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        assert read_all(sock) == b""  # no 408 on a connection that never asked: a browser's unused preconnection
        assert READ_TIMEOUT * 0.9 <= time.monotonic() - start < READ_TIMEOUT + 4


def test_a_head_trickled_a_byte_at_a_time_is_answered_408_at_its_deadline(port):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        try:
            for byte in head:  # one byte every 50 ms: each read comes well inside the timeout, the whole head does not
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"Request timeout." in answer
        assert time.monotonic() - start < READ_TIMEOUT + 4


def test_a_stalled_upload_body_is_answered_408_and_leaves_nothing(gw, port, fx):
    patient = add_patient(gw)
    boundary = "clinphotoboundary"
    body = upload_body(patient, fx["baseline_420.jpg"].read_bytes(), boundary)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(upload_head(gw, port, len(body), boundary) + body[: len(body) // 2])  # then nothing more
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    deadline = time.monotonic() + 10
    while gw.spool.files():  # the route ends on the disconnect and removes what it spooled
        assert time.monotonic() < deadline, gw.spool.files()
        time.sleep(0.05)
    assert asset_count(gw) == 0


def test_an_upload_body_that_keeps_coming_slowly_is_not_cut_off(gw, port, fx):
    """The body's timeout runs from its last byte, not from its first: a slow link is not a stalled one."""
    patient = add_patient(gw)
    boundary = "clinphotoboundary"
    body = upload_body(patient, fx["baseline_420.jpg"].read_bytes(), boundary)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(upload_head(gw, port, len(body), boundary))
        pieces = 6
        step = -(-len(body) // pieces)
        start = time.monotonic()
        for offset in range(0, len(body), step):  # 6 pieces 0.5 s apart: 2.5 s in all, more than the timeout
            time.sleep(0.5)
            sock.sendall(body[offset:offset + step])
        assert time.monotonic() - start > READ_TIMEOUT * 2
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert asset_count(gw) == 1


def test_a_keep_alive_connection_serves_a_second_request_after_the_first(port):
    """The timers stop with each request: a client that asks twice, promptly, is answered twice."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            time.sleep(READ_TIMEOUT * 1.5)  # longer than the read timeout, shorter than uvicorn's 5 s keep-alive


def test_stray_bytes_after_an_answer_do_not_keep_the_connection_for_ever(port):
    """A blank line after an answer stops uvicorn's keep-alive timer and begins no request: closed all the same."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"\r\n")
        start = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - start < READ_TIMEOUT + 4


def test_a_body_sent_after_an_early_answer_does_not_keep_the_connection_for_ever(port):
    """401 before the body is read; the client then sends its body and nothing more: closed after the timeout."""
    body = b"x" * 5000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/photos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        sock.sendall(body)
        start = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - start < READ_TIMEOUT + 4


def test_pipelined_requests_are_answered_in_order_while_a_late_head_waits_behind_them(timing_port):
    """Two whole requests and the start of a third at once: the first takes 2.5 s, longer than the timeout. The
    third head's clock does not run while the answers before it are being made, so no 408 is taken for the first
    request's answer; the third is answered 408 only once it is its turn and it still is not whole."""
    with socket.create_connection(("127.0.0.1", timing_port), timeout=20) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /third HT")
        answer = read_all(sock)
    first, second, third = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and first.endswith(b"/slow 0"), answer
    assert second.startswith(b"200 ") and second.endswith(b"/fast 0"), answer
    assert third.startswith(b"408 "), answer


def test_a_client_waiting_for_100_continue_gets_its_whole_timeout_after_it(timing_port):
    """The app reads the body 2.5 s after the head: the client, waiting for 100 Continue meanwhile, is not cut off
    when it then sends its body."""
    body = b"y" * 1000
    with socket.create_connection(("127.0.0.1", timing_port), timeout=20) as sock:
        sock.sendall(b"POST /wait-then-read HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        time.sleep(READ_TIMEOUT / 2)  # a client a little slow to react
        sock.sendall(body)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"/wait-then-read 1000"), answer


def test_a_client_that_reads_none_of_its_answer_is_cut_off(timing_port):
    with socket.create_connection(("127.0.0.1", timing_port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(READ_TIMEOUT + 2)  # reads nothing: the gateway's write buffer fills and stays full
        got = 0
        try:
            while chunk := sock.recv(MiB):
                got += len(chunk)
        except ConnectionResetError:
            pass
    assert got < 16 * MiB, got  # what sat in the buffers, not the 64 MiB answer


def test_a_client_reading_a_large_answer_slowly_but_steadily_gets_all_of_it(timing_port):
    """4 MiB written at once, taken at ~1.3 MB/s: longer than the timeout in all, but never a timeout without progress."""
    size = 4 * MiB
    with socket.create_connection(("127.0.0.1", timing_port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /sized?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        start, got = time.monotonic(), b""
        while chunk := sock.recv(64 * 1024):
            got += chunk
            time.sleep(0.05)
        assert time.monotonic() - start > READ_TIMEOUT * 2
    assert got.endswith(b"~" * 1000) and got.count(b"~") >= size, len(got)


@pytest.mark.parametrize("size", [80_000, 120_000])
def test_an_answer_left_unsent_at_its_end_does_not_hold_the_connection(small_buffer_port, size):
    """The whole answer handed to the transport without a pause (less than its high-water mark left over), the
    client reading nothing: uvloop's close() would wait for ever for the rest to drain; it is aborted instead."""
    with socket.create_connection(("127.0.0.1", small_buffer_port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /sized?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        time.sleep(READ_TIMEOUT + 2)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    assert got.count(b"~") < size, len(got)  # what the kernels held, not the rest


def test_a_pipelined_answer_the_client_does_not_read_ends_without_an_error(timing_port, caplog):
    """The send timeout ends the request being answered, not only the newest one read."""
    with socket.create_connection(("127.0.0.1", timing_port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(READ_TIMEOUT + 2)
    time.sleep(0.5)
    assert "Exception in ASGI application" not in caplog.text, caplog.text[-3000:]


def test_a_pipelined_head_too_large_is_refused_after_the_answer_before_it(timing_port):
    with socket.create_connection(("127.0.0.1", timing_port), timeout=20) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
        answer = read_all(sock)
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and first.endswith(b"/slow 0"), answer[:300]
    assert second.startswith(b"400 ") and b"Request head too large." in second, answer[:300]


def test_a_bad_chunk_in_a_body_being_read_is_answered_400_at_once_and_leaves_nothing(gw, port):
    """The app waits for the rest of a body the parser has given up on: it is ended, and the client told why (it was
    held for ever, its place under the connection cap with it)."""
    add_patient(gw)
    head = upload_head(gw, port, 0, "b").replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"5\r\n--b\r\n\r\n")
        time.sleep(0.3)  # the app is reading the body
        start = time.monotonic()
        sock.sendall(b"ZZZ\r\n")
        answer = read_all(sock)
        assert time.monotonic() - start < READ_TIMEOUT  # at once, not at a timeout
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    deadline = time.monotonic() + 10
    while gw.spool.files():
        assert time.monotonic() < deadline, gw.spool.files()
        time.sleep(0.05)
    assert asset_count(gw) == 0


def test_a_client_taking_its_answer_at_100_kb_a_second_is_not_cut_off(timing_port):
    """Its TCP window reopens in steps a second or two apart: no progress is seen for more than the read timeout
    (1 s) at a time now and then, but never for a whole timeout after progress last seen plus a look. 6 s of an
    8 MiB answer, read at ~100 KB/s, come without the connection being closed."""
    with socket.create_connection(("127.0.0.1", timing_port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /sized?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (8 * MiB))
        got, start = 0, time.monotonic()
        while time.monotonic() - start < 6:
            chunk = sock.recv(16 * 1024)
            assert chunk, f"closed after {got} bytes, {time.monotonic() - start:.1f} s"
            got += len(chunk)
            time.sleep(0.16)  # ~100 KB/s
    assert got > 300 * 1024, got
