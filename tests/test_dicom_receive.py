"""What a C-STORE's bytes go through on the way in: PDUs read in one go and a P-DATA-TF's values handed on as views
(gateway/dicom/pdu_in.py, reactor.EventDUL._read_pdu_data), the data set written to the spool and hashed as it arrives
(gateway/dicom/spooled.py). On real sockets with dcmtk and pynetdicom as the senders, both backends.

What must hold: the object stored is the one sent, byte for byte, however it was cut into PDUs (many small ones, or
the command and data set in one); its SHA-256 and SHA-1 are those of the stored file; an association that ends in the
middle of a data set leaves no spool file; a P-DATA-TF whose items do not add up ends that association and no other.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification, VLPhotographicImageStorage
from sqlalchemy import func, select

from gateway.core.ingest import deferred
from gateway.core.ingest.incoming import CHUNK, OverLimit
from gateway.core.policy.settings import DicomPeer
from gateway.dicom.pdu_in import MAX_PDU_LENGTH, ConnectionEnded, PduTooLong, pdata_values, read_exactly, read_pdu
from gateway.dicom.spooled import SpooledDataSet, part10_head
from store import audit
from store.models import Asset, AuditEvent
from tests import dicom_objects as objects
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient
from tests.test_dicom_association import RunningListener

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture
def camera_gw(gw):
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="CAMERA", hosts=["127.0.0.1"], allow=["echo", "store"])]
    add_patient(gw, nhs=objects.NHS_NUMBER)
    return gw


def big_photo(path: Path, width: int = 1200, height: int = 900) -> Path:
    """A noisy JPEG (~1 MB: several spool chunks, ~250 PDUs of 4 kB) wrapped as a camera's VL Photographic object."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=95)
    assert len(out.getvalue()) > 4 * CHUNK
    return objects.jpeg_wrapped(path, out.getvalue(), width, height)


def stored(gw) -> list[Asset]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(Asset)))
        s.expunge_all()
        return rows


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def store_request_pdus(path: Path, context_id: int, max_pdu: int, *, message_id: int = 1, drop: tuple[str, ...] = (),
                       command_field: int | None = None) -> list[bytes]:
    """The C-STORE-RQ of the object as P-DATA-TF PDUs, as pynetdicom would send them (`drop`: command elements
    left out; `command_field`: another command field written in)."""
    ds = pydicom.dcmread(path)
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = message_id, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    primitive.DataSet = io.BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    for keyword in drop:
        delattr(message.command_set, keyword)
    if command_field is not None:
        message.command_set.CommandField = command_field
    return [P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu)]


def echo_request_pdus(context_id: int, message_id: int) -> list[bytes]:
    primitive = C_ECHO()
    primitive.MessageID, primitive.AffectedSOPClassUID = message_id, Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return [P_DATA_TF(p).encode() for p in message.encode_msg(context_id, 0)]


def associate(port: int, syntax: str = JPEG_BASELINE):
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context(VLPhotographicImageStorage, [syntax])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
    assert assoc.is_established
    return assoc


def test_a_photo_in_many_small_pdus_is_stored_byte_for_byte(camera_gw, tmp_path):
    sent = big_photo(tmp_path / "photo.dcm")
    tool = require_tool("storescu", "dcmtk")
    with RunningListener(camera_gw) as port:
        done = subprocess.run([tool, "-xy", "--max-send-pdu", "4096", "-aet", "CAMERA", "-aec", "CLINPHOTO",
                               "127.0.0.1", str(port), str(sent)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    [asset] = stored(camera_gw)
    kept = camera_gw.blobs.path(asset.sha256).read_bytes()
    # the blob's name is its own digest, worked out as the fragments came
    assert hashlib.sha256(kept).hexdigest() == asset.sha256 == asset.dicom_sha256
    # its SHA-1 (FHIR Attachment.hash) comes after the answer, with its renditions
    assert asset.sha1 is None
    deferred.make(camera_gw, asset.id)
    [asset] = stored(camera_gw)
    assert base64.b64encode(hashlib.sha1(kept).digest()).decode() == asset.sha1
    sent_ds, kept_ds = pydicom.dcmread(sent), pydicom.dcmread(io.BytesIO(kept))
    assert kept_ds.PixelData == sent_ds.PixelData and kept_ds.SOPInstanceUID == sent_ds.SOPInstanceUID
    # the data set is kept as the association carried it, behind pynetdicom's file meta
    data_set_at = 132 + 12 + kept_ds.file_meta.FileMetaInformationGroupLength
    assert kept[data_set_at:] == encode(sent_ds, False, True)
    assert not camera_gw.spool.files()


def test_the_command_and_data_set_in_one_pdu_are_stored(camera_gw, fx, tmp_path):
    """Two presentation data values in one P-DATA-TF: the command's last fragment and the whole data set."""
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "vlp.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        try:
            context_id = assoc.accepted_contexts[0].context_id
            pdus = store_request_pdus(sent, context_id, 0)  # no limit: the command in one PDU, the data set in one
            assert len(pdus) == 2
            bodies = [pdu[6:] for pdu in pdus]
            joined = b"".join(bodies)
            assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(joined)) + joined)
            assert wait_for(lambda: len(stored(camera_gw)) == 1)
        finally:
            assoc.release()
    assert pydicom.dcmread(camera_gw.blobs.path(stored(camera_gw)[0].sha256)).PixelData == pydicom.dcmread(sent).PixelData


