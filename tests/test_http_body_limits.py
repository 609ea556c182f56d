"""Request bodies are bounded at the edge (gateway/edge.py), on a real socket, both backends.

FastAPI reads a route's whole body into memory before its token check runs: without a bound, one request without a
token, its body sent chunked (no Content-Length to refuse it by), took the gateway's memory as far as the sender
went. Past its endpoint's limit a body is cut off as it arrives and answered 413 in the door's own form (FHIR:
OperationOutcome); the doors that stream a body to the spool (photo upload, STOW-RS) keep their own, larger, limits.
"""

from __future__ import annotations

import io
import json
import socket
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from gateway.edge import MAX_BODY, MAX_FHIR_BODY, body_limit
from gateway.fhir.ingest import MAX_BODY as FHIR_INGEST_MAX_BODY
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import NHS, add_patient
from tests.test_photos_api import api  # noqa: F401 (the live-server fixture)

MiB = 1024 * 1024


def chunked(total: int, head: bytes = b'{"resourceType": "Consent", "note": "'):
    """A JSON-looking body of `total` bytes, sent in 1 MiB chunks (httpx: chunked transfer coding, no length)."""
    yield head
    sent = len(head)
    while sent < total:
        piece = min(MiB, total - sent)
        yield b"a" * piece
        sent += piece


def head_sent(client, method: str, path: str, headers: dict[str, str], length: int) -> socket.socket:
    """A connection on which a request's head, declaring a body of `length` bytes, has been sent."""
    url = client.base_url
    head = f"{method} {path} HTTP/1.1\r\nHost: {url.host}\r\nContent-Length: {length}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock = socket.create_connection((url.host, url.port), timeout=10)
    sock.sendall(head.encode())
    return sock


def declared_only(client, method: str, path: str, headers: dict[str, str], length: int) -> tuple[int, bytes]:
    """A request whose head declares a body of `length` bytes, none of them sent: the status line and what follows."""
    with head_sent(client, method, path, headers, length) as sock:
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < 200:
            got = sock.recv(65536)
            if not got:
                break
            answer += got
    return int(answer.split(b" ", 2)[1]), answer


PUSH_MAX = 64 * MiB  # what a refused client may push before the server has closed: a few socket buffers, not this


def refused_then_pushed(client, method: str, path: str, headers: dict[str, str], length: int) -> tuple[int, bytes, int]:
    """A request declaring `length` body bytes: its answer read first (sent before any of the body), then the body
    pushed in 1 MiB writes until the server ends the connection. The status, the answer's head, the bytes pushed
    (PUSH_MAX when the server was still reading them all)."""
    with head_sent(client, method, path, headers, length) as sock:
        answer = b""
        while b"\r\n\r\n" not in answer:
            got = sock.recv(65536)
            assert got, f"{path}: closed without an answer"
            answer += got
        pushed, chunk = 0, b"x" * MiB
        try:
            while pushed < PUSH_MAX:
                sock.sendall(chunk)
                pushed += len(chunk)
        except OSError:  # reset or broken pipe: the server closed the connection
            pass
    return int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[0].lower(), pushed


