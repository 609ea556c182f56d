"""C-GET and C-MOVE on real sockets, both backends: dcmtk's getscu receives a study on its association, movescu sends
one to a dcmtk storescp the test starts (a configured peer with a port); objects arrive as stored (JPEG Baseline,
Pixel Data byte for byte, today's patient module) and pass dciodvfy; what the peer may not see is never sent; the
access matrix runs through C-GET with peers of different identities."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET
from pynetdicom.sop_class import VLPhotographicImageStorage
from sqlalchemy import select

from gateway.core.policy.settings import DicomPeer
from store.models import Asset, AuditEvent, Patient
from tests import dicom_objects as objects
from tests.access_matrix import PEERS, build_access_matrix, dicom_peers
from tests.conftest import require_tool
from tests.ingest_helpers import dicom_tools_check
from tests.net import free_port, wait_listening
from tests.test_dicom_association import RunningListener
from tests.test_dicom_find import archive  # noqa: F401 (the fixture)


@pytest.fixture
def retrieving(gw, archive):  # noqa: F811
    gw.settings.auth.dicom_peers[0] = DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "find", "get", "move"],
                                                sensitivities=["N", "R"])
    return archive


def check_received(folder: Path, sent: dict, names: list[str], *, as_stored: bool = True) -> None:
    got = {pydicom.dcmread(p).SOPInstanceUID: p for p in folder.iterdir() if p.is_file()}
    assert set(got) == {sent[n].SOPInstanceUID for n in names}
    for name in names:
        path = got[sent[name].SOPInstanceUID]
        ds = pydicom.dcmread(path)
        if as_stored:  # the peer accepted JPEG Baseline: sent as stored, no transcoding
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
            assert ds.PixelData == sent[name].PixelData
        else:  # the peer accepted only uncompressed pixels: decoded, the same picture
            original = sent[name].pixel_array.astype(int)
            assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
            assert ds.PhotometricInterpretation == "RGB" and ds.LossyImageCompression == "01"
            assert ds.pixel_array.shape == original.shape and abs(ds.pixel_array.astype(int) - original).max() <= 2
        assert ds.PatientID == sent[name].PatientID
        dicom_tools_check(path)


def test_getscu_receives_a_study_as_stored(gw, retrieving, tmp_path):
    tool = require_tool("getscu", "dcmtk")
    out = tmp_path / "got"
    out.mkdir()
    with RunningListener(gw) as port:
        run = subprocess.run([tool, "-S", "+xy", "-aet", "VIEWER", "-aec", "CLINPHOTO", "-od", str(out),
                              "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.826.0.1.1", "127.0.0.1", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check_received(out, retrieving, ["a1", "a2"])
    # DICOM's audit events: the query behind the retrieve, and the instances transferred (one record for the
    # patient's study, naming both photos, as PS3.15's message does), with the peer and its address
    with gw.db.read() as s:
        events = s.execute(select(AuditEvent.type_code, AuditEvent.agent_network, AuditEvent.entities, AuditEvent.detail)
                           .where(AuditEvent.agent_who == "VIEWER")).all()
    assert sorted(e.type_code for e in events) == ["110104", "110112"]
    [transferred] = [e for e in events if e.type_code == "110104"]
    sent = {e["id"] for e in transferred.entities if e["type"] == "asset"}
    assert sent == {gw_asset_id(gw, retrieving["a1"]), gw_asset_id(gw, retrieving["a2"])}
    assert transferred.detail["count"] == 2 and transferred.detail["transfer_syntax"] == retrieving["a1"].file_meta.TransferSyntaxUID
    assert all("127.0.0.1" in (e.agent_network or "") for e in events)


def gw_asset_id(gw, ds) -> str:
    with gw.db.read() as s:
        return s.scalars(select(Asset.id).where(Asset.sop_instance_uid == ds.SOPInstanceUID)).one()


def test_getscu_accepting_only_uncompressed_gets_the_study_decoded(gw, retrieving, tmp_path):
    """getscu without +xy proposes only uncompressed syntaxes for storage: each JPEG object is decoded for it."""
    tool = require_tool("getscu", "dcmtk")
    out = tmp_path / "got"
    out.mkdir()
    with RunningListener(gw) as port:
        run = subprocess.run([tool, "-S", "-aet", "VIEWER", "-aec", "CLINPHOTO", "-od", str(out),
                              "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.826.0.1.1", "127.0.0.1", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check_received(out, retrieving, ["a1", "a2"], as_stored=False)


@contextmanager
def dcmtk_destination(gw, out: Path, accepts: str) -> Iterator[None]:
    """A dcmtk storescp as DEST (a configured peer with a port), writing what it receives to `out`; `accepts` its
    transfer syntax option (+xy: JPEG Baseline too, +xi: Implicit VR Little Endian only, "": its defaults)."""
    storescp = require_tool("storescp", "dcmtk")
    out.mkdir(exist_ok=True)
    dest_port = free_port()
    gw.settings.auth.dicom_peers.append(DicomPeer(ae_title="DEST", hosts=["127.0.0.1"], port=dest_port, allow=["echo"]))
    receiver = subprocess.Popen([storescp, *([accepts] if accepts else []), "-aet", "DEST", "-od", str(out), str(dest_port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(dest_port, receiver)
        yield
    finally:
        receiver.terminate()
        receiver.wait(10)


def movescu(port: int, *keys: str, destination: str = "DEST", verbose: bool = False) -> subprocess.CompletedProcess[str]:
    """dcmtk's movescu as VIEWER (Study Root), each key given with -k."""
    tool = require_tool("movescu", "dcmtk")
    args = [tool, *(["-v"] if verbose else []), "-S", "-aet", "VIEWER", "-aec", "CLINPHOTO", "-aem", destination]
    for key in keys:
        args += ["-k", key]
    return subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("jpeg", [True, False], ids=["takes-jpeg", "uncompressed-only"])