def test_an_association_aborted_mid_data_set_leaves_no_spool_file(camera_gw, tmp_path):
    sent = big_photo(tmp_path / "photo.dcm")
    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        context_id = assoc.accepted_contexts[0].context_id
        pdus = store_request_pdus(sent, context_id, 4096)
        for pdu in pdus[: len(pdus) // 2]:  # the command, then half the data set
            assoc.dul.socket.socket.sendall(pdu)
        assert wait_for(lambda: len(camera_gw.spool.files()) == 1)  # written to the spool as it came
        assoc.abort()
        assert wait_for(lambda: not camera_gw.spool.files())
        # the gateway serves on
        assoc = associate(port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    with camera_gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 0


@pytest.mark.parametrize("body", [
    struct.pack(">LB", 50, 1) + b"\x02" + b"x" * 10,  # an item longer than the PDU
    struct.pack(">LB", 1, 1) + b"\x02",  # an item without room for its message control header
    struct.pack(">LB", 3, 1) + b"\x02x" + b"\x00\x00",  # two bytes after the last item
])
def test_a_pdata_tf_whose_items_do_not_add_up_ends_that_association_only(camera_gw, body):
    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established)
        other = associate(port)
        assert other.send_c_echo().Status == 0x0000
        other.release()


# fragments smaller than a chunk are gathered, larger ones written as they are: after what was gathered, or alone
@pytest.mark.parametrize("cuts", [(1, CHUNK, 2 * CHUNK + 7), (10, 2 * CHUNK + 10, 2 * CHUNK + 20)],
                         ids=["gathered-then-whole", "whole-after-a-remainder"])
def test_a_spooled_data_set_is_its_head_and_fragments_with_their_digests(tmp_path, cuts):
    fd, path = os.open(tmp_path / "a.dcm", os.O_WRONLY | os.O_CREAT), tmp_path / "a.dcm"
    head = part10_head(objects.VL_PHOTO, "1.2.3.4", JPEG_BASELINE)
    spooled = SpooledDataSet(fd, path, head)
    data = os.urandom(3 * CHUNK + 12345)
    a, b, c = cuts
    pieces = [data[:a], memoryview(data)[a:b], bytearray(data[b:c]), data[c:]]
    for piece in pieces:
        assert spooled.write(piece) == len(piece)
    sha256 = spooled.finish()
    whole = head + data
    assert path.read_bytes() == whole
    assert sha256 == hashlib.sha256(whole).hexdigest()
    assert spooled.getvalue() == b""  # nothing held in memory
    meta = pydicom.dcmread(io.BytesIO(head)).file_meta  # the file meta pynetdicom's event.file_meta gives
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (
        objects.VL_PHOTO, "1.2.3.4", JPEG_BASELINE)


def test_a_spooled_data_set_discarded_is_gone_and_cannot_be_finished(tmp_path):
    path = tmp_path / "b.dcm"
    spooled = SpooledDataSet(os.open(path, os.O_WRONLY | os.O_CREAT), path, b"head")
    spooled.write(os.urandom(CHUNK + 1))
    spooled.discard()
    assert not path.exists()
    spooled.write(b"late fragment")  # the DUL may still hand one over: it goes nowhere
    spooled.discard()
    with pytest.raises(OSError):
        spooled.finish()


def test_a_write_the_disk_refuses_fails_the_finish(tmp_path):
    path = tmp_path / "c.dcm"
    path.write_bytes(b"")
    spooled = SpooledDataSet(os.open(path, os.O_RDONLY), path, b"head")  # every write fails (EBADF)
    spooled.write(os.urandom(CHUNK))
    spooled.write(b"more")
    with pytest.raises(OSError):
        spooled.finish()
    spooled.discard()


def test_a_spooled_data_set_past_its_limit_is_counted_not_kept(tmp_path):
    path = tmp_path / "d.dcm"
    spooled = SpooledDataSet(os.open(path, os.O_WRONLY | os.O_CREAT), path, b"head", limit=2 * CHUNK)
    spooled.write(os.urandom(2 * CHUNK - 4))  # up to the limit, head included: kept
    assert path.stat().st_size == 2 * CHUNK  # written, as ever
    spooled.write(b"12345")  # one byte past it: what was kept goes
    assert path.stat().st_size == 0
    spooled.write(os.urandom(3 * CHUNK))  # the rest of what the sender sends, counted only
    assert path.stat().st_size == 0
    with pytest.raises(OverLimit) as over:
        spooled.finish()
    assert over.value.size == 4 + 2 * CHUNK - 4 + 5 + 3 * CHUNK
    spooled.discard()
    assert not path.exists()


def test_a_c_store_over_the_size_limit_fills_no_disk_and_is_refused_for_its_size(camera_gw, tmp_path):
    """ingest.max_bytes bounds what one C-STORE's data set may put in the spool while it arrives (sent here in 4 kB
    PDUs, so the limit is crossed mid-data set): past it nothing of the object is kept, and the core refuses it for
    its size, audited, as any file over the limit. The association and the gateway carry on."""
    sent = big_photo(tmp_path / "photo.dcm")
    camera_gw.settings.ingest.max_bytes = sent.stat().st_size // 2
    tool = require_tool("storescu", "dcmtk")
    with RunningListener(camera_gw) as port:
        done = subprocess.run([tool, "-v", "-xy", "--max-send-pdu", "4096", "-aet", "CAMERA", "-aec", "CLINPHOTO",
                               "127.0.0.1", str(port), str(sent)], capture_output=True, text=True, timeout=60)
        said = (done.stdout + done.stderr).lower()
        assert done.returncode != 0 and "refused: outofresources" in said, said
        assoc = associate(port)
        assoc._reactor_checkpoint.clear()  # paused, as its own send_*() do, so the answer is left for this test
        try:
            assert wait_for(lambda: assoc._is_paused)
            # three quarters of it sent: the spool file was emptied when the limit was crossed, and stays so
            pdus = store_request_pdus(sent, assoc.accepted_contexts[0].context_id, 4096)
            for pdu in pdus[: len(pdus) * 3 // 4]:
                assoc.dul.socket.socket.sendall(pdu)
            assert wait_for(lambda: [f.stat().st_size for f in camera_gw.spool.files()] == [0])
            for pdu in pdus[len(pdus) * 3 // 4:]:
                assoc.dul.socket.socket.sendall(pdu)
            _context_id, answer = assoc.dimse.get_msg(block=True)
            assert answer.Status == 0xA700
            assert answer.ErrorComment.startswith("file too large: over the ")
            assoc._reactor_checkpoint.set()
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc._reactor_checkpoint.set()
            assoc.release()
    assert not stored(camera_gw)
    assert not camera_gw.spool.files()
    with camera_gw.db.read() as s:
        refusals = s.execute(select(AuditEvent.agent_who, AuditEvent.detail).where(
            AuditEvent.type_code == audit.IMPORT, AuditEvent.outcome == audit.MINOR_FAILURE)).all()
    assert len(refusals) == 2 and all(who == "ae:CAMERA" and detail["code"] == "too-large" for who, detail in refusals)


def test_a_pdata_tf_body_is_read_as_its_values():
    body = bytearray(struct.pack(">LB", 5, 1) + b"\x03abc" + struct.pack(">LB", 3, 3) + b"\x02z")  # lengths count the context id
    values = pdata_values(body)
    assert [(cid, bytes(v)) for cid, v in values] == [(1, b"\x03abc"), (3, b"\x02z")]
    assert pdata_values(bytearray()) is None


def test_a_pdu_is_read_whole_however_the_kernel_hands_it_over():
    ours, theirs = socket.socketpair()
    try:
        payload = os.urandom(100_000)

        def dribble() -> None:
            for at in range(0, len(payload), 7001):
                theirs.sendall(payload[at:at + 7001])
                time.sleep(0.001)
            theirs.close()

        sender = threading.Thread(target=dribble)
        sender.start()
        assert bytes(read_exactly(ours, len(payload))) == payload
        sender.join()
        with pytest.raises(ConnectionEnded):
            read_exactly(ours, 1)  # closed: nothing more comes
    finally:
        ours.close()


def test_a_pdu_longer_than_agreed_ends_that_association_only(camera_gw):
    """The maximum PDU length the gateway gives is held to: a P-DATA-TF claiming more is refused before its body
    is read (an A-ABORT), and memory is never set aside for a length only claimed."""
    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        assert assoc.acceptor.maximum_length == MAX_PDU_LENGTH  # what the gateway gave in its A-ASSOCIATE-AC
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, MAX_PDU_LENGTH + 1) + b"\0" * 64)
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established)
        other = associate(port)
        assert other.send_c_echo().Status == 0x0000
        other.release()


