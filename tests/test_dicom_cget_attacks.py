"""Attacks on the C-GET/C-MOVE path (pending.py's throttle, command.response_of, EventAssociation.send_c_store of an
EncodedDataSet, retrieve._send reading the next object once this one is written, EventDUL reading before sending),
on real sockets with pynetdicom as the peers.

What must hold: a peer's C-STORE responses are counted as it meant them (refused, warning with an Error Comment or
an Offending Element, a response in several PDUs); a peer ending its association mid-photo leaves no thread behind;
a C-MOVE requestor still sees progress, request after request with the same Message ID; a stored file lost during
a retrieve fails that sub-operation only (the objects after it still go); a gateway stopping mid-retrieve leaves no
thread waiting on a response that cannot come; a peer sending requests without reading the responses cannot make
the gateway queue them without bound (the DUL reading before it sends).
"""

from __future__ import annotations

import threading
import time
from io import BytesIO

import pydicom
import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_ROOT_MOVE
from pynetdicom.sop_class import Verification, VLPhotographicImageStorage
from sqlalchemy import select

from gateway.core.policy.settings import DicomPeer
from store.models import Asset
from tests.net import free_port
from tests.test_dicom_association import RunningListener
from tests.test_dicom_send_attacks import a_series, viewer  # noqa: F401 (the fixture)


def get_requestor(on_store) -> tuple[AE, dict]:
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(VLPhotographicImageStorage, [ExplicitVRLittleEndian])
    return ae, {"ae_title": "CLINPHOTO", "ext_neg": [build_role(VLPhotographicImageStorage, scp_role=True)],
                "evt_handlers": [(evt.EVT_C_STORE, on_store)]}


def uid_of(event) -> str:
    return str(read_dataset(BytesIO(event.request.DataSet.getvalue()), is_implicit_VR=False,
                            is_little_endian=True).SOPInstanceUID)


def retrieve_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dicom-retrieve")]


def busy(running: RunningListener, accepted: list) -> list:
    return [a for a in accepted if a.is_alive()] + retrieve_threads()


def wait_idle(running: RunningListener, accepted: list, limit: float) -> float:
    started = time.monotonic()
    while busy(running, accepted) and time.monotonic() - started < limit:
        time.sleep(0.05)
    return time.monotonic() - started


def test_store_responses_refused_warned_commented_or_in_small_pdus_are_counted_as_meant(viewer, tmp_path):  # noqa: F811
    """Refused (0xA700, read by response_of), a warning with an Error Comment and a failure with an Offending Element
    (left to pynetdicom's decode), each C-STORE response sent in 20-byte PDUs by the last requestor (several
    fragments: pynetdicom's decode): the counts and Failed SOP Instance UID List say exactly that."""
    identifier, expected = a_series(viewer, tmp_path, 4)
    for small_pdus in (False, True):
        got: list[tuple[str, bytes]] = []

        def on_store(event, got=got):
            got.append((uid_of(event), event.request.DataSet.getvalue()))
            ds = pydicom.Dataset()
            ds.Status = [0xA700, 0xB007, 0xA900, 0x0000][len(got) - 1]
            if len(got) == 2:
                ds.ErrorComment = "coerced"
            if len(got) == 3:
                ds.ErrorComment, ds.OffendingElement = "no", [0x00100010]
            return ds

        ae, kw = get_requestor(on_store)
        with RunningListener(viewer) as port:
            assoc = ae.associate("127.0.0.1", port, **kw)
            assert assoc.is_established
            if small_pdus:  # a sender may send PDUs shorter than the maximum: every response in fragments
                assoc.dimse.__class__ = type("SmallPDUs", (type(assoc.dimse),), {"maximum_pdu_size": property(lambda s: 20)})
            try:
                statuses = [s for s, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET) if s]
            finally:
                assoc.release()
        final = statuses[-1]
        assert final.Status == 0xB000, final
        assert (final.NumberOfCompletedSuboperations, final.NumberOfWarningSuboperations,
                final.NumberOfFailedSuboperations) == (1, 1, 2)
        assert dict(got) == expected


