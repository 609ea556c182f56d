"""A request that asks to upgrade the connection (`Upgrade: h2c`: curl --http2 sends it on http:// URLs, as HTTP/2
clients may) is answered as the HTTP/1.1 request it also is, with its body (uvicorn gave the app an empty one)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time

import pytest

from gateway.app import create_app
from gateway.http.ignored_upgrade import body_framing
from tests.auth_helpers import auth_headers
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient
from tests.test_http_slow_clients import asset_count, read_all, serving, upload_body, upload_head

H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


@pytest.fixture
def port(gw):
    with serving(create_app(gw)) as bound:
        yield bound


def with_upgrade(head: bytes) -> bytes:
    return head.replace(b"\r\n", b"\r\n" + H2C, 1)


def answers(raw: bytes) -> list[bytes]:
    return [b"HTTP/1.1 " + part for part in raw.split(b"HTTP/1.1 ")[1:]]


def test_curl_http2_uploads_a_photo_over_plain_http(gw, port, fx, tmp_path, caplog):
    curl = require_tool("curl", "curl")
    patient = add_patient(gw)
    photo = tmp_path / "p.jpg"
    photo.write_bytes(fx["baseline_420.jpg"].read_bytes())
    token = auth_headers(gw)["Authorization"]
    with caplog.at_level(logging.WARNING):
        done = subprocess.run(
            [curl, "-sS", "--http2", "-H", f"Authorization: {token}", "-w", "\n%{http_code} %{http_version}",
             "-F", f"metadata={json.dumps({'patient': 'nhs|' + patient['nhs']})}", "-F", f"files=@{photo};type=image/jpeg",
             "-v", f"http://127.0.0.1:{port}/api/v1/photos"],
            capture_output=True, text=True, timeout=60)
    assert "Upgrade: h2c" in done.stderr  # curl asked to upgrade: the case this is for
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "201 1.1", (status, body[:500])
    assert len(json.loads(body)["photos"]) == 1
    assert asset_count(gw) == 1
    assert not [r for r in caplog.records if "upgrade" in r.getMessage().lower()]


def test_a_chunked_body_sent_after_an_upgrade_head_is_read_and_stored(gw, port, fx):
    """The body comes in later reads than the head, in chunks: the new parser keeps reading it."""
    patient = add_patient(gw)
    body = upload_body(patient, fx["baseline_420.jpg"].read_bytes(), "b")
    head = with_upgrade(upload_head(gw, port, 0, "b")).replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.2)
        for offset in range(0, len(body), 4096):
            piece = body[offset:offset + 4096]
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert asset_count(gw) == 1


def test_requests_after_upgrade_requests_on_one_connection_are_each_answered(gw, port):
    """A GET asking to upgrade, then a POST asking to upgrade whose bad body is refused, then a plain GET: three
    answers, in order, the connection kept."""
    auth = auth_headers(gw)["Authorization"].encode()
    bad_json = b"{not json"
    requests = (with_upgrade(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                + with_upgrade(b"POST /fhir/Consent HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
                               + b"\r\nContent-Type: application/fhir+json\r\nContent-Length: %d\r\n\r\n" % len(bad_json))
                + bad_json + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(requests)
        got = b""
        while len(answers(got)) < 3 or not got.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
    first, second, third = answers(got)
    assert first.startswith(b"HTTP/1.1 200 ") and third.startswith(b"HTTP/1.1 200 "), got
    # the body reached the FHIR door, which says what is wrong with it (with no body it would say there was none)
    assert second.startswith(b"HTTP/1.1 400 ") and b"OperationOutcome" in second, second
    assert b"json" in second.lower(), second


def test_a_bad_chunk_after_an_upgrade_head_is_answered_400(gw, port):
    add_patient(gw)
    head = with_upgrade(upload_head(gw, port, 0, "b")).replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"ZZZ\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Invalid HTTP request" in answer, answer  # the body's framing is bad: not an upload that had no file
    assert asset_count(gw) == 0


@pytest.mark.parametrize(("headers", "framing"), [
    ([(b"content-length", b"12")], b"content-length: 12\r\n"),
    ([(b"content-length", b"0")], b""),
    ([(b"host", b"x")], b""),
    ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], b"transfer-encoding: chunked\r\n"),
])
def test_body_framing_is_the_requests_own(headers, framing):
    assert body_framing(headers) == framing