def test_a_claimed_length_costs_no_memory_not_sent():
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\0" * 100)
        theirs.close()
        with pytest.raises(PduTooLong):
            read_pdu(ours, MAX_PDU_LENGTH)
    finally:
        ours.close()
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(struct.pack(">BBL", 0x07, 0, 0xFFFFFFF0) + b"\0" * 100)  # an A-ABORT claiming 4 GB, then closed
        theirs.close()
        tracemalloc.start()
        try:
            with pytest.raises(ConnectionEnded):
                read_pdu(ours, MAX_PDU_LENGTH)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * 1024 * 1024
    finally:
        ours.close()


def endless_fragments(context_id: int, control: int, total: int, pdu_body: int = 16384):
    """P-DATA-TF PDUs of one message's fragments, none of them the last, `total` bytes of them in all."""
    value = bytes([control]) + b"\x20" * (pdu_body - 6)
    pdu = struct.pack(">BBLLB", 0x04, 0, pdu_body, pdu_body - 4, context_id) + value
    for _ in range(total // (pdu_body - 6) + 1):
        yield pdu


@pytest.mark.parametrize("control", [0x01, 0x00], ids=["command", "identifier"])
def test_a_message_gathered_in_memory_without_end_aborts_its_association_and_takes_no_memory(camera_gw, control):
    """A command set that never ends, or a C-ECHO... data set (pynetdicom gathers any non-C-STORE data set in memory
    until its last fragment): past pdata.MAX_COMMAND_BYTES / MAX_IN_MEMORY_DATA_SET the association is aborted,
    where pynetdicom gathered all a peer sent (here 40 MB). The gateway serves on."""
    from gateway.dicom.pdata import MAX_IN_MEMORY_DATA_SET

    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        context_id = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
        if control == 0x00:  # a C-ECHO-RQ whose command says a data set follows, then that data set, without end
            command = echo_request_pdus(context_id, 1)[0]
            with_data_set = command.replace(struct.pack("<HHLH", 0x0000, 0x0800, 2, 0x0101),
                                            struct.pack("<HHLH", 0x0000, 0x0800, 2, 0x0001))
            assert with_data_set != command
            assoc.dul.socket.socket.sendall(with_data_set)
        tracemalloc.start()
        try:
            sock = assoc.dul.socket.socket
            try:
                for pdu in endless_fragments(context_id, control, 40 * 1024 * 1024):
                    sock.sendall(pdu)
            except OSError:  # the gateway aborted and closed while we sent
                pass
            assert wait_for(lambda: assoc.is_aborted or not assoc.is_established)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MAX_IN_MEMORY_DATA_SET + MAX_PDU_LENGTH + 4 * 1024 * 1024
        other = associate(port)
        assert other.send_c_echo().Status == 0x0000
        other.release()


def test_a_command_fragment_once_the_command_was_whole_aborts_and_keeps_nothing(camera_gw, tmp_path):
    """A C-STORE's command, part of its data set, then a C-ECHO's command: pynetdicom decoded the two commands as
    one (a C-ECHO, answered Success) and dropped the C-STORE's spooled data set with its file open and on disk, once
    per repetition. The association is aborted instead; no spool file is left, none is held open."""
    sent = big_photo(tmp_path / "photo.dcm")

    def spool_files_open() -> list[str]:
        names = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return [n for n in names if "cstore-" in n]

    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        store_context = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == VLPhotographicImageStorage)
        echo_context = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
        pdus = store_request_pdus(sent, store_context, 16384)
        sock = assoc.dul.socket.socket
        for pdu in pdus[: len(pdus) // 2]:  # the command, then half the data set
            sock.sendall(pdu)
        assert wait_for(lambda: len(camera_gw.spool.files()) == 1)
        sock.sendall(echo_request_pdus(echo_context, 2)[0])
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established)
        assert wait_for(lambda: not camera_gw.spool.files() and not spool_files_open())
        other = associate(port)
        assert other.send_c_echo().Status == 0x0000
        other.release()
    assert not stored(camera_gw)


