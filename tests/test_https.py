"""`clinphoto serve` with http_tls_cert: the HTTP door (REST, FHIR, DICOMweb, viewer, console) speaks HTTPS only,
its certificate checked by a client that trusts our CA; plain HTTP on the port gets no answer; a session cookie is
Secure; a certificate that cannot be loaded stops the start naming the setting, before any door opens."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import httpx
import pytest

from tests.test_serve import CLI, REPO, gateway_env
from tests.tls_pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def wait_https(base: str, proc: subprocess.Popen, ca: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            if httpx.get(f"{base}/healthz", verify=ca, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the gateway did not answer /healthz over HTTPS in time")


def test_the_http_door_speaks_https_only(tmp_path, pki):
    env = gateway_env(tmp_path, CLINPHOTO_HTTP_TLS_CERT=str(pki.server.cert), CLINPHOTO_HTTP_TLS_KEY=str(pki.server.key),
                      CLINPHOTO_LISTENERS='["http"]')
    subprocess.run([*CLI, "demo"], env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    token, operator = (subprocess.run([*CLI, "token", "--sub", sub, "--role", role], env=env, cwd=REPO, capture_output=True,
                                      text=True, check=True, timeout=120).stdout.strip()
                       for sub, role in (("mi.one", "medical-illustration"), ("ie.one", "integration-engineer")))
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = int(env["CLINPHOTO_HTTP_PORT"])
    base = f"https://127.0.0.1:{port}"
    try:
        wait_https(base, proc, str(pki.ca))
        with httpx.Client(base_url=base, verify=str(pki.ca), headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/fhir/metadata").json()["resourceType"] == "CapabilityStatement"
            studies = client.get("/dicomweb/studies", params={"PatientID": "9990000018"})
            assert studies.status_code == 200 and studies.json()
            # the console's session cookie is Secure over HTTPS (never sent back over plain HTTP)
            login = client.post("/console/session", headers={"Authorization": f"Bearer {operator}"})
            assert login.status_code == 200, login.text
            cookies = login.headers.get_list("set-cookie")
            assert cookies and all("secure" in c.lower() for c in cookies), (login.status_code, cookies)
        # a client that does not trust our CA refuses the certificate
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=5)
        # plain HTTP on the HTTPS port: the handshake fails, no answer is given, the door goes on
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200" not in plain.recv(4096)
        assert httpx.get(f"{base}/healthz", verify=str(pki.ca), timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_a_certificate_that_cannot_be_loaded_stops_the_start_naming_the_setting(tmp_path):
    env = gateway_env(tmp_path, CLINPHOTO_HTTP_TLS_CERT=str(tmp_path / "missing.pem"))
    result = subprocess.run([*CLI, "serve"], env=env, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode != 0
    assert f"http_tls_cert {tmp_path / 'missing.pem'}: No such file or directory" in result.stderr.strip().splitlines()[-1]
    assert "listening" not in result.stderr  # no door opened