def test_movescu_sends_a_study_to_a_configured_destination(gw, retrieving, tmp_path, jpeg):
    """To a storescp that accepts JPEG Baseline (+xy) the objects go as stored; to one that accepts only
    uncompressed syntaxes they go decoded."""
    out = tmp_path / "moved"
    with dcmtk_destination(gw, out, "+xy" if jpeg else ""), RunningListener(gw) as port:
        run = movescu(port, "QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.826.0.1.3")
        assert run.returncode == 0, run.stderr
        unknown = movescu(port, "QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.826.0.1.3", destination="NOWHERE")
        assert unknown.returncode != 0 and "MoveDestinationUnknown" in unknown.stderr
    check_received(out, retrieving, ["b1"], as_stored=jpeg)


def _get(port: int, calling: str, identifier: pydicom.Dataset) -> tuple[list[int], set[str]]:
    """A C-GET with pynetdicom as the requestor, storing what arrives in memory."""
    received: set[str] = set()

    def on_store(event):
        received.add(event.dataset.SOPInstanceUID)
        return 0x0000

    from pynetdicom import evt

    ae = AE(ae_title=calling)
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(VLPhotographicImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    statuses = []
    try:
        for status, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET):
            statuses.append(status.Status)
    finally:
        assoc.release()
    return statuses, received


def with_dicom_objects(gw, tmp_path) -> dict[str, str]:
    """Give each matrix photo a small DICOM object of its own UIDs (the matrix stores JPEG renditions only)."""
    with gw.db.write() as s:
        rows = list(s.scalars(select(Asset)))
        for a in rows:
            ds = objects.dataset(rows=8, columns=8, samples=1, photometric="MONOCHROME2")
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = a.study_uid, a.series_uid, a.sop_instance_uid
            ds.PixelData = bytes(64)
            ds["PixelData"].VR = "OB"
            path = objects.write(ds, tmp_path / f"{a.id}.dcm")
            a.dicom_sha256 = gw.blobs.put_bytes(path.read_bytes()).sha256
            a.dicom_transfer_syntax = "1.2.840.10008.1.2.1"
        return {a.id: a.sop_instance_uid for a in rows}


def test_the_access_matrix_through_c_get(gw, tmp_path):
    world = build_access_matrix(gw)
    gw.settings.auth.dicom_peers = [p.model_copy(update={"allow": ["echo", "get"]}) for p in dicom_peers("127.0.0.1")]
    sop_of = with_dicom_objects(gw, tmp_path)
    problems = []
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = list(sop_of.values())  # every photo in the store, by UID list
    with RunningListener(gw) as port:
        for peer in PEERS:
            statuses, got = _get(port, peer.sub, identifier)
            assert statuses[-1] in (0x0000, 0xB000), (peer.key, statuses)
            want = {sop_of[a] for a in world.visible_asset_ids(peer)}
            problems += [f"LEAK {peer.key} gets {uid}" for uid in got - want] + [f"MISS {peer.key} misses {uid}" for uid in want - got]
    assert not problems, "\n".join(problems)


