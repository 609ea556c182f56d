"""Logs at INFO and above carry no patient names or NHS numbers, whatever happens on the doors."""

import json
import signal
import socket
import subprocess
import time

import httpx
import pydicom

from gateway.hl7.mllp import MllpDecoder, frame
from tests.conftest import FIXTURES
from tests.test_serve import CLI, REPO, gateway_env, wait_healthy

NAME, GIVEN, NHS = "ZZPRIVATEFAMILY", "ZZPRIVATEGIVEN", "9990000042"
A01 = (FIXTURES / "hl7" / "adt_a01_admit.hl7").read_bytes().replace(b"SMITH", NAME.encode()).replace(
    b"JOHN", GIVEN.encode()).replace(b"9449305552", NHS.encode())
# same patient with a broken NHS number: an AE whose error text must not quote the number either
BAD = A01.replace(NHS.encode(), b"9990000043").replace(b"A01-0001", b"A01-0002")


def send(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(frame(message))
        decoder = MllpDecoder()
        while True:
            frames, _dropped, _truncated = decoder.feed(sock.recv(65536))
            if frames:
                return frames[0]


BOUNDARY = "clinphotoprivacy"
SPACED = f"{NHS[:3]} {NHS[3:]}"  # the NHS number as some senders space it: still the patient, and not a valid UI


def stow_body(tmp_path, fx) -> bytes:
    """One Part 10 object for the patient, its PatientID written with VR UI."""
    from tests import dicom_objects as objects

    path = objects.jpeg_wrapped(tmp_path / "ui.dcm", fx["baseline_420.jpg"].read_bytes(), 640, 480, patient_id=SPACED,
                                name=f"{NAME}^{GIVEN}")
    ds = pydicom.dcmread(path)
    ds["PatientID"].VR = "UI"
    ds.save_as(path, enforce_file_format=True)
    return (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{BOUNDARY}--\r\n".encode())


def wait_rendered(env: dict, timeout: float = 120) -> None:
    """Until no photo waits for its renditions (made after the answer, in worker processes)."""
    from gateway.core.context import Gateway
    from gateway.core.ingest.deferred import due
    from gateway.settings import Settings

    gw = Gateway.open(Settings(data_dir=env["CLINPHOTO_DATA_DIR"]), migrate=False, tidy=False)
    try:
        deadline = time.monotonic() + timeout
        while due(gw, limit=1):
            assert time.monotonic() < deadline, "renditions not made"
            time.sleep(0.1)
    finally:
        gw.close()


def test_no_patient_identity_in_logs(tmp_path, fx):
    env = gateway_env(tmp_path, CLINPHOTO_LOG_FORMAT="json", CLINPHOTO_LOG_LEVEL="INFO")
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    try:
        wait_healthy(base, proc)
        mllp = int(env["CLINPHOTO_MLLP_PORT"])
        assert b"MSA|AA" in send(mllp, A01)
        assert b"MSA|AE" in send(mllp, BAD)
        token = subprocess.run([*CLI, "token", "--sub", "dr.x", "--role", "clinician", "--specialty", "330"], env=env,
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/api/v1/photos", params={"patient": f"https://fhir.nhs.uk/Id/nhs-number|{NHS}"},
                         headers=headers).status_code == 200
        bad_upload = httpx.post(f"{base}/api/v1/photos", headers=headers, files={"files": ("a.jpg", b"<html>", "image/jpeg")},
                                data={"metadata": json.dumps({"patient": f"https://fhir.nhs.uk/Id/nhs-number|{NHS}"})})
        assert bad_upload.status_code in (403, 415, 422)
        # a STOW-RS object whose PatientID has VR UI (pydicom warns of the value, quoted) and matches the patient: the
        # renderer's worker processes read it again, and logged pydicom's warning to stderr as it was
        mi = subprocess.run([*CLI, "token", "--sub", "mi.x", "--role", "medical-illustration"], env=env, cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
        stowed = httpx.post(f"{base}/dicomweb/studies", content=stow_body(tmp_path, fx), timeout=60, headers={
            "Authorization": f"Bearer {mi}", "Accept": "application/dicom+json",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
        assert stowed.status_code == 200, stowed.text
        wait_rendered(env)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    logs = proc.stderr.read().decode()
    assert "HL7" in logs or "MLLP" in logs or "mllp" in logs  # the doors did log something
    for secret in (NAME, GIVEN, NHS, "9990000043", SPACED):
        assert secret not in logs, f"{secret} leaked into the logs"
