"""Attacks on C-GET sending stored objects as their bytes lie (transcode.encoded_as_stored, pdata.frame with several
buffers, FramingDIMSE.encoded, EventAssociation.send_c_store) and on DIMSE command sets written directly, both
backends, on real sockets with pynetdicom and dcmtk as the peers.

What must hold: the data set a peer receives is the served object's, byte for byte, whatever the stored transfer
syntax (native Explicit or Implicit VR Little Endian, odd-length pixel data, elements after Pixel Data) and whatever
maximum PDU length the peer proposes; a peer that takes only another syntax still gets the object transcoded; a
stored file that changed under the send never goes out cut short; pynetdicom's own message path (its debug logging)
sends the same bytes; a peer whose maximum PDU length leaves no room for data cannot hang the gateway.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import tracemalloc
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET
from pynetdicom.sop_class import Verification, VLPhotographicImageStorage

from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from gateway.core.objects import part10
from gateway.core.policy.settings import DicomPeer
from tests import dicom_objects as objects
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient, dicom_tools_check
from tests.test_dicom_association import RunningListener
from tests.test_dicom_find import archive  # noqa: F401 (the fixture)
from tests.test_dicom_retrieve import check_received, dcmtk_destination, movescu, retrieving  # noqa: F401 (the fixture)
from tests.test_ingest_dicom import served

CAMERA = Source.dicom_peer("CAMERA", "127.0.0.1")


@pytest.fixture
def viewer(gw):
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "get"],
                                              sensitivities=["N", "R"])]
    add_patient(gw)
    return gw


def store(gw, path: Path) -> tuple[str, pydicom.Dataset]:
    photo = ingest(gw, CaptureRequest(source=CAMERA, items=[ReceivedObject(path)])).photos[0]
    return photo.asset_id, pydicom.dcmread(path)


def native_rgb(tmp_path: Path, name: str, syntax: str, rows: int = 7, columns: int = 5, trailing: bool = False) -> Path:
    """A native RGB object (odd Rows x Columns: 105 bytes of pixel data, padded to even by the writer), with
    Data Set Trailing Padding after Pixel Data when asked."""
    pixels = (np.arange(rows * columns * 3) % 251).astype(np.uint8).reshape(rows, columns, 3)
    path = objects.native(tmp_path / name, pixels, syntax)
    if trailing:
        ds = pydicom.dcmread(path)
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 6)
        ds.save_as(path, enforce_file_format=True)
    return path


def c_get(port: int, uid: str, syntaxes: list[str], max_pdu: int = 16382) -> tuple[list[int], list[tuple[str, bytes]]]:
    """A C-GET of one instance with pynetdicom as the requestor: the statuses, and each data set received (its
    context's transfer syntax and its bytes as they came)."""
    got: list[tuple[str, bytes]] = []

    def on_store(event):
        got.append((str(event.context.transfer_syntax), event.request.DataSet.getvalue()))
        return 0x0000

    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = uid
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(VLPhotographicImageStorage, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", max_pdu=max_pdu,  # what we propose to receive
                         ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        statuses = [status.Status for status, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET) if status]
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses, got


def data_set_of(whole: bytes) -> bytes:
    return whole[part10.META_START + part10.meta_length(whole):]


@pytest.mark.parametrize("max_pdu", [0, 8, 1024, 16382], ids=["unlimited", "8-bytes", "1k", "16k"])
@pytest.mark.parametrize("kind", ["explicit-trailing", "implicit", "explicit-odd"])
def test_a_native_object_arrives_byte_for_byte_at_any_pdu_size(viewer, tmp_path, kind, max_pdu):
    """Native pixel data (odd length, padded), an element after Pixel Data, Implicit VR: sent as stored, the peer's
    data set is the served object's after its file meta, byte for byte, however small its PDUs; and it parses to
    the same Pixel Data and trailing element as the object sent to us."""
    syntax = ImplicitVRLittleEndian if kind == "implicit" else ExplicitVRLittleEndian
    path = native_rgb(tmp_path, f"{kind}.dcm", syntax, trailing=kind == "explicit-trailing")
    asset_id, sent = store(viewer, path)
    expected = data_set_of(served(viewer, asset_id))
    with RunningListener(viewer) as port:
        statuses, got = c_get(port, sent.SOPInstanceUID, [syntax], max_pdu)
    assert statuses[-1] == 0x0000 and len(got) == 1, statuses
    ts, data = got[0]
    assert ts == syntax and data == expected
    ds = read_dataset(BytesIO(data), is_implicit_VR=syntax == ImplicitVRLittleEndian, is_little_endian=True)
    assert ds.PixelData == sent.PixelData and ds.SOPInstanceUID == sent.SOPInstanceUID
    if kind == "explicit-trailing":
        assert ds[0xFFFCFFFC].value == sent[0xFFFCFFFC].value


def test_an_implicit_vr_object_goes_transcoded_to_a_peer_taking_only_explicit_vr(viewer, tmp_path):
    """The as-stored path is taken only for the syntax the peer accepted: an Implicit VR object to a peer that took
    only Explicit VR Little Endian arrives in Explicit VR, the same elements and pixels."""
    asset_id, sent = store(viewer, native_rgb(tmp_path, "implicit.dcm", ImplicitVRLittleEndian))
    with RunningListener(viewer) as port:
        statuses, got = c_get(port, sent.SOPInstanceUID, [ExplicitVRLittleEndian], 1024)
    assert statuses[-1] == 0x0000 and len(got) == 1
    ts, data = got[0]
    ds = read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    assert ts == ExplicitVRLittleEndian and ds.PixelData == sent.PixelData and ds.Rows == 7
    whole = pydicom.dcmread(BytesIO(served(viewer, asset_id)))
    assert {e.tag for e in ds} == {e.tag for e in whole}


def test_a_jpeg_object_to_a_peer_taking_only_native_pixels_is_decoded(viewer, tmp_path, fx):
    asset_id, sent = store(viewer, objects.jpeg_wrapped(tmp_path / "j.dcm", fx["baseline_420.jpg"].read_bytes(), 640, 480))
    with RunningListener(viewer) as port:
        statuses, got = c_get(port, sent.SOPInstanceUID, [ImplicitVRLittleEndian], 4096)
    assert statuses[-1] == 0x0000 and len(got) == 1
    ts, data = got[0]
    ds = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
    assert ts == ImplicitVRLittleEndian and len(ds.PixelData) == 640 * 480 * 3


def test_a_stored_file_cut_short_under_the_send_fails_that_sub_operation_only(viewer, tmp_path, monkeypatch):
    """The stored file is shorter than when its served header was made (changed on disk between the two reads): the
    object is not sent cut short; the sub-operation fails, the association stays usable for the next C-GET."""
    from gateway.core.objects import transcode

    asset_id, sent = store(viewer, native_rgb(tmp_path, "a.dcm", ExplicitVRLittleEndian))
    real = part10.read_range
    monkeypatch.setattr(transcode.part10, "read_range", lambda f, start, end: real(f, start, end)[:-10])
    with RunningListener(viewer) as port:
        statuses, got = c_get(port, sent.SOPInstanceUID, [ExplicitVRLittleEndian])
        assert statuses[-1] != 0x0000 and not got, statuses
        monkeypatch.setattr(transcode.part10, "read_range", real)
        statuses, got = c_get(port, sent.SOPInstanceUID, [ExplicitVRLittleEndian])
    assert statuses[-1] == 0x0000 and got[0][1] == data_set_of(served(viewer, asset_id))


def test_pynetdicom_debug_logging_sends_the_same_bytes(viewer, tmp_path, monkeypatch, caplog):
    """With pynetdicom's standard handlers bound (its debug logging: EVT_DIMSE_SENT), the command set is built by
    pynetdicom and the data set still comes from the stored bytes: the same object arrives."""
    from pynetdicom import _config

    asset_id, sent = store(viewer, native_rgb(tmp_path, "a.dcm", ExplicitVRLittleEndian, trailing=True))
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    caplog.set_level(logging.DEBUG, logger="pynetdicom")
    with RunningListener(viewer) as port:
        statuses, got = c_get(port, sent.SOPInstanceUID, [ExplicitVRLittleEndian], 1024)
    assert statuses[-1] == 0x0000 and got[0][1] == data_set_of(served(viewer, asset_id))
    assert any("C-STORE" in r.getMessage() for r in caplog.records)


def test_getscu_with_small_pdus_receives_a_valid_native_object(viewer, tmp_path):
    """dcmtk as the peer, its smallest maximum PDU (4 kB): the object it writes is the stored one and passes dcmdump
    and dcmj2pnm (dciodvfy is not asked of this synthetic native object)."""
    tool = require_tool("getscu", "dcmtk")
    asset_id, sent = store(viewer, native_rgb(tmp_path, "a.dcm", ExplicitVRLittleEndian, rows=301, columns=211,
                                              trailing=True))
    out = tmp_path / "got"
    out.mkdir()
    with RunningListener(viewer) as port:
        run = subprocess.run([tool, "-S", "-aet", "VIEWER", "-aec", "CLINPHOTO", "--max-pdu", "4096", "-od", str(out),
                              "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={sent.SOPInstanceUID}",
                              "127.0.0.1", str(port)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    [path] = list(out.iterdir())
    ds = pydicom.dcmread(path)
    assert ds.PixelData == sent.PixelData and ds[0xFFFCFFFC].value == sent[0xFFFCFFFC].value
    dicom_tools_check(path, iod=False)


@pytest.mark.parametrize("max_pdu", [6, 1])
def test_a_peer_whose_maximum_pdu_leaves_no_room_for_data_cannot_hang_the_gateway(viewer, max_pdu):
    """A maximum PDU length of 1..6 leaves no byte for a fragment: the framing loop never advanced (one acceptor
    thread spinning and growing its list of fragment headers until the process ran out of memory). The answer
    fails, the association ends, and the gateway goes on answering others."""
    with RunningListener(viewer) as port:
        ae = AE(ae_title="VIEWER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", max_pdu=max_pdu)
        started = time.monotonic()
        if assoc.is_established:  # the A-ASSOCIATE-AC itself is not framed by us
            status = assoc.send_c_echo()
            assert not status or status.Status != 0x0000
            assoc.abort()
        assert time.monotonic() - started < 15
        ok = AE(ae_title="VIEWER")
        ok.add_requested_context(Verification)
        again = ok.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert again.is_established and again.send_c_echo().Status == 0x0000
        again.release()


def test_framing_for_a_tiny_pdu_peer_does_not_multiply_memory():
    """A peer allowed to C-GET that proposes a maximum PDU length of 8 bytes (2 data bytes a fragment): the fragments
    are made as they are sent, so the gateway never holds them all (~60 bytes per byte of the object when it did:
    300 MB for a 5 MB photo)."""
    import socket

    from gateway.dicom.pdata import frame, send_all

    data = bytes(200_000)
    a, b = socket.socketpair()
    received = [0]  # bytes counted, not kept: the reader's memory is not the sender's

    def read() -> None:
        while chunk := b.recv(1 << 16):
            received[0] += len(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    tracemalloc.start()
    try:
        framed = frame(1, b"c" * 100, data, 8)
        send_all(a, framed.pieces)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        a.close()
        reader.join(10)
        b.close()
    assert received[0] == (100 + len(data)) // 2 * 14  # every 2-byte fragment sent, each after its 12-byte header
    assert peak < 10 * len(data), f"{peak / len(data):.0f} bytes held per byte sent"


def test_movescu_to_a_destination_taking_only_implicit_vr_gets_the_photos_decoded(gw, retrieving, tmp_path):  # noqa: F811
    """C-MOVE goes on pynetdicom's own requestor association (not ours: sent through dataset_for, never as stored
    bytes). A destination that accepts only Implicit VR Little Endian, the syntax every DICOM application takes
    (storescp +xi), gets each JPEG photo decoded (refused 0xA702 before: written as Explicit VR under an Implicit VR
    file meta); the same path is the router's, so routing to such a PACS failed alike."""
    out = tmp_path / "moved"
    with dcmtk_destination(gw, out, "+xi"), RunningListener(gw) as port:
        run = movescu(port, "QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.826.0.1.1")
        assert run.returncode == 0, run.stderr
    check_received(out, retrieving, ["a1", "a2"], as_stored=False)
    assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in out.iterdir()} == {ImplicitVRLittleEndian}


def a_series(gw, tmp_path, n: int) -> tuple[pydicom.Dataset, dict[str, bytes]]:
    """n native photos in one series: the identifier naming it, and each object's data set as served."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    expected: dict[str, bytes] = {}
    for i in range(n):
        path = native_rgb(tmp_path, f"s{i}.dcm", ExplicitVRLittleEndian, rows=64, columns=48)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
        ds.save_as(path, enforce_file_format=True)
        asset_id, sent = store(gw, path)
        expected[sent.SOPInstanceUID] = data_set_of(served(gw, asset_id))
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID, identifier.SeriesInstanceUID = study, series
    return identifier, expected



def test_a_c_cancel_mid_get_stops_it_and_leaves_the_association_clean(viewer, tmp_path):
    """The peer cancels after the first of six objects: the retrieve ends Cancel (0xFE00) with fewer objects sent,
    each one received whole; FramingDIMSE.encoded is not left set (a C-GET on the same association afterwards
    receives every object byte for byte)."""
    identifier, expected = a_series(viewer, tmp_path, 6)
    got: list[tuple[str, bytes]] = []
    cancel: list[int] = []

    def on_store(event):
        ds = read_dataset(BytesIO(event.request.DataSet.getvalue()), is_implicit_VR=False, is_little_endian=True)
        got.append((ds.SOPInstanceUID, event.request.DataSet.getvalue()))
        if cancel:
            event.assoc.send_c_cancel(1, cancel[0])
            cancel.clear()
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(VLPhotographicImageStorage, [ExplicitVRLittleEndian])
    with RunningListener(viewer) as port:
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", max_pdu=4096,
                             ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        try:
            cancel.append(assoc._get_valid_context(STUDY_ROOT_GET, "", "scu").context_id)
            first = [s.Status for s, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET, msg_id=1) if s]
            cancelled = list(got)
            got.clear()
            second = [s.Status for s, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET, msg_id=2) if s]
        finally:
            assoc.release()
    assert first[-1] == 0xFE00 and 1 <= len(cancelled) < 6, (first, len(cancelled))
    assert all(data == expected[uid] for uid, data in cancelled)
    assert second[-1] == 0x0000 and sorted(got) == sorted(expected.items())


def test_an_odd_length_value_after_pixel_data_is_refused_at_ingest(viewer, tmp_path):
    """A sender's object ending in an odd-length value (Data Set Trailing Padding of 3 bytes: against PS3.5 7.1.1,
    which every value length must meet, though pydicom and dcmtk read it). Stored as sent, every door would serve it
    as sent (C-GET as stored, WADO-RS), malformed for the peer: it is refused at ingest, naming the element. The same
    object with even-length trailing padding is stored and goes out byte for byte."""
    import struct

    from gateway.core.ingest.errors import INVALID_OBJECT

    path = native_rgb(tmp_path, "odd.dcm", ExplicitVRLittleEndian)
    whole = path.read_bytes()
    path.write_bytes(whole + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 3) + b"\x01\x02\x03")
    with pytest.raises(IngestRejected) as refused:
        store(viewer, path)
    assert refused.value.code == INVALID_OBJECT and "(FFFC,FFFC)" in refused.value.message and "odd" in refused.value.message
    path.write_bytes(whole + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 4) + b"\x01\x02\x03\x04")
    _, sent = store(viewer, path)
    with RunningListener(viewer) as port:
        statuses, got = c_get(port, sent.SOPInstanceUID, [ExplicitVRLittleEndian])
    assert statuses[-1] == 0x0000 and len(got) == 1
    assert got[0][1].endswith(b"\x01\x02\x03\x04") and len(got[0][1]) % 2 == 0


def test_what_follows_pixel_data_must_be_whole_elements(viewer, tmp_path):
    """Bytes after Pixel Data that are not data elements (a file with garbage appended) are refused at ingest."""
    path = native_rgb(tmp_path, "tail.dcm", ExplicitVRLittleEndian)
    path.write_bytes(path.read_bytes() + b"\xfc\xff\xfc\xffOB\x00\x00\x10\x00\x00\x00ab")  # 16 bytes promised, 2 there
    with pytest.raises(IngestRejected) as refused:
        store(viewer, path)
    assert "after Pixel Data" in refused.value.message or "follows Pixel Data" in refused.value.message


def _random_primitive(data, message_class):
    """A primitive for `message_class` with each command element set at random (or left unset) to a value its
    VR allows; values the primitive's own checks refuse are left unset."""
    from hypothesis import strategies as st
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pynetdicom import dimse_primitives
    from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS, _DATASET_KEYWORDS

    name = message_class.__name__
    primitive = getattr(dimse_primitives, name.rsplit("_", 1)[0])()
    ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=70)
    by_vr = {
        "US": st.integers(0, 0xFFFF), "UL": st.integers(0, 0xFFFFFFFF),
        "UI": st.from_regex(r"\A[12](\.[1-9][0-9]{0,6}){1,8}\Z"), "AE": ascii_text.map(lambda s: s[:16]),
    }
    for keyword in _COMMAND_SET_KEYWORDS[name.replace("_", "-")]:
        if keyword in ("CommandGroupLength", "CommandField", "CommandDataSetType") or not hasattr(primitive, keyword):
            continue
        vr = dictionary_VR(tag_for_keyword(keyword))
        if not data.draw(st.booleans(), label=f"set {keyword}"):
            continue
        value = data.draw(by_vr.get(vr, ascii_text), label=keyword)
        try:
            setattr(primitive, keyword, value)
        except (TypeError, ValueError):
            pass
    keyword = _DATASET_KEYWORDS.get(name)
    if keyword and data.draw(st.booleans(), label="data set"):
        setattr(primitive, keyword, BytesIO(data.draw(st.binary(max_size=4), label="data")))
    return primitive


def test_every_command_set_written_directly_is_pynetdicoms_byte_for_byte():
    """Property: for every DIMSE message type and random primitives (odd and even UIDs, empty and odd-length text, the
    largest numbers, elements left out, data sets present or empty), the command set written by command.py is
    None (left to pynetdicom) or exactly what pynetdicom writes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
    from pynetdicom.dsutils import encode

    from gateway.dicom.command import command_set

    classes = sorted({*_RQ_TO_MESSAGE.values(), *_RSP_TO_MESSAGE.values()}, key=lambda c: c.__name__)
    written: set[str] = set()

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def check(data):
        message_class = data.draw(st.sampled_from(classes), label="message")
        primitive = _random_primitive(data, message_class)
        ours = command_set(message_class.__name__, primitive)
        if ours is None:
            return
        msg = message_class()
        msg.primitive_to_message(primitive)
        assert ours == encode(msg.command_set, True, True)
        written.add(message_class.__name__)

    check()
    assert {"C_STORE_RQ", "C_FIND_RSP", "C_ECHO_RSP", "C_STORE_RSP"} <= written and len(written) >= 8, written