def data_fragment_pdu(context_id: int, value: bytes) -> bytes:
    """A P-DATA-TF of one last data set fragment."""
    item = struct.pack(">IBB", len(value) + 2, context_id, 0x02) + value
    return struct.pack(">BBI", 4, 0, len(item)) + item


@pytest.mark.parametrize("after_an_echo", [False, True])
def test_a_data_set_fragment_before_any_command_aborts_as_the_peer_s_fault(camera_gw, caplog, after_an_echo):
    """A data set's fragment with no command before it (or after a C-ECHO, which has no data set): pynetdicom took
    it for a message, failed to read it, and logged that as an ERROR of its own with a traceback. It is the peer's
    fault: the association is aborted, one WARNING says why, and the gateway serves on."""
    import logging

    caplog.set_level(logging.WARNING)
    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        echo_context = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
        if after_an_echo:
            assert assoc.send_c_echo().Status == 0x0000
        assoc.dul.socket.socket.sendall(data_fragment_pdu(echo_context, bytes(8)))
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established)
        other = associate(port)
        assert other.send_c_echo().Status == 0x0000
        other.release()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == [("WARNING", "a DIMSE message's data set fragment before its command from 127.0.0.1 (CAMERA): "
                                "association aborted")], said
    assert not any(r.exc_info for r in caplog.records)


