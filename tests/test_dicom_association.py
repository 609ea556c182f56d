"""DICOM peers are identities: unknown AE titles and known ones from the wrong host are rejected at association."""

import asyncio
import subprocess
import threading

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from gateway.core.policy.settings import DicomPeer
from gateway.dicom.listener import DicomListener
from gateway.serve import new_event_loop
from store.models import AuditEvent
from tests.conftest import require_tool


class RunningListener:
    """The listener on a real socket, in its own event loop thread, as `clinphoto serve` runs it."""

    def __init__(self, gw):
        self.listener = DicomListener(gw, "127.0.0.1", 0)
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.listener.start(), self.loop).result(10)
        return self.listener.port

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.listener.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def peers_gw(gw):
    gw.settings.auth.dicom_peers = [
        DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], name="Main PACS"),
        DicomPeer(ae_title="FARAWAY", hosts=["192.0.2.10"]),
        DicomPeer(ae_title="NOECHO", hosts=["127.0.0.0/8"], allow=["find"]),
    ]
    return gw


def echoscu(port, calling, called="CLINPHOTO"):
    tool = require_tool("echoscu", "dcmtk")
    return subprocess.run([tool, "-aet", calling, "-aec", called, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)


def refusals(gw):
    with gw.db.read() as s:
        return s.execute(select(AuditEvent.agent_who, AuditEvent.outcome_desc).where(
            AuditEvent.subtype == "association-rejected").order_by(AuditEvent.seq)).all()


def test_dcmtk_echoscu_known_peer_accepted_others_rejected(peers_gw):
    with RunningListener(peers_gw) as port:
        ok = echoscu(port, "PACS1")
        assert ok.returncode == 0, ok.stderr
        unknown = echoscu(port, "STRANGER")
        assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr
        wrong_host = echoscu(port, "FARAWAY")
        assert wrong_host.returncode != 0 and "Calling AE Title Not Recognized" in wrong_host.stderr
        wrong_called = echoscu(port, "PACS1", called="NOTUS")
        assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    rows = refusals(peers_gw)
    assert [who for who, _ in rows] == ["STRANGER", "FARAWAY", "PACS1"]
    assert "192.0.2.10" not in rows[1][1] and "127.0.0.1" in rows[1][1]


def test_pynetdicom_client_echo_and_service_not_allowed(peers_gw):
    with RunningListener(peers_gw) as port:
        client = AE(ae_title="PACS1")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()

        limited = AE(ae_title="NOECHO")
        limited.add_requested_context(Verification)
        assoc = limited.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0124  # Refused: Not Authorized
        assoc.release()

        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assoc = stranger.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert assoc.is_rejected and not assoc.is_established


def test_a_connection_closed_before_any_association_request_ends_at_once(peers_gw):
    """A load balancer's or a monitor's TCP probe (connect, then close) leaves no association thread waiting out the
    ACSE timeout (30 s): one was left a probe, and a stopping gateway waited 15 s for it."""
    import socket
    import time

    running = RunningListener(peers_gw)
    with running as port:
        server = running.listener._server
        for _ in range(3):
            socket.create_connection(("127.0.0.1", port)).close()
        deadline = time.monotonic() + 3  # each probe's thread ended, where it waited 30 s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.active_associations
        client = AE(ae_title="PACS1")  # and the listener still serves a real peer
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        started = time.monotonic()
    assert time.monotonic() - started < 5  # the stop did not wait for anything


def test_associations_past_the_configured_maximum_are_rejected_as_transient(peers_gw):
    """dicom_max_associations: the one too many is told to try later (transient, local limit exceeded), as PS3.8
    has it, and a place freed is taken again."""
    import time

    peers_gw.settings.dicom_max_associations = 2
    running = RunningListener(peers_gw)
    with running as port:
        client = AE(ae_title="PACS1")
        client.add_requested_context(Verification)
        held = [client.associate("127.0.0.1", port, ae_title="CLINPHOTO") for _ in range(2)]
        assert all(a.is_established for a in held)
        refused = client.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert refused.is_rejected
        rejection = refused.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
        held[0].release()
        deadline = time.monotonic() + 5  # its thread ends just after the release is answered
        while len(running.listener._server.active_associations) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        again = client.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert again.is_established and again.send_c_echo().Status == 0x0000
        for assoc in (again, held[1]):
            assoc.release()


def test_an_association_idle_past_the_idle_timeout_is_aborted(peers_gw):
    import time

    peers_gw.settings.dicom_idle_timeout = 0.5
    with RunningListener(peers_gw) as port:
        client = AE(ae_title="PACS1")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
