"""Hostile or broken peers of the DICOM listener over TLS, both backends: a peer that stops part-way loses its
association within the idle timeout as it does over plain DICOM (tests/test_dicom_stalled_peers.py), though the
kernel's read and write timeouts (gateway/dicom/sockets.py) do not end a call on a TLS socket."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.core.policy.settings import DicomPeer
from store.models import OutboxItem
from tests.net import free_port
from tests.test_dicom_association import RunningListener
from tests.test_dicom_stalled_peers import IDLE_TIMEOUT, PEER, STUDY, c_move_timed, store_noise_study, thaw_and_end, wait_for_no_association
from tests.tls_pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_stalling_gw(gw, pki):
    gw.settings.dicom_tls_cert, gw.settings.dicom_tls_key = pki.server.cert, pki.server.key
    gw.settings.dicom_idle_timeout = IDLE_TIMEOUT
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "find", "get"],
                                              sensitivities=["N", "R"])]
    return gw


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.client.cert, pki.client.key)
    return context


def tls_echo_works(pki: Pki, port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", tls_args=(client_context(pki), "127.0.0.1"))
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def frozen_tls(pki: Pki, mode: str, port: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, FROZEN_PEER_TLS=f"{pki.ca},{pki.client.cert},{pki.client.key}")
    peer = subprocess.Popen([sys.executable, str(PEER), mode, str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).parent.parent, env=env)
    assert peer.stdout is not None
    line = peer.stdout.readline()
    assert line.strip() == b"frozen", (line, peer.stderr.read() if peer.poll() is not None else b"")
    return peer


def test_a_tls_connection_silent_inside_its_association_request_is_closed_at_the_idle_timeout(tls_stalling_gw, pki):
    with RunningListener(tls_stalling_gw) as port:
        with client_context(pki).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=40),
                                              server_hostname="127.0.0.1") as sock:
            sock.sendall(bytes([0x01, 0]) + (200).to_bytes(4, "big") + b"\0" * 14)  # 20 of an A-ASSOCIATE-RQ's 206
            start = time.monotonic()
            try:
                assert sock.recv(100) == b""
            except (ConnectionResetError, ssl.SSLError):
                pass
            assert time.monotonic() - start < IDLE_TIMEOUT * 2 + 3
        assert tls_echo_works(pki, port)


def test_a_tls_peer_frozen_inside_a_pdu_loses_its_association(tls_stalling_gw, pki):
    running = RunningListener(tls_stalling_gw)
    with running as port:
        peer = frozen_tls(pki, "half-pdu", port)
        try:
            waited = wait_for_no_association(running.listener, IDLE_TIMEOUT * 2 + 5)
            assert tls_echo_works(pki, port)
        finally:
            thaw_and_end(peer)
    assert waited < IDLE_TIMEOUT * 2 + 5


def test_a_tls_c_get_peer_that_stops_reading_loses_its_association_and_the_gateway_stops_promptly(tls_stalling_gw, pki, tmp_path):
    store_noise_study(tls_stalling_gw, tmp_path)
    running = RunningListener(tls_stalling_gw)
    with running as port:
        peer = frozen_tls(pki, "c-get", port, STUDY)
        try:
            waited = wait_for_no_association(running.listener, IDLE_TIMEOUT * 3 + 10)
            assert tls_echo_works(pki, port)
            stopping = time.monotonic()
        finally:
            thaw_and_end(peer)
    assert time.monotonic() - stopping < 10
    assert waited < IDLE_TIMEOUT * 3 + 10


def test_a_c_move_to_a_tls_destination_that_stops_reading_ends_with_its_failures_counted(tls_stalling_gw, pki, tmp_path):

    store_noise_study(tls_stalling_gw, tmp_path)
    destination_port = free_port()
    tls_stalling_gw.settings.auth.dicom_peers = [
        DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "move"], sensitivities=["N", "R"]),
        DicomPeer(ae_title="DEST", hosts=["127.0.0.1"], port=destination_port, allow=["echo"], sensitivities=["N", "R"],
                  tls=True, tls_ca=pki.ca)]
    env = dict(os.environ, FROZEN_PEER_TLS=f"{pki.ca},{pki.client.cert},{pki.client.key}")
    destination = subprocess.Popen([sys.executable, str(PEER), "store-scp", str(destination_port)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent, env=env)
    try:
        assert destination.stdout is not None and destination.stdout.readline().strip() == b"listening"
        running = RunningListener(tls_stalling_gw)
        with running as port:
            answers, took = c_move_timed(running, port, tls_args=(client_context(pki), "127.0.0.1"))
    finally:
        thaw_and_end(destination)
    final = answers[-1]
    assert final.Status in (0xA702, 0xB000), hex(final.Status)
    assert final.NumberOfFailedSuboperations == 2 and final.NumberOfCompletedSuboperations == 0, final
    assert took < IDLE_TIMEOUT * 3 + 10, took


def test_a_routing_destination_that_never_finishes_its_handshake_does_not_hold_the_router(gw, pki, fx, tmp_path):
    import threading

    from gateway.core.ingest.pipeline import ingest
    from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source, governance
    from gateway.core.routing import Route
    from gateway.dicom.router import Router
    from tests import dicom_objects as objects
    from tests.ingest_helpers import add_patient

    with socket.create_server(("127.0.0.1", 0)) as hanging:  # accepts (the kernel does), never answers a ClientHello
        port = hanging.getsockname()[1]
        gw.settings.auth.dicom_peers = [DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], port=port, allow=["echo"], tls=True, tls_ca=pki.ca)]
        gw.settings.routing.routes = [Route(destination="PACS1")]
        add_patient(gw)
        photo = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
        ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(photo)],
                                  governance=governance(specialty="330")))
        router = Router(gw, network_timeout=IDLE_TIMEOUT)
        done = threading.Event()
        thread = threading.Thread(target=lambda: (router.round(), done.set()), daemon=True)
        start = time.monotonic()
        thread.start()
        assert done.wait(IDLE_TIMEOUT * 3 + 10), "the router is still in the destination's handshake"
    assert time.monotonic() - start < IDLE_TIMEOUT * 3 + 10
    with gw.db.read() as s:
        [(status, error)] = s.execute(select(OutboxItem.status, OutboxItem.last_error)).all()
    assert status == "pending" and "over TLS" in error  # tried again later


def test_a_c_move_destination_that_never_finishes_its_handshake_fails_the_move_within_the_idle_timeout(tls_stalling_gw, pki, tmp_path):

    store_noise_study(tls_stalling_gw, tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as hanging:
        tls_stalling_gw.settings.auth.dicom_peers = [
            DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "move"], sensitivities=["N", "R"]),
            DicomPeer(ae_title="DEST", hosts=["127.0.0.1"], port=hanging.getsockname()[1], allow=["echo"], tls=True, tls_ca=pki.ca)]
        running = RunningListener(tls_stalling_gw)
        with running as port:
            answers, took = c_move_timed(running, port, tls_args=(client_context(pki), "127.0.0.1"), dimse_timeout=60)
    assert answers and answers[-1].Status != 0x0000
    assert took < IDLE_TIMEOUT * 3 + 10, took


def test_the_gateway_stops_promptly_with_connections_in_their_handshake(tls_stalling_gw, pki):
    """The listener's stop joins every connection's thread: those still in their handshake held it for
    HANDSHAKE_TIMEOUT (30 s)."""
    running = RunningListener(tls_stalling_gw)
    with running as port:
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        hello = socket.create_connection(("127.0.0.1", port), timeout=10)
        hello.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]))  # a ClientHello's first bytes, the rest never sent
        time.sleep(0.3)  # each accepted, its handshake under way
        start = time.monotonic()
    assert time.monotonic() - start < 5
    for sock in [*silent, hello]:
        with sock:
            assert sock.recv(100) == b""  # closed by the gateway