@pytest.mark.parametrize("how", ["abort", "close"])
def test_a_peer_ending_mid_photo_leaves_no_thread_behind(viewer, tmp_path, how):  # noqa: F811
    """The requestor aborts (or its connection drops) while the second of five photos is with it: the gateway's
    association and retrieve threads end at once, and the next C-GET gets every photo."""
    viewer.settings.dicom_pending_interval = 30  # its final response only, however loaded the machine
    identifier, expected = a_series(viewer, tmp_path, 5)
    got: list[str] = []
    ended: list[float] = []

    def end(assoc) -> None:
        ended.append(time.monotonic())
        if how == "abort":
            assoc.abort()
        else:
            assoc.dul.socket.socket.shutdown(2)

    def on_store(event):
        got.append(uid_of(event))
        if len(got) == 2:
            threading.Thread(target=end, args=(event.assoc,)).start()
            time.sleep(0.3)
        return 0x0000

    ae, kw = get_requestor(on_store)
    running = RunningListener(viewer)
    with running as port:
        assoc = ae.associate("127.0.0.1", port, **kw)
        accepted = list(running.listener._server.active_associations)
        threading.Thread(target=lambda: list(assoc.send_c_get(identifier, STUDY_ROOT_GET)), daemon=True).start()
        while not ended:
            time.sleep(0.01)
        assert wait_idle(running, accepted, 25) < 10, busy(running, accepted)
        again: list[tuple[str, bytes]] = []

        def keep(event):
            again.append((uid_of(event), event.request.DataSet.getvalue()))
            return 0x0000

        ae, kw = get_requestor(keep)
        second = ae.associate("127.0.0.1", port, **kw)
        statuses = [s.Status for s, _ in second.send_c_get(identifier, STUDY_ROOT_GET) if s]
        second.release()
    assert statuses == [0x0000] and dict(again) == expected


def test_a_c_move_requestor_sees_progress_request_after_request_with_the_same_message_id(viewer, tmp_path):  # noqa: F811
    """A destination taking 0.3 s a photo, an interval of 0.2 s: each photo's pending response goes, with its
    counts, on both of two C-MOVEs that reuse Message ID 7 on one association; the final response has the counts."""
    identifier, expected = a_series(viewer, tmp_path, 4)
    viewer.settings.dicom_pending_interval = 0.2
    dest_port = free_port()
    viewer.settings.auth.dicom_peers[0] = viewer.settings.auth.dicom_peers[0].model_copy(update={"allow": ["echo", "move"]})
    viewer.settings.auth.dicom_peers.append(DicomPeer(ae_title="DEST", hosts=["127.0.0.1"], port=dest_port, allow=["echo"]))
    stored: list[str] = []

    def on_store(event):
        time.sleep(0.3)
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    dest = AE(ae_title="DEST")
    dest.add_supported_context(VLPhotographicImageStorage, [ExplicitVRLittleEndian])
    server = dest.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        with RunningListener(viewer) as port:
            ae = AE(ae_title="VIEWER")
            ae.add_requested_context(STUDY_ROOT_MOVE)
            assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
            try:
                runs = [[s for s, _ in assoc.send_c_move(identifier, "DEST", STUDY_ROOT_MOVE, msg_id=7) if s]
                        for _ in range(2)]
            finally:
                assoc.release()
    finally:
        server.shutdown()
    for statuses in runs:
        assert [s.Status for s in statuses] == [0xFF00] * 4 + [0x0000]
        assert [s.NumberOfCompletedSuboperations for s in statuses] == [1, 2, 3, 4, 4]
    assert sorted(stored) == sorted(list(expected) * 2)


