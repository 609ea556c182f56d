"""`clinphoto serve` as a real process: health, readiness, clean shutdown, bad settings."""

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_tool
from tests.net import free_ports

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gateway.cli"]


def gateway_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_") or k == "CLINPHOTO_TEST_POSTGRES_URL"}
    http, mllp, dicom = free_ports(3)
    env.update(
        CLINPHOTO_DATA_DIR=str(tmp_path / "var"), CLINPHOTO_HTTP_PORT=str(http),
        CLINPHOTO_MLLP_PORT=str(mllp), CLINPHOTO_DICOM_PORT=str(dicom),
    )
    env.update(extra)
    return env


def wait_healthy(base: str, proc, timeout=60.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("gateway did not answer /healthz in time")


def test_serve_health_ready_and_graceful_stop(tmp_path):
    env = gateway_env(tmp_path, CLINPHOTO_LOG_FORMAT="json")
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    try:
        assert wait_healthy(base, proc) < 20
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        # a request head of 1 MB is refused, not buffered however long it grows (gateway/http/bounded_head.py)
        port = int(env["CLINPHOTO_HTTP_PORT"])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 400")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # in pieces, slowly: refused all the same
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the answer comes before the head ends
                for _ in range(6):
                    time.sleep(0.05)
                    sock.sendall(b"X-Part: " + b"a" * 4000 + b"\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 400")
        # a head under the bound, a bearer token's size, is read; and a body sent with its head is not counted as head
        assert httpx.get(f"{base}/healthz", headers={"X-Token": "t" * 12000}).status_code == 200
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 262144\r\n\r\n" + b"b" * 262144)
            assert sock.recv(64).startswith(b"HTTP/1.1 405")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    stderr = proc.stderr.read().decode()
    log_lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(line["message"] == "stopped" for line in log_lines)
    assert all({"time", "level", "name", "message"} <= set(line) for line in log_lines)
    # uvicorn's start-up lines come without their ANSI-coloured copy (color_message)
    assert any(line["name"].startswith("uvicorn") for line in log_lines) and "\\u001b" not in stderr
    assert not any("color_message" in line for line in log_lines)
    # every door's app makes a token verifier; the dev-mode warning is said once
    assert sum(line["message"].startswith("auth mode dev") for line in log_lines) == 1, stderr


def test_when_http_answers_every_other_door_already_listens(tmp_path):
    # health checks and the tests poll HTTP: a gateway whose HTTP door opened before its MLLP door answered
    # /healthz while the PAS's connections were refused (CI saw it twice in one run under load)
    env = gateway_env(tmp_path)
    ports = {door: int(env[f"CLINPHOTO_{door}_PORT"]) for door in ("HTTP", "MLLP", "DICOM")}
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:  # no sleep: the first moment HTTP accepts is the moment that matters
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", ports["HTTP"]), timeout=5).close()
                break
            except ConnectionRefusedError:
                continue
        refused = []
        for door in ("MLLP", "DICOM"):
            try:
                socket.create_connection(("127.0.0.1", ports[door]), timeout=5).close()
            except ConnectionRefusedError:
                refused.append(door)
        assert refused == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_readyz_503_when_blob_store_unreachable(tmp_path):
    env = gateway_env(tmp_path)
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    try:
        wait_healthy(base, proc)
        blob_tmp = tmp_path / "var" / "blobs" / "tmp"
        blob_tmp.rename(tmp_path / "moved")
        blob_tmp.write_text("not a folder any more")
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and "blobs" in ready.json()["failing"]
        assert httpx.get(f"{base}/healthz").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("CLINPHOTO_DATABASE_URL", "nonsense", "invalid setting CLINPHOTO_DATABASE_URL"),
        ("CLINPHOTO_HTTP_PORT", "eighty", "invalid setting CLINPHOTO_HTTP_PORT"),
        ("CLINPHOTO_UID_ROOT", "1.2.abc", "invalid setting CLINPHOTO_UID_ROOT"),
        ("CLINPHOTO_CONFIG", "/nonexistent/clinphoto.yaml", "CLINPHOTO_CONFIG: no such file"),
    ],
)
def test_bad_setting_fails_at_once_with_one_line(tmp_path, name, value, expected):
    env = gateway_env(tmp_path, **{name: value})
    # "at once": it exits on its own instead of serving (the timeout is the hang guard; a wall-clock bound failed
    # on a loaded 2-core machine, where importing the app alone took 13 s)
    result = subprocess.run([*CLI, "serve"], env=env, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_yaml_config_file_and_env_precedence(tmp_path):
    from gateway.settings import load_settings

    cfg = tmp_path / "clinphoto.yaml"
    cfg.write_text("http_port: 9001\nae_title: FROMFILE\npolicy:\n  specialty_match: photo-only\n")
    os.environ["CLINPHOTO_CONFIG"] = str(cfg)
    os.environ["CLINPHOTO_AE_TITLE"] = "FROMENV"
    try:
        s = load_settings()
    finally:
        del os.environ["CLINPHOTO_CONFIG"], os.environ["CLINPHOTO_AE_TITLE"]
    assert (s.http_port, s.ae_title, s.policy.specialty_match) == (9001, "FROMENV", "photo-only")


def test_yaml_config_unknown_key_named(tmp_path):
    from gateway.settings import SettingsError, load_settings

    cfg = tmp_path / "clinphoto.yaml"
    cfg.write_text("htp_port: 9001\n")
    os.environ["CLINPHOTO_CONFIG"] = str(cfg)
    try:
        with pytest.raises(SettingsError, match=r"invalid setting htp_port \(in .*clinphoto.yaml\)"):
            load_settings()
    finally:
        del os.environ["CLINPHOTO_CONFIG"]


def test_nested_env_value_not_json_named(monkeypatch):
    from gateway.settings import SettingsError, load_settings

    monkeypatch.setenv("CLINPHOTO_HL7__ALLOWED_SOURCES", "10.0.0.0/8")
    with pytest.raises(SettingsError, match="CLINPHOTO_HL7__ALLOWED_SOURCES: not valid JSON"):
        load_settings()


def test_http_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = gateway_env(tmp_path, CLINPHOTO_HTTP_PORT=str(taken.getsockname()[1]))
        result = subprocess.run([*CLI, "serve"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "clinphoto: cannot start http: cannot listen on 127.0.0.1" in result.stderr


def test_make_run_answers_healthz_within_20s_and_says_how_to_try_it(tmp_path):
    """The README's first command: demo data, then the gateway, healthy within 20 s, ending its start-up output
    with the demo patients and lines to paste, which work as printed."""
    import re
    import shlex
    import threading

    env = gateway_env(tmp_path)
    proc = subprocess.Popen(["make", "--no-print-directory", "run"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(line.decode() for line in proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    try:
        start = time.monotonic()
        while time.monotonic() - start < 20:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("make run did not answer /healthz within 20 s")
        while time.monotonic() - start < 30 and not any("echoscu" in line for line in output):
            time.sleep(0.1)
        text = "".join(output)
        assert "demo data: 5 patients" in text and "9990000018   D100001   Okafor, Grace" in text
        token = re.search(r"TOKEN=(\S+)", text).group(1)
        curl = next(line for line in output if line.strip().startswith("curl "))
        url = shlex.split(curl)[-1]
        answer = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()["total"] >= 1
        echo = next(line for line in output if line.strip().startswith("echoscu "))
        echoscu = require_tool("echoscu", "dcmtk")
        assert subprocess.run([echoscu, *shlex.split(echo)[1:]], capture_output=True, timeout=30).returncode == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_sigterm_lets_an_upload_in_flight_finish(tmp_path):
    """Graceful shutdown: a photo being uploaded when SIGTERM arrives is stored and acknowledged, then the process exits 0."""
    import io
    import threading

    from PIL import Image

    env = gateway_env(tmp_path)
    subprocess.run([*CLI, "demo"], env=env, cwd=REPO, check=True, capture_output=True)
    token = subprocess.run([*CLI, "token", "--sub", "mi.one", "--role", "medical-illustration"], env=env, cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    wait_healthy(base, proc)
    jpeg = io.BytesIO()
    Image.effect_mandelbrot((1200, 900), (-2, -1.5, 1, 1.5), 60).convert("RGB").save(jpeg, "JPEG", quality=90)
    boundary = "clinphotoboundary"
    metadata = json.dumps({"patient": "https://fhir.nhs.uk/Id/nhs-number|9990000026", "specialty": "160",
                           "consent": {"level": "record", "givenBy": "patient", "capturedBy": "mi.one", "date": "2026-11-26"}})
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{metadata}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"slow.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    half = len(body) // 2
    sent_half = threading.Event()

    def slow_body():
        yield body[:half]
        sent_half.set()
        time.sleep(1.0)  # SIGTERM lands here, mid-request
        yield body[half:]

    result = {}

    def upload():
        result["response"] = httpx.post(f"{base}/api/v1/photos", content=slow_body(), timeout=30, headers={
            "Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert sent_half.wait(10)
    proc.send_signal(signal.SIGTERM)
    uploader.join(30)
    assert proc.wait(timeout=30) == 0
    assert result["response"].status_code == 201, result["response"].text
    # what was acknowledged is there after the restart, and the store is consistent
    check = subprocess.run([*CLI, "store", "check"], env=env, cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    audit_ok = subprocess.run([*CLI, "audit", "verify"], env=env, cwd=REPO, capture_output=True, text=True)
    assert audit_ok.returncode == 0, audit_ok.stdout


def test_stopping_ends_open_dicom_associations_instead_of_waiting_for_their_timeouts(tmp_path):
    """An idle association and a connection that never asked for one do not hold a stopping gateway: each is ended
    (the association with an A-ABORT its peer sees) and the process exits, where it waited for their network (60 s)
    and ACSE (30 s) timeouts before."""
    from pynetdicom import AE, evt

    env = gateway_env(tmp_path)
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    aborted = []
    try:
        wait_healthy(base, proc)
        ae = AE(ae_title="DEMOPACS")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", int(env["CLINPHOTO_DICOM_PORT"]), ae_title="CLINPHOTO",
                             evt_handlers=[(evt.EVT_ABORTED, lambda event: aborted.append(True))])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        silent = socket.create_connection(("127.0.0.1", int(env["CLINPHOTO_DICOM_PORT"])))
        time.sleep(0.5)  # both accepted: the silent one waits for its A-ASSOCIATE-RQ
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=25) == 0
        assert time.monotonic() - started < 20
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted and aborted
        silent.settimeout(5)
        try:
            answer = silent.recv(100)
        except ConnectionResetError:
            answer = b""
        silent.close()
        assert answer == b"" or answer[:1] == b"\x07"  # closed by the gateway: end of file, or an A-ABORT PDU
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_dicom_listener_binds_its_own_address(tmp_path):
    """CLINPHOTO_DICOM_HOST: DICOM peers on other hosts need the listener on another address than the HTTP API's
    (it followed CLINPHOTO_HTTP_HOST, with no setting of its own: opening DICOM opened the API too)."""
    from pynetdicom import AE

    env = gateway_env(tmp_path, CLINPHOTO_DICOM_HOST="127.0.0.2")
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    port = int(env["CLINPHOTO_DICOM_PORT"])
    try:
        wait_healthy(base, proc)
        ae = AE(ae_title="DEMOPACS")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.2", port, ae_title="CLINPHOTO")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def ask_in_background(url: str) -> tuple[threading.Thread, dict[str, object]]:
    """GET `url` in a thread; the dict gets its status (or the error) once answered."""
    answer: dict[str, object] = {}

    def ask() -> None:
        try:
            answer["status"] = httpx.get(url, timeout=60).status_code
        except httpx.HTTPError as exc:
            answer["status"] = repr(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    return asking, answer


def stop_cleanly(proc, idle: list[socket.socket]) -> str:
    """Close the idle connections, stop the gateway; its output, once it has exited 0 without a traceback."""
    for sock in idle:
        sock.close()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def test_out_of_descriptors_http_connections_wait_and_one_line_says_why(tmp_path):
    """Idle connections take every descriptor the gateway has left (its limit lowered while it runs, below what its
    connection cap was fitted to): the HTTP door pauses accepting and logs it once, and a request made meanwhile
    waits in the backlog and is answered once descriptors come free (libuv's own accept closed such connections
    unanswered, and logged nothing: gateway/http/acceptor.py)."""
    env = gateway_env(tmp_path, CLINPHOTO_LISTENERS='["http"]')
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    port = int(env["CLINPHOTO_HTTP_PORT"])
    idle: list[socket.socket] = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        in_use = len(os.listdir(f"/proc/{proc.pid}/fd"))
        _soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (in_use + 20, hard))
        for _ in range(60):  # more than the gateway can now hold open: the rest wait in the listen backlog
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        deadline = time.monotonic() + 30
        while len(os.listdir(f"/proc/{proc.pid}/fd")) < in_use + 18:  # the door has taken all it can
            assert time.monotonic() < deadline, len(os.listdir(f"/proc/{proc.pid}/fd"))
            time.sleep(0.1)
        asking, answer = ask_in_background(f"http://127.0.0.1:{port}/healthz")
        time.sleep(2)
        assert "status" not in answer, answer  # neither answered nor closed: waiting its turn
        for sock in idle:
            sock.close()
        asking.join(60)
        assert answer.get("status") == 200, answer
    finally:
        out = stop_cleanly(proc, idle)
    assert "clinphoto ready: http (event loop: uvloop)" in out  # the loop whose accept this door replaces
    paused = [line for line in out.splitlines() if "HTTP cannot accept connections (Too many open files); pausing 1 s" in line]
    assert 1 <= len(paused) <= 3, out[-3000:]  # rate-limited: one line per 10 s


def test_at_its_connection_cap_the_http_door_lets_new_connections_wait_until_idle_ones_time_out(tmp_path):
    """30 connections that send nothing against a cap of 20: the door holds 20, stops accepting and says so once;
    a request made meanwhile waits in the backlog, and is answered when the read timeout (2 s) has closed the idle
    ones, without their client doing anything."""
    env = gateway_env(tmp_path, CLINPHOTO_LISTENERS='["http"]', CLINPHOTO_HTTP_MAX_CONNECTIONS="20",
                      CLINPHOTO_HTTP_READ_TIMEOUT="2")
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    port = int(env["CLINPHOTO_HTTP_PORT"])
    idle: list[socket.socket] = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        time.sleep(0.5)  # wait_healthy's own connection closed
        for _ in range(30):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        start = time.monotonic()
        asking, answer = ask_in_background(f"http://127.0.0.1:{port}/healthz")
        asking.join(30)
        waited = time.monotonic() - start
        assert answer.get("status") == 200, answer
        assert 1.0 < waited < 15, waited  # it waited for the idle ones' timeout, then was served
        for sock in idle:  # every idle connection was closed by the gateway, none answered
            assert sock.recv(100) == b""
    finally:
        out = stop_cleanly(proc, idle)
    assert "HTTP listening on" in out and "(at most 20 connections)" in out, out[-3000:]
    full = [line for line in out.splitlines() if "HTTP connection limit reached (20 open, setting http_max_connections)" in line]
    assert 1 <= len(full) <= 2, out[-3000:]  # rate-limited: one line per 10 s