def test_a_c_store_the_spool_has_no_room_for_is_answered_out_of_resources_and_not_kept(camera_gw, tmp_path, monkeypatch):
    """The disk full when a C-STORE's data set starts: nothing of it is kept (in memory neither: pynetdicom's way
    gathers it all), the answer is 0xA700 so the sender tries again later, and the next C-STORE, with room again,
    is stored."""
    import errno

    sent = big_photo(tmp_path / "photo.dcm")
    new_file = camera_gw.spool.new_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        try:
            monkeypatch.setattr(camera_gw.spool, "new_file", full)
            answer = assoc.send_c_store(pydicom.dcmread(sent))
            assert answer.Status == 0xA700 and "send again" in answer.ErrorComment
            monkeypatch.setattr(camera_gw.spool, "new_file", new_file)
            assert not stored(camera_gw)
            assert assoc.send_c_store(pydicom.dcmread(sent)).Status == 0x0000
        finally:
            assoc.release()
    assert len(stored(camera_gw)) == 1 and not camera_gw.spool.files()


def test_a_store_request_pynetdicom_refuses_leaves_no_spool_file(camera_gw, tmp_path):
    """A C-STORE-RQ without a Message ID: pynetdicom drops it without calling the handler, after its data set was
    spooled; the file goes with it, and the association serves on."""
    sent = big_photo(tmp_path / "photo.dcm")
    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        for pdu in store_request_pdus(sent, assoc.accepted_contexts[0].context_id, 16384, drop=("MessageID",)):
            assoc.dul.socket.socket.sendall(pdu)
        assert wait_for(lambda: not camera_gw.spool.files() and assoc.is_established, 5)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assert not stored(camera_gw)


def test_a_dul_failure_mid_data_set_leaves_no_spool_file(camera_gw, tmp_path):
    """Half a data set, then a command of no known kind: pynetdicom's DUL aborts the association on its own (it
    raises reading it) and the reactor ends without kill(); the half-written file goes all the same."""
    sent = big_photo(tmp_path / "photo.dcm")
    with RunningListener(camera_gw) as port:
        assoc = associate(port)
        context_id = assoc.accepted_contexts[0].context_id
        pdus = store_request_pdus(sent, context_id, 16384)
        for pdu in pdus[: len(pdus) // 2]:
            assoc.dul.socket.socket.sendall(pdu)
        assert wait_for(lambda: len(camera_gw.spool.files()) == 1)
        assoc.dul.socket.socket.sendall(store_request_pdus(sent, context_id, 16384, command_field=0x7777)[0])
        assert wait_for(lambda: not camera_gw.spool.files())
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established)