def test_an_answer_sent_before_the_body_ends_the_connection_when_much_is_left(gw, api):  # noqa: F811
    """An unauthenticated POST /dicomweb/studies declaring 50 GB was answered 401, then sent ~35 GB in 8 s, every byte
    read on the event loop: the streamed doors (and every other) refuse early, and uvicorn read on. Now the answer
    says Connection: close and the server reads no more than its socket buffers hold."""
    from gateway.edge import DRAIN_MAX

    bearer = auth_headers(gw)
    many = 50 * 1024**3
    for method, path, headers, status in (
            ("POST", "/api/v1/photos", {"Content-Type": "multipart/form-data; boundary=b"}, 401),
            ("POST", "/api/v1/photos", {**bearer, "Content-Type": "text/plain"}, 415),
            ("POST", "/api/v1/photos", {**bearer, "Content-Type": "multipart/form-data; boundary=b"}, 413),
            ("POST", "/fhir/Media", {"Content-Type": "application/fhir+json"}, 413),
            ("POST", "/api/v1/consents", {"Content-Type": "application/json"}, 413),
            ("PUT", "/api/v1/photos", {"Content-Type": "application/json"}, 413)):
        got, head, pushed = refused_then_pushed(api, method, path, headers, many)
        assert pushed < PUSH_MAX, (path, pushed)
        assert got == status and b"connection: close" in head, (path, head)
    # a body of a declared length up to DRAIN_MAX is still read and thrown away, the connection kept, so that a
    # client that writes it all before reading gets the answer (see the http.client test below)
    got, head, pushed = refused_then_pushed(api, "POST", "/api/v1/photos", {"Content-Type": "multipart/form-data; boundary=b"},
                                            DRAIN_MAX)
    assert got == 401 and b"connection: close" not in head and pushed == PUSH_MAX


def test_a_chunked_body_without_a_token_is_cut_off_at_the_limit_and_takes_no_memory(gw, api):  # noqa: F811
    tracemalloc.start()
    try:
        r = api.post("/api/v1/consents", content=chunked(100 * MiB), headers={"Content-Type": "application/json"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 413
    assert r.json()["error"] == "too-large" and "1 MiB" in r.json()["message"]
    assert peak < 16 * MiB  # in this process: the gateway's server thread and the client's (1 MiB chunks)


@pytest.mark.parametrize("method, path, limit, fhir", [
    ("POST", "/api/v1/consents", MAX_BODY, False),
    ("POST", "/api/v1/viewer/launch", MAX_BODY, False),
    ("PUT", "/fhir/Consent/1", MAX_FHIR_BODY, True),
    ("POST", "/fhir/Consent", MAX_FHIR_BODY, True),
    ("POST", "/fhir/Media", FHIR_INGEST_MAX_BODY, True),
    ("POST", "/fhir", FHIR_INGEST_MAX_BODY, True),  # a transaction Bundle, posted to the base
])
def test_a_body_over_its_endpoints_limit_is_413_in_the_doors_form(gw, api, method, path, limit, fhir):  # noqa: F811
    headers = {**auth_headers(gw, role="medical-illustration", sub="mi.jones"),
               "Content-Type": "application/fhir+json" if fhir else "application/json"}
    r = api.request(method, path, content=chunked(limit + 1), headers=headers)  # chunked: cut off as it came
    assert r.status_code == 413, (path, r.text[:300])
    if fhir:
        issue = r.json()["issue"][0]
        assert r.json()["resourceType"] == "OperationOutcome" and issue["code"] == "too-long"
        assert f"{limit // MiB} MiB" in issue["diagnostics"]
    else:
        assert r.json()["error"] == "too-large" and f"{limit // MiB} MiB" in r.json()["message"]
    # a length declared over the limit: refused before a byte of the body is read
    status, answer = declared_only(api, method, path, headers, limit + 1)
    assert status == 413 and b"too-" in answer, answer[:300]
    # up to the limit is the endpoint's to judge: a body that is not JSON is its 400 or 422, not a 413
    at = api.request(method, path, content=chunked(limit, head=b"{"), headers=headers)
    assert at.status_code in (400, 422), (path, at.status_code, at.text[:300])


def test_streamed_doors_keep_their_own_limits(gw, api):  # noqa: F811
    """A photo upload well over the JSON limit is stored: the upload door streams it to the spool and bounds it."""
    assert body_limit("POST", "/api/v1/photos") is None and body_limit("POST", "/dicomweb/studies/1.2.3") is None
    patient = add_patient(gw)
    rng = np.random.default_rng(3)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8), "RGB").save(out, "JPEG", quality=95)
    assert len(out.getvalue()) > 2 * MAX_BODY
    meta = {"patient": f"{NHS}|{patient['nhs']}", "consent": {"level": "record", "givenBy": "patient"}}
    r = api.post("/api/v1/photos", files=[("files", ("big.jpg", out.getvalue(), "image/jpeg"))],
                 data={"metadata": json.dumps(meta)}, headers=auth_headers(gw, role="medical-illustration", sub="mi.jones"))
    assert r.status_code == 201, r.text


