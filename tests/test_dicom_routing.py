"""Routing through the durable outbox: a new photo the rules match is queued in the transaction that stores it, sent
by C-STORE to a real dcmtk storescp as the destination may see it, tried again with backoff while the destination
is down, dead after the configured tries, retried by an operator; a claimed item is leased, so a second sender
(another process) does not take it."""

from __future__ import annotations

import io
import subprocess
import time

import pydicom
import pytest
from sqlalchemy import select

from gateway.core import routing
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source, governance
from gateway.core.policy.settings import DicomPeer
from gateway.core.routing import Route
from gateway.dicom.router import Router
from store.models import OutboxItem
from tests import dicom_objects as objects
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient
from tests.net import free_port
from tests.orthanc import Orthanc


@pytest.fixture
def routed(gw, fx, tmp_path):
    port = free_port()
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], port=port, allow=["echo"])]
    gw.settings.routing.routes = [Route(destination="PACS1", specialties=["330"])]
    gw.settings.routing.first_retry_seconds = 0.05
    add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    stored = ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(sent)],
                                       governance=governance(specialty="330")))
    other = objects.img2dcm(fx["baseline_444.jpg"], tmp_path / "other.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(other)],
                              governance=governance(specialty="160")))  # not routed: another specialty
    return {"port": port, "sent": pydicom.dcmread(sent), "asset_id": stored.photos[0].asset_id}


def outbox(gw) -> list[OutboxItem]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))
        s.expunge_all()
        return rows


def wait_due(gw) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(i.next_attempt_at.timestamp() <= time.time() for i in outbox(gw)):
        time.sleep(0.02)


def test_a_routed_photo_waits_out_an_outage_and_arrives_intact(gw, routed, tmp_path):
    [item] = outbox(gw)
    assert (item.asset_id, item.destination, item.status) == (routed["asset_id"], "PACS1", "pending")
    router = Router(gw)
    assert router.round() and outbox(gw)[0].attempts == 1  # the PACS is down: tried, kept, tried again later
    assert "no association" in outbox(gw)[0].last_error and outbox(gw)[0].status == "pending"
    out = tmp_path / "pacs"
    out.mkdir()
    pacs = subprocess.Popen([require_tool("storescp", "dcmtk"), "+xy", "-aet", "PACS1", "-od", str(out), str(routed["port"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        wait_due(gw)
        assert router.round()
    finally:
        pacs.terminate()
        pacs.wait(10)
    [item] = outbox(gw)
    assert (item.status, item.attempts) == ("delivered", 2) and item.delivered_at is not None
    [received] = list(out.iterdir())
    ds = pydicom.dcmread(received)
    assert ds.SOPInstanceUID == routed["sent"].SOPInstanceUID and ds.PixelData == routed["sent"].PixelData
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert not Router(gw).round()  # nothing left to send


def test_dead_after_the_tries_then_retried_and_leases_keep_senders_apart(gw, routed):
    gw.settings.routing.max_attempts = 2
    router = Router(gw)
    router.round()
    wait_due(gw)
    router.round()
    [item] = outbox(gw)
    assert (item.status, item.attempts) == ("dead", 2)
    assert routing.retry(gw, item.id) and outbox(gw)[0].status == "pending"
    # a claimed item is leased: a second sender (another gateway process) finds nothing due
    assert [c.id for c in routing.claim(gw, gw.settings.routing)] == [item.id]
    assert routing.claim(gw, gw.settings.routing) == []
    assert routing.cancel(gw, item.id) and outbox(gw)[0].status == "cancelled"


def test_routed_to_a_real_orthanc_through_an_outage_and_a_crash_mid_delivery(gw, fx, tmp_path):
    """Orthanc (Debian's package) as the PACS: down at first (delivery only delayed); then a sender 'killed' after
    claiming (its lease runs out, another sender delivers); the photo arrives once, intact (Orthanc's REST API)."""
    pacs = Orthanc(tmp_path / "orthanc")
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="ORTHANC", hosts=["127.0.0.1"], port=pacs.dicom_port, allow=["echo"])]
    gw.settings.routing.routes = [Route(destination="ORTHANC")]
    gw.settings.routing.first_retry_seconds = 0.05
    gw.settings.routing.lease_seconds = 0.2
    add_patient(gw)
    sent_path = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(sent_path)]))
    sent = pydicom.dcmread(sent_path)
    assert Router(gw).round() and outbox(gw)[0].status == "pending"  # the PACS is down
    pacs.start()
    try:
        wait_due(gw)
        # a sender that claims and is killed before sending: the item is leased, not lost
        assert routing.claim(gw, gw.settings.routing)
        time.sleep(0.3)  # the lease runs out
        assert Router(gw).round()
        [item] = outbox(gw)
        assert item.status == "delivered"
        [stored] = pacs.instances()
        assert stored["SOPInstanceUID"] == sent.SOPInstanceUID
        arrived = pydicom.dcmread(io.BytesIO(pacs.file(stored["_id"])))
        assert arrived.PixelData == sent.PixelData and arrived.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    finally:
        pacs.stop()