def test_requests_packed_into_one_pdu_are_each_answered(camera_gw):
    """PS3.8 lets a P-DATA-TF carry fragments of more than one message: the end of one request and the next."""
    answered: list[int] = []
    with RunningListener(camera_gw) as port:
        ae = AE(ae_title="CAMERA")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", evt_handlers=[
            (evt.EVT_DIMSE_RECV, lambda e: answered.append(e.message.command_set.MessageIDBeingRespondedTo))])
        context_id = assoc.accepted_contexts[0].context_id
        bodies = b"".join(pdu[6:] for pdu in echo_request_pdus(context_id, 1) + echo_request_pdus(context_id, 2))
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(bodies)) + bodies)
        assert wait_for(lambda: len(answered) == 2, 5)
        assoc.release()
    assert answered == [1, 2]


def test_requests_pipelined_past_the_one_outstanding_wait_in_tcp_not_in_memory(camera_gw, monkeypatch):
    """A peer may have one request outstanding. Sent regardless, without reading the answers, every request waited in
    the association's queue (60 C-FINDs of 6.9 MiB identifiers: 831 MB). Past MAX_QUEUED_REQUESTS waiting, the DUL
    reads no more until one is taken up: the rest waits in TCP, at the peer. Each is still answered, in order."""
    from gateway.dicom import listener as listener_module
    from gateway.dicom.reactor import MAX_QUEUED_REQUESTS

    serve_echo = listener_module.DicomListener._on_echo

    def slow_echo(self, event):
        time.sleep(0.05)
        return serve_echo(self, event)

    monkeypatch.setattr(listener_module.DicomListener, "_on_echo", slow_echo)
    answered: list[int] = []
    deepest = [0]
    running = RunningListener(camera_gw)
    with running as port:
        ae = AE(ae_title="CAMERA")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", evt_handlers=[
            (evt.EVT_DIMSE_RECV, lambda e: answered.append(e.message.command_set.MessageIDBeingRespondedTo))])
        context_id = assoc.accepted_contexts[0].context_id
        [ours] = running.listener.ae.active_associations
        watching = threading.Event()

        def watch():
            while not watching.is_set():
                deepest[0] = max(deepest[0], ours.dimse.msg_queue.qsize())
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for message_id in range(1, 41):  # 40 requests at once, each in its own PDU
                assoc.dul.socket.socket.sendall(echo_request_pdus(context_id, message_id)[0])
            assert wait_for(lambda: len(answered) == 40, 30)
        finally:
            watching.set()
            watcher.join()
        assoc.release()
    assert answered == list(range(1, 41))
    assert deepest[0] <= MAX_QUEUED_REQUESTS


def test_event_reports_pipelined_past_a_few_at_once_abort_the_association(camera_gw, monkeypatch):
    """pynetdicom serves each N-EVENT-REPORT on a thread of its own as it arrives, outside the queue that holds
    pipelined requests back: a peer sending them without waiting for answers had a thread and a data set each.
    Past MAX_REPORTS_AT_ONCE being served, the association is aborted; the gateway serves on."""
    from pynetdicom import build_role
    from pynetdicom.dimse_messages import N_EVENT_REPORT_RQ
    from pynetdicom.dimse_primitives import N_EVENT_REPORT
    from pynetdicom.sop_class import StorageCommitmentPushModel

    from gateway.dicom import commitment
    from gateway.dicom.reactor import MAX_REPORTS_AT_ONCE

    at_once, most = [0], [0]
    lock = threading.Lock()

    def slow_report(gw, event):
        with lock:
            at_once[0] += 1
            most[0] = max(most[0], at_once[0])
        time.sleep(1.0)
        with lock:
            at_once[0] -= 1
        return 0x0000, None

    monkeypatch.setattr(commitment, "on_event_report", slow_report)
    with RunningListener(camera_gw) as port:
        ae = AE(ae_title="CAMERA")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        info = pydicom.Dataset()
        info.TransactionUID = "1.2.3.4"
        for message_id in range(1, 21):
            primitive = N_EVENT_REPORT()
            primitive.MessageID, primitive.EventTypeID = message_id, 1
            primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
            primitive.EventInformation = io.BytesIO(encode(info, True, True))
            message = N_EVENT_REPORT_RQ()
            message.primitive_to_message(primitive)
            for pdu in message.encode_msg(context_id, 16384):
                try:
                    assoc.dul.socket.socket.sendall(P_DATA_TF(pdu).encode())
                except OSError:  # aborted under us
                    break
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established)
        assert wait_for(lambda: at_once[0] == 0)
        other = associate(port)
        assert other.send_c_echo().Status == 0x0000
        other.release()
    assert 1 <= most[0] <= MAX_REPORTS_AT_ONCE