def test_a_stored_file_lost_during_a_c_get_fails_that_sub_operation_only(viewer, tmp_path):  # noqa: F811
    """While the first photo is with the requestor, the stored files of three of the other four go (a store check,
    a disk fault): those sub-operations fail, named in the Failed SOP Instance UID List, and the last photo, whose
    file is there, still goes: final 0xB000. (The read's exception ended the whole retrieve, 0xC411, the photos
    after it never sent.)"""
    identifier, expected = a_series(viewer, tmp_path, 5)
    with viewer.db.read() as s:
        sha = {a.sop_instance_uid: a.dicom_sha256 for a in s.scalars(select(Asset))}
    got: list[tuple[str, bytes]] = []
    kept: list[str] = []

    def on_store(event):
        got.append((uid_of(event), event.request.DataSet.getvalue()))
        if len(got) == 1:
            others = sorted(uid for uid in expected if uid != got[0][0])
            kept.append(others.pop())
            for uid in others:
                viewer.blobs.path(sha[uid]).unlink()
        return 0x0000

    ae, kw = get_requestor(on_store)
    with RunningListener(viewer) as port:
        assoc = ae.associate("127.0.0.1", port, **kw)
        try:
            responses = [(s, i) for s, i in assoc.send_c_get(identifier, STUDY_ROOT_GET) if s]
        finally:
            assoc.release()
    final, failed_list = responses[-1]
    received = dict(got)
    assert final.Status == 0xB000, final
    assert final.NumberOfCompletedSuboperations == len(received) and final.NumberOfFailedSuboperations == 5 - len(received)
    assert kept[0] in received and len(received) >= 2
    assert all(expected[uid] == data for uid, data in received.items())
    assert failed_list is not None and set(failed_list.FailedSOPInstanceUIDList) == set(expected) - set(received)


def test_a_gateway_stopping_mid_c_get_leaves_no_thread_waiting(viewer, tmp_path):  # noqa: F811
    """A slow requestor (1 s a photo, 20 photos): the gateway stops, waits its grace, aborts the association. Its
    thread and the retrieve's reader end then, not after the DIMSE timeout (30 s) of a C-STORE response that no
    longer can come."""
    identifier, _ = a_series(viewer, tmp_path, 20)

    def on_store(event):
        time.sleep(1.0)
        return 0x0000

    ae, kw = get_requestor(on_store)
    running = RunningListener(viewer)
    port = running.__enter__()
    try:
        assoc = ae.associate("127.0.0.1", port, **kw)
        accepted = list(running.listener._server.active_associations)
        threading.Thread(target=lambda: list(assoc.send_c_get(identifier, STUDY_ROOT_GET)), daemon=True).start()
        time.sleep(1.5)
    finally:
        running.__exit__(None, None, None)
    assert wait_idle(running, accepted, 40) < 5, busy(running, accepted)


def _echo_requests(context_id: int, n: int) -> bytes:
    """n C-ECHO requests as pynetdicom encodes them, P-DATA-TF PDUs one after the other."""
    out = []
    for i in range(n):
        request = C_ECHO()
        request.MessageID, request.AffectedSOPClassUID = i % 65535 + 1, Verification
        message = C_ECHO_RQ()
        message.primitive_to_message(request)
        for pdata in message.encode_msg(context_id, 0):
            pdu = P_DATA_TF()
            pdu.from_primitive(pdata)
            out.append(pdu.encode())
    return b"".join(out)


def test_a_peer_that_sends_without_reading_cannot_make_the_gateway_queue_without_bound(viewer):  # noqa: F811
    """A peer pipelines C-ECHO requests for 6 s and reads nothing back. The DUL read whatever was waiting before
    each send, so with requests always waiting it never sent: every response stayed queued in memory (16,000 after
    8 s here, growing while the peer went on). One read before each send at most: the DUL sends, blocks on the
    peer that does not read, and TCP holds the peer back."""
    running = RunningListener(viewer)
    with running as port:
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
        assert assoc.is_established
        [ours] = running.listener._server.active_associations
        requests = _echo_requests(assoc._get_valid_context(Verification, "", "scu").context_id, 500)
        assoc.dul._kill_thread = True  # the peer's DUL loop ends (nothing reads its socket), the connection stays
        assoc.dul.join(5)
        sock = assoc.dul.socket.socket
        sock.settimeout(0.2)
        peak, started = 0, time.monotonic()
        try:
            while time.monotonic() - started < 6:
                try:
                    sock.sendall(requests)
                except TimeoutError:
                    pass
                peak = max(peak, ours.dul.to_provider_queue.qsize())
        finally:
            sock.close()
    assert peak < 2000, f"{peak} responses queued"
