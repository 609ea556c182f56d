"""Routing through the durable outbox: a new photo the rules match is queued in the transaction that stores it, sent
by C-STORE to a real dcmtk storescp as the destination may see it, tried again with backoff while the destination
is down, dead after the configured tries, retried by an operator; a claimed item is leased, so a second sender
(another process) does not take it."""

from __future__ import annotations

import io
import subprocess
import threading
import time
from datetime import datetime, timezone

import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import select, update

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
from tests.net import free_port, wait_listening
from tests.orthanc import Orthanc
from tests.test_dicom_association import RunningListener


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
        wait_listening(routed["port"], pacs)
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


def wait_for(gw, status: str, seconds: float = 30) -> OutboxItem:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        items = outbox(gw)
        if items and items[0].status == status:
            return items[0]
        time.sleep(0.05)
    raise AssertionError(f"outbox never reached {status!r}: {[(i.status, i.last_error) for i in outbox(gw)]}")


def test_a_committing_orthanc_confirms_by_storage_commitment(gw, fx, tmp_path):
    """Orthanc as a destination routed with storage commitment: the photo is delivered by C-STORE, then named in an
    N-ACTION; Orthanc opens an association to our listener with its N-EVENT-REPORT and the item is committed."""
    pacs_ports = {}
    gw.settings.routing.routes = [Route(destination="ORTHANC", storage_commitment=True)]
    gw.settings.routing.first_retry_seconds = 0.05
    add_patient(gw)
    pacs = Orthanc(tmp_path / "orthanc")
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="ORTHANC", hosts=["127.0.0.1"], port=pacs.dicom_port, allow=["echo"])]
    with RunningListener(gw) as port:
        pacs.modalities = {"clinphoto": {"AET": gw.settings.ae_title, "Host": "127.0.0.1", "Port": port}}
        pacs.start()
        try:
            sent_path = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER,
                                        IssuerOfPatientID="NHS")
            ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(sent_path)]))
            item = wait_for(gw, "committed")
            assert item.commitment_uid and item.delivered_at and item.committed_at and item.attempts == 1
            [stored] = pacs.instances()
            assert stored["SOPInstanceUID"] == pydicom.dcmread(sent_path).SOPInstanceUID
            pacs_ports["ok"] = True
        finally:
            pacs.stop()
    assert pacs_ports


