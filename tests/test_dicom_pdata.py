"""A DIMSE message framed in one piece (gateway/dicom/pdata.py) is byte for byte what pynetdicom sends fragment by
fragment, at any maximum PDU length a peer may ask for."""

from __future__ import annotations

import os
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_FIND_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from gateway.dicom.pdata import Framed, frame, framed_of, send_all


def _pynetdicom_bytes(msg, context_id: int, max_pdu: int) -> bytes:
    return b"".join(P_DATA_TF(p).encode() for p in msg.encode_msg(context_id, max_pdu))


def _store_rq(data: bytes) -> C_STORE_RQ:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Priority = 2
    primitive.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    return msg


# sizes around a 16 kB PDU's fragment (16382 - 6 = 16376 bytes), and a photo; 8: the smallest PDU, 2-byte fragments
CASES = [(max_pdu, size) for max_pdu in (0, 16382, 16384, 65536, 1 << 20) for size in (1, 16376, 16377, 3 * 1024 * 1024 + 5)]
CASES += [(8, size) for size in (1, 2, 3, 1001)]


@pytest.mark.parametrize(("max_pdu", "size"), CASES)
def test_a_store_request_is_framed_as_pynetdicom_frames_it(max_pdu, size):
    data = os.urandom(size)
    msg = _store_rq(data)
    expected = _pynetdicom_bytes(msg, 3, max_pdu)
    framed = frame(3, encode(msg.command_set, True, True), memoryview(data), max_pdu)
    assert b"".join(framed.pieces) == expected