def test_an_upload_with_metadata_part_after_metadata_part_is_refused_at_the_second(gw, api):  # noqa: F811
    """The upload door keeps its metadata part in memory (64 KiB at most): a second one is refused as it begins,
    not counted once the body is over (a chunked body of 24,000 of them took the gateway to 1.8 GB)."""
    headers = {**auth_headers(gw, role="medical-illustration", sub="mi.jones"),
               "Content-Type": "multipart/form-data; boundary=b0undary"}
    part = b'--b0undary\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n' + b"{" + b" " * 60_000 + b"}\r\n"

    def body():
        for _ in range(2000):  # 120 MB
            yield part
        yield b"--b0undary--\r\n"

    tracemalloc.start()
    try:
        r = api.post("/api/v1/photos", content=body(), headers=headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 422 and "exactly one 'metadata' part" in r.json()["message"], r.text
    assert peak < 16 * MiB


@pytest.mark.parametrize("path", ["/fhir/Consent", "/fhir/Media", "/fhir"])
def test_fhir_json_that_costs_more_than_it_says_is_refused_without_a_failure_of_ours(gw, api, caplog, path):  # noqa: F811
    """Nested 200,000 deep, JSON raised RecursionError: a 500 and an ERROR line, as if the gateway had failed. And a
    few MB of empty arrays parse into some hundred MB of objects: refused before the parse."""
    import logging

    headers = {**auth_headers(gw, role="medical-illustration", sub="mi.jones"), "Content-Type": "application/fhir+json"}
    with caplog.at_level(logging.INFO):
        deep = api.post(path, content=b'{"resourceType": "Consent", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                        headers=headers)
        many = api.post(path, content=b'{"resourceType": "Consent", "x": [' + b"[]," * 150_000 + b"[]]}", headers=headers)
    assert deep.status_code == 413 and many.status_code == 413  # both are over MAX_CONTAINERS
    assert "over 100,000 objects and arrays" in many.json()["issue"][0]["diagnostics"]
    shallow_but_deep = api.post(path, content=b'{"resourceType": "Consent", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                                headers=headers)
    assert shallow_but_deep.status_code == 400, shallow_but_deep.text  # under the count, too deep to parse: not JSON here
    assert shallow_but_deep.json()["issue"][0]["diagnostics"] == "the body is not JSON"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_client_that_writes_its_whole_body_before_reading_gets_the_413(gw, api):  # noqa: F811
    """Python's http.client (so requests and urllib3) writes the whole body, then reads. With the connection ended at
    the 413 while the rest was still unread, it met a reset instead (found by review): a body of a declared length up
    to DRAIN_MAX is read on and thrown away, the connection kept. A chunked one, of no declared end, is not."""
    import http.client

    from gateway.edge import DRAIN_MAX

    url = api.base_url
    for size in (2 * MiB, 16 * MiB):
        for _ in range(3):
            conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
            try:
                conn.request("POST", "/api/v1/consents", body=b"{" + b" " * (size - 2) + b"}",
                             headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
                assert answer.status == 413 and answer.getheader("Connection") != "close"
                assert b"too-large" in answer.read()
            finally:
                conn.close()
    assert DRAIN_MAX >= 2 * FHIR_INGEST_MAX_BODY
    chunked_over = api.post("/api/v1/consents", content=chunked(2 * MiB), headers={"Content-Type": "application/json"})
    assert chunked_over.status_code == 413 and chunked_over.headers.get("connection") == "close"
    status, answer = declared_only(api, "POST", "/api/v1/consents", {"Content-Type": "application/json"}, DRAIN_MAX + 1)
    assert status == 413 and b"connection: close" in answer.lower()