class CommitmentScp:
    """A PACS (pynetdicom, an implementation independent of ours) that stores, and reports every commitment as
    failed (0x0112 No such object instance) on a new association to the requester, as PS3.4 J.3.3 allows."""

    def __init__(self, port: int, requester_port: int) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import StorageCommitmentPushModel, VLPhotographicImageStorage

        self.reported = 0
        self.requester_port = requester_port
        self.ae = AE(ae_title="PACS2")
        self.ae.add_supported_context(VLPhotographicImageStorage, ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"])
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self.ae.add_requested_context(StorageCommitmentPushModel)
        handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_N_ACTION, self._on_action)]
        self.server = self.ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _on_action(self, event):
        info = event.action_information
        threading.Thread(target=self._report, args=(info,), daemon=True).start()
        return 0x0000, None

    def _report(self, info) -> None:
        from pynetdicom import build_role
        from pynetdicom.sop_class import StorageCommitmentPushModel

        time.sleep(0.2)  # after the requester released the association the report comes on a new one
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        failed = []
        for ref in info.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            item.FailureReason = 0x0112
            failed.append(item)
        report.FailedSOPSequence = failed
        assoc = self.ae.associate("127.0.0.1", self.requester_port, ae_title="CLINPHOTO",
                                  ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(report, 2, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        self.reported = int(status.Status)
        assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


def test_a_failed_commitment_sends_again_and_a_silent_destination_times_out(gw, fx, tmp_path):
    pacs_port = free_port()
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="PACS2", hosts=["127.0.0.1"], port=pacs_port, allow=["echo"]),
                                    DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], port=free_port(), allow=["echo"])]
    gw.settings.routing.routes = [Route(destination="PACS2", storage_commitment=True)]
    gw.settings.routing.first_retry_seconds = 30  # the test drives the retries
    add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    with RunningListener(gw) as port:
        pacs = CommitmentScp(pacs_port, port)
        try:
            # stored once the destination listens: a first try before it would wait out first_retry_seconds
            ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(sent)]))
            # the listener's router delivers, asks, and the destination reports failure: sent again, the try counted
            item = wait_for(gw, "pending", 10) if outbox(gw)[0].status != "pending" else outbox(gw)[0]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not (outbox(gw)[0].last_error or "").startswith("PACS2 did not commit"):
                time.sleep(0.05)
            item = outbox(gw)[0]
            assert item.status == "pending" and item.attempts == 1 and pacs.reported == 0x0000
            assert "failure reason 0x0112" in item.last_error and item.commitment_uid is None
        finally:
            pacs.stop()

    # a destination that never reports (dcmtk's storescp has no Storage Commitment): delivered, then sent again
    gw.settings.routing.routes = [Route(destination="PACS1", storage_commitment=True)]
    gw.settings.routing.commitment_timeout_seconds = 0.3
    with gw.db.write() as s:
        s.execute(update(OutboxItem).values(destination="PACS1", next_attempt_at=datetime.now(timezone.utc)))
    out = tmp_path / "pacs1"
    out.mkdir()
    pacs1 = subprocess.Popen([require_tool("storescp", "dcmtk"), "+xy", "+uf", "-aet", "PACS1", "-od", str(out),
                              str(gw.settings.auth.dicom_peers[1].port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(gw.settings.auth.dicom_peers[1].port, pacs1)
        assert Router(gw).round()
        item = outbox(gw)[0]
        assert item.status == "delivered" and item.commitment_uid and "refused the Storage Commitment request" in item.last_error
        time.sleep(0.4)
        assert Router(gw).round()  # the commitment timed out: sent (and asked) again
        item = outbox(gw)[0]
        assert item.status == "delivered" and item.attempts == 3 and len(list(out.iterdir())) == 2
    finally:
        pacs1.terminate()
        pacs1.wait(10)


def test_a_destination_taking_only_uncompressed_pixels_gets_the_photo_decoded(gw, routed, tmp_path):
    out = tmp_path / "pacs"
    out.mkdir()
    pacs = subprocess.Popen([require_tool("storescp", "dcmtk"), "-aet", "PACS1", "-od", str(out), str(routed["port"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # no +xy: uncompressed syntaxes only
    try:
        wait_listening(routed["port"], pacs)
        assert Router(gw).round()
    finally:
        pacs.terminate()
        pacs.wait(10)
    assert outbox(gw)[0].status == "delivered"
    [received] = list(out.iterdir())
    ds = pydicom.dcmread(received)
    assert ds.SOPInstanceUID == routed["sent"].SOPInstanceUID and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.pixel_array.shape == routed["sent"].pixel_array.shape


PHOTOS = 32


def test_kill_9_of_the_gateway_mid_delivery_loses_nothing_and_stores_nothing_twice(gw, tmp_path):
    """`clinphoto serve` routing 32 large photos to a real Orthanc is killed with SIGKILL while they are on their way;
    started again, it sends what was left once the dead process's leases end: every photo arrives, each SOP Instance
    stored once at Orthanc, every outbox item delivered. (A photo whose C-STORE succeeded just before the kill, its
    outcome not yet committed, is sent again: at-least-once on the wire, once in the archive, as DIMSE allows.)"""
    import json
    import os
    import signal

    import numpy as np
    from PIL import Image

    from tests.test_serve import CLI, REPO, gateway_env

    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        gw.settings.routing.routes = [Route(destination="ORTHANC")]
        add_patient(gw)
        rng = np.random.default_rng(7)
        sent = []
        # noise does not compress: ~3 MB each, so delivery takes long enough to be cut (16 all arrived once between
        # two looks at Orthanc on a busy CI machine)
        for i in range(PHOTOS):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            path = objects.jpeg_wrapped(tmp_path / f"big{i}.dcm", buf.getvalue(), 1600, 1200)
            ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(path)]))
            sent.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert len(outbox(gw)) == PHOTOS
        config = tmp_path / "clinphoto.yaml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "auth": {"dicom_peers": [{"ae_title": "ORTHANC", "hosts": ["127.0.0.1"], "port": pacs.dicom_port, "allow": ["echo"]}]},
            "routing": {"routes": [{"destination": "ORTHANC"}], "lease_seconds": 2, "first_retry_seconds": 0.1},
        }))
        env = gateway_env(tmp_path, CLINPHOTO_CONFIG=str(config), CLINPHOTO_DATA_DIR=str(tmp_path),
                          CLINPHOTO_DATABASE_URL=gw.settings.database_url, CLINPHOTO_BLOB_DIR=str(tmp_path / "blobs"))

        def serve() -> subprocess.Popen:
            return subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        first = serve()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pacs.instance_ids()) < 1:
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        cut = len(pacs.instance_ids())
        assert 1 <= cut < PHOTOS, f"the kill came too late to be mid-delivery ({cut} of {PHOTOS} arrived)"
        assert {i.status for i in outbox(gw)} >= {"pending"}  # what was left waits in the outbox

        second = serve()
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and any(i.status != "delivered" for i in outbox(gw)):
                assert second.poll() is None, second.stderr.read().decode()[-2000:]
                time.sleep(0.1)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, second.stderr.read().decode()[-2000:]
        assert [i.status for i in outbox(gw)] == ["delivered"] * PHOTOS
        stored = pacs.instances()
        assert sorted(s["SOPInstanceUID"] for s in stored) == sorted(sent)  # all of them, each once
    finally:
        pacs.stop()