@pytest.mark.parametrize(("max_pdu", "size"), CASES)
def test_a_data_set_in_several_buffers_is_framed_as_the_same_bytes_in_one(max_pdu, size):
    """The C-GET SCP sends a stored object as two buffers (the served header's data set, the file from Pixel Data
    on): fragments spanning the two hold a view of each, and the PDUs are those of the joined bytes."""
    data = os.urandom(size)
    msg = _store_rq(data)
    expected = _pynetdicom_bytes(msg, 3, max_pdu)
    command = encode(msg.command_set, True, True)
    for cuts in ([size // 2], [1, size // 3, size - 1], [0, size], list(range(0, size, 7))[:50]):
        bounds = [0, *sorted(c for c in cuts if 0 <= c <= size), size]
        parts = [memoryview(data)[a:b] for a, b in zip(bounds, bounds[1:])]
        assert b"".join(frame(3, command, parts, max_pdu).pieces) == expected, cuts


def test_a_message_without_a_data_set_is_its_command_alone():
    primitive = C_FIND()
    primitive.MessageIDBeingRespondedTo = 5
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    primitive.Status = 0x0000
    msg = C_FIND_RSP()
    msg.primitive_to_message(primitive)
    assert b"".join(frame(1, encode(msg.command_set, True, True), None, 16382).pieces) == _pynetdicom_bytes(msg, 1, 16382)


def test_only_our_framed_messages_are_recognised():
    from pynetdicom.pdu_primitives import P_DATA

    ours, theirs = P_DATA(), P_DATA()
    framed = Framed()
    ours.presentation_data_value_list.append((1, framed))
    theirs.presentation_data_value_list.append((1, b"\x03abc"))
    assert framed_of(P_DATA_TF(ours)) is framed
    assert framed_of(P_DATA_TF(theirs)) is None


def test_a_partly_written_message_is_written_on_from_where_the_kernel_stopped():
    """A socket with a timeout (as pynetdicom's) writes what fits in its buffer and says how much: the rest follows,
    in order, whatever the piece boundaries."""
    import socket
    import threading

    pieces = [os.urandom(n) for n in (6, 16376, 3, 5_000_000, 1, 70_000)] + [memoryview(os.urandom(100_000))[10:]]
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(30)
    got = bytearray()

    def read() -> None:
        while chunk := b.recv(65536):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    send_all(a, list(pieces))
    a.close()
    reader.join(30)
    b.close()
    assert bytes(got) == b"".join(pieces)


def test_a_message_goes_whole_over_tls_too(tmp_path):
    """TLS sockets take no sendmsg(): the pieces are joined and written as one (pynetdicom accepts TLS associations)."""
    import socket
    import ssl
    import subprocess
    import threading

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    listener = socket.create_server(("127.0.0.1", 0))
    pieces = [os.urandom(n) for n in (6, 16376, 6, 3_000_000)]
    got = bytearray()

    expected = b"".join(pieces)

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            while len(got) < len(expected) and (chunk := tls.recv(65536)):
                got.extend(chunk)

    server = threading.Thread(target=serve)
    server.start()
    with client_ctx.wrap_socket(socket.create_connection(listener.getsockname(), timeout=30), server_hostname="127.0.0.1") as tls:
        send_all(tls, list(pieces))
        server.join(30)  # before closing: a close with the server's session tickets unread resets the connection
    listener.close()
    assert bytes(got) == expected


def _primitives():
    from pynetdicom.dimse_messages import C_ECHO_RSP, C_GET_RSP, C_MOVE_RSP, C_STORE_RSP
    from pynetdicom.dimse_primitives import C_ECHO, C_GET, C_MOVE

    store = C_STORE()
    store.MessageID, store.Priority, store.DataSet = 7, 2, BytesIO(b"xx")
    store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.3.4.5"
    yield "store request", store, C_STORE_RQ
    moved = C_STORE()
    moved.MessageID, moved.Priority, moved.DataSet = 65535, 0, BytesIO(b"xx")
    moved.AffectedSOPClassUID, moved.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.33"  # odd lengths
    moved.MoveOriginatorApplicationEntityTitle, moved.MoveOriginatorMessageID = "PACS1", 3
    yield "store request of a C-MOVE", moved, C_STORE_RQ
    for status, identifier, comment in ((0xFF00, b"ab", None), (0x0000, None, None), (0xA900, None, "bad key"),
                                         (0xC000, None, "odd"), (0xFF00, b"", None)):
        found = C_FIND()
        found.MessageIDBeingRespondedTo, found.AffectedSOPClassUID, found.Status = 5, "1.2.840.10008.5.1.4.1.2.2.1", status
        found.Identifier = BytesIO(identifier) if identifier is not None else None
        found.ErrorComment = comment
        yield f"find response {status:04X} {identifier!r} {comment}", found, C_FIND_RSP
    for cls, prim in ((C_GET_RSP, C_GET()), (C_MOVE_RSP, C_MOVE())):
        prim.MessageIDBeingRespondedTo, prim.AffectedSOPClassUID, prim.Status = 5, "1.2.840.10008.5.1.4.1.2.2.3", 0xFF00
        prim.NumberOfRemainingSuboperations, prim.NumberOfCompletedSuboperations = 3, 1
        prim.NumberOfFailedSuboperations, prim.NumberOfWarningSuboperations = 0, 0
        yield cls.__name__, prim, cls
    stored = C_STORE()
    stored.MessageIDBeingRespondedTo, stored.AffectedSOPClassUID, stored.AffectedSOPInstanceUID = 5, "1.2.3", "1.2.3.4"
    stored.Status = 0
    yield "store response", stored, C_STORE_RSP
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.AffectedSOPClassUID, echo.Status = 1, "1.2.840.10008.1.1", 0
    yield "echo response", echo, C_ECHO_RSP


@pytest.mark.parametrize(("name", "primitive", "message_class"), list(_primitives()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_command_set_is_written_as_pynetdicom_writes_it(name, primitive, message_class):
    from gateway.dicom.command import command_set

    msg = message_class()
    msg.primitive_to_message(primitive)
    assert command_set(message_class.__name__, primitive) == encode(msg.command_set, True, True), name


def test_a_command_value_not_written_here_is_left_to_pynetdicom():
    from gateway.dicom.command import command_set

    found = C_FIND()
    found.MessageIDBeingRespondedTo, found.AffectedSOPClassUID, found.Status = 5, "1.2.840.10008.5.1.4.1.2.2.1", 0xA900
    found.ErrorComment = "clé inconnue"  # not ASCII: pydicom's character set handling writes it
    assert command_set("C_FIND_RSP", found) is None
    found.ErrorComment = None
    found.OffendingElement = [0x00100020]
    assert command_set("C_FIND_RSP", found) is None


def test_an_error_comment_is_ascii_as_the_command_set_holds_it():
    """A command set has no Specific Character Set: ErrorComment is in the default repertoire (PS3.7 6.3.1). A
    refusal may quote what the peer sent (a C-FIND's date read from UTF-8 bytes): pydicom wrote its accents as Latin-1
    bytes, outside the repertoire; they become '?' here, within the 64 bytes, and the message is written here."""
    from gateway.dicom.command import command_set, error_comment

    comment = error_comment("StudyDate '20\u00c3\u00a9 1' is not a DICOM date or date range (YYYYMMDD, A-B, -B, A-)")
    assert comment == "StudyDate '20?? 1' is not a DICOM date or date range...", comment
    assert error_comment("clé inconnue") == "cl? inconnue"
    assert error_comment("é" * 70).isascii() and len(error_comment("é" * 70)) <= 64
    found = C_FIND()
    found.MessageIDBeingRespondedTo, found.AffectedSOPClassUID, found.Status = 5, "1.2.840.10008.5.1.4.1.2.2.1", 0xA900
    found.ErrorComment = comment
    assert command_set("C_FIND_RSP", found) is not None


def _decoded_by_pynetdicom(command: bytes):
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    pdata = P_DATA()
    pdata.presentation_data_value_list = [[1, b"\x03" + command]]
    message = DIMSEMessage()
    assert message.decode_msg(pdata, None)
    return message.message_to_primitive()


def _fields(primitive) -> dict:
    from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS

    keywords = {k for ks in _COMMAND_SET_KEYWORDS.values() for k in ks}
    return {k: getattr(primitive, k) for k in sorted(keywords) if hasattr(primitive, k)}


def test_every_response_read_directly_is_what_pynetdicom_reads():
    """Property: for every DIMSE response type and random primitives, a command set read by command.response_of is
    None (left to pynetdicom) or a primitive of the same class with every field pynetdicom's decode gives it."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from pynetdicom.dimse import _RSP_TO_MESSAGE

    from gateway.dicom.command import response_of
    from tests.test_dicom_send_attacks import _random_primitive

    classes = sorted(set(_RSP_TO_MESSAGE.values()), key=lambda c: c.__name__)
    read: set[str] = set()

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def check(data):
        message_class = data.draw(st.sampled_from(classes), label="message")
        msg = message_class()
        try:
            msg.primitive_to_message(_random_primitive(data, message_class))
        except ValueError:  # a value pynetdicom itself cannot put in a message (an Offending Element of ':')
            return
        command = encode(msg.command_set, True, True)
        ours = response_of(command)
        if ours is None:
            return
        theirs = _decoded_by_pynetdicom(command)
        assert type(ours) is type(theirs) and _fields(ours) == _fields(theirs)
        read.add(message_class.__name__)

    check()
    assert "C_STORE_RSP" in read and len(read) >= 6, read  # which others the random draws reach varies


@pytest.mark.parametrize("command", [
    b"", b"\x00\x00", b"\x00\x00\x00\x00\x04\x00\x00\x00\xff\xff\xff\xff",  # cut short; a group length past the end
    bytes.fromhex("0000000004000000120000000000000102000000018000000008020000000101"),  # the group length wrong
    bytes.fromhex("000000000a000000000100000200000001800000080200000001000000000000"),  # a data set follows
    bytes.fromhex("00000000040000000a000000000100000200000010000008020000000101"),  # a request (C-ECHO-RQ)
])
def test_a_command_set_not_read_here_is_left_to_pynetdicom(command):
    from gateway.dicom.command import response_of

    assert response_of(command) is None


def test_a_store_response_is_read_as_pynetdicom_reads_it():
    from pynetdicom.dimse_messages import C_STORE_RSP

    from gateway.dicom.command import response_of

    stored = C_STORE()
    stored.MessageIDBeingRespondedTo, stored.Status = 9, 0xB007
    stored.AffectedSOPClassUID, stored.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.826.0.1.3"
    msg = C_STORE_RSP()
    msg.primitive_to_message(stored)
    command = encode(msg.command_set, True, True)
    ours = response_of(command)
    assert isinstance(ours, C_STORE) and ours.Status == 0xB007 and ours.MessageIDBeingRespondedTo == 9
    assert _fields(ours) == _fields(_decoded_by_pynetdicom(command))
