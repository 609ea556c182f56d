"""A DICOM peer that stops part-way loses its association; it does not keep a thread and a place under
dicom_max_associations for as long as it keeps the connection open (gateway/dicom/sockets.py). Real sockets, both
backends; the peers are pynetdicom in a process that freezes itself (SIGSTOP), so nothing it was sent is read."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from gateway.core.policy.settings import DicomPeer
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient
from tests.test_dicom_association import RunningListener

IDLE_TIMEOUT = 1.0
PEER = Path(__file__).with_name("frozen_peer.py")
STUDY = "1.2.826.0.1.77.1"


@pytest.fixture
def stalling_gw(gw):
    gw.settings.dicom_idle_timeout = IDLE_TIMEOUT
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "get"], sensitivities=["N", "R"])]
    return gw


def wait_for_no_association(listener, within: float) -> float:
    """Seconds until the listener holds no association; fails after `within`."""
    start = time.monotonic()
    while listener._server.active_associations:
        assert time.monotonic() - start < within, f"{len(listener._server.active_associations)} association(s) still held"
        time.sleep(0.05)
    return time.monotonic() - start


def echo_works(port: int) -> bool:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def frozen(mode: str, port: int, *args: str) -> subprocess.Popen:
    """The peer, once it has frozen itself."""
    peer = subprocess.Popen([sys.executable, str(PEER), mode, str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).parent.parent)
    assert peer.stdout is not None
    line = peer.stdout.readline()
    assert line.strip() == b"frozen", (line, peer.stderr.read() if peer.poll() is not None else b"")
    return peer


def thaw_and_end(peer: subprocess.Popen) -> None:
    peer.send_signal(signal.SIGKILL)
    peer.wait(10)


def test_a_connection_silent_inside_its_association_request_is_closed_at_the_idle_timeout(stalling_gw):
    with RunningListener(stalling_gw) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(bytes([0x01, 0]) + (200).to_bytes(4, "big") + b"\0" * 14)  # 20 of an A-ASSOCIATE-RQ's 206
            start = time.monotonic()
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - start < IDLE_TIMEOUT * 2 + 3  # where it was held until the peer let go
        assert echo_works(port)


def test_a_peer_frozen_inside_a_pdu_loses_its_association(stalling_gw):
    running = RunningListener(stalling_gw)
    with running as port:
        peer = frozen("half-pdu", port)
        try:
            waited = wait_for_no_association(running.listener, IDLE_TIMEOUT * 2 + 5)
            assert echo_works(port)
        finally:
            thaw_and_end(peer)
    assert waited < IDLE_TIMEOUT * 2 + 5


def noise_photo(path: Path, seed: int) -> Path:
    """A 12-MP JPEG of noise, ~15 MB: one object outruns what the sockets' buffers hold (the gateway's send buffer
    grows to 4 MiB, the peer's receive buffer is 64 KiB), so the gateway's send blocks rather than its wait for the
    C-STORE response (which the DIMSE timeout bounds)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)
    return path


def test_a_c_get_peer_that_stops_reading_loses_its_association_and_the_gateway_stops_promptly(stalling_gw, tmp_path):
    add_patient(stalling_gw)
    for n in range(2):
        path = objects.img2dcm(noise_photo(tmp_path / f"noise{n}.jpg", n), tmp_path / f"noise{n}.dcm",
                               PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS", StudyInstanceUID=STUDY,
                               SeriesInstanceUID=f"{STUDY}.1", SOPInstanceUID=f"{STUDY}.1.{n}")
        ingest(stalling_gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(path)]))
    running = RunningListener(stalling_gw)
    with running as port:
        peer = frozen("c-get", port, STUDY)
        try:
            # the gateway's send makes no progress for the idle timeout: its association ends, its place is free
            waited = wait_for_no_association(running.listener, IDLE_TIMEOUT * 3 + 10)
            assert echo_works(port)
            stopping = time.monotonic()
        finally:
            thaw_and_end(peer)
    assert time.monotonic() - stopping < 10
    assert waited < IDLE_TIMEOUT * 3 + 10