def test_a_c_get_peer_receives_the_served_object_byte_for_byte(gw, retrieving):
    """The C-GET SCP sends a stored object's bytes as they lie (the served header's data set, then the stored file from
    Pixel Data on) without parsing or writing it again: the data set a peer receives is, byte for byte, the served
    object's after its file meta, with today's patient module (the patient renamed after the photo was stored)."""
    from pynetdicom import evt

    from gateway.core.objects import part10
    from tests.test_ingest_dicom import served

    with gw.db.write() as s:
        asset = s.scalars(select(Asset).where(Asset.sop_instance_uid == retrieving["a1"].SOPInstanceUID)).one()
        patient = s.get(Patient, asset.patient_id)
        patient.family_name = "Ní Bhriain"  # not ASCII: the served header is re-encoded as UTF-8
        asset_id = asset.id
    expected = served(gw, asset_id)
    expected = expected[part10.META_START + part10.meta_length(expected):]
    received: list[bytes] = []

    def on_store(event):
        received.append(event.request.DataSet.getvalue())
        return 0x0000

    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = retrieving["a1"].SOPInstanceUID
    with RunningListener(gw) as port:
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(STUDY_ROOT_GET)
        ae.add_requested_context(VLPhotographicImageStorage, ["1.2.840.10008.1.2.4.50"])
        # 16 kB PDUs: the photo crosses from the header's buffer to the file's inside a fragment
        ae.maximum_pdu_size = 16382
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        try:
            statuses = [status.Status for status, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET)]
        finally:
            assoc.release()
    assert statuses[-1] == 0x0000 and len(received) == 1
    assert received[0] == expected
    ds = read_dataset(BytesIO(received[0]), is_implicit_VR=False, is_little_endian=True)
    assert "Bhriain" in str(ds.PatientName) and ds.PixelData == retrieving["a1"].PixelData


def test_a_photo_whose_stored_object_is_gone_is_a_failed_sub_operation(gw, retrieving):
    """A visible photo whose stored object cannot be read (gone from the blob store) is counted failed and named in
    the final response (0xB000, Failed SOP Instance UID List); the others are sent. It used to be left out, the
    peer told Success with fewer objects than the study holds."""
    with gw.db.read() as s:
        lost = s.scalars(select(Asset.dicom_sha256).where(Asset.sop_instance_uid == retrieving["a2"].SOPInstanceUID)).one()
    gw.blobs.path(lost).unlink()
    received: list[str] = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    with RunningListener(gw) as port:
        responses = c_get_study(port, "1.2.826.0.1.1", on_store)
    final, failed = responses[-1]
    assert final.Status == 0xB000 and final.NumberOfCompletedSuboperations == 1 and final.NumberOfFailedSuboperations == 1
    assert failed.FailedSOPInstanceUIDList == retrieving["a2"].SOPInstanceUID
    assert received == [retrieving["a1"].SOPInstanceUID]


def c_get_study(port: int, study: str, on_store) -> list[tuple[pydicom.Dataset, pydicom.Dataset | None]]:
    """A C-GET of a study by VIEWER (pynetdicom, taking JPEG Baseline), each object handed to on_store: every
    response (status, identifier)."""
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    return c_get(port, identifier, on_store)


def c_get(port: int, identifier: pydicom.Dataset, on_store) -> list[tuple[pydicom.Dataset, pydicom.Dataset | None]]:
    """A C-GET by VIEWER (pynetdicom, taking JPEG Baseline), each object handed to on_store: every response."""
    from pynetdicom import evt

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(VLPhotographicImageStorage, ["1.2.840.10008.1.2.4.50"])
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        return list(assoc.send_c_get(identifier, STUDY_ROOT_GET))
    finally:
        assoc.release()


def test_a_c_move_longer_than_the_idle_timeout_leaves_its_association_serving(gw, retrieving):
    """The requestor sends nothing while a slow destination takes the photos; the gateway is not idle then. It used
    to answer the C-MOVE and abort at once: the idle timer ran from the request, restarted only on what came in."""
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_ROOT_MOVE
    from pynetdicom.sop_class import Verification

    gw.settings.dicom_idle_timeout = 1.0
    dest_port = free_port()
    gw.settings.auth.dicom_peers.append(DicomPeer(ae_title="SLOWDEST", hosts=["127.0.0.1"], port=dest_port, allow=["echo"]))
    received = []

    def slow_store(event):
        time.sleep(1.6)  # past the idle timeout, with the requestor silent
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    destination = AE(ae_title="SLOWDEST")
    destination.add_supported_context(VLPhotographicImageStorage, ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"])
    server = destination.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    try:
        with RunningListener(gw) as port:
            requestor = AE(ae_title="VIEWER")
            requestor.add_requested_context(STUDY_ROOT_MOVE)
            requestor.add_requested_context(Verification)
            assoc = requestor.associate("127.0.0.1", port, ae_title="CLINPHOTO")
            assert assoc.is_established
            query = pydicom.Dataset()
            query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", "1.2.826.0.1.3"
            statuses = [status.Status for status, _ in assoc.send_c_move(query, "SLOWDEST", STUDY_ROOT_MOVE)]
            assert statuses[-1] == 0x0000 and received == [retrieving["b1"].SOPInstanceUID]
            time.sleep(0.3)  # an abort sent after the answer would have arrived by now
            assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
            assoc.release()
            assert assoc.is_released
    finally:
        server.shutdown()
