"""Every DIMSE socket, ours or a peer's we connect to: Nagle off, and no read or write that waits for ever.

pynetdicom leaves accepted sockets, and requestor sockets once connected, blocking without a timeout. A peer that
sent part of a PDU and went silent, or stopped reading a C-GET's objects, held the DUL thread in recv() or
sendmsg() for as long as it kept the connection open; the idle timer then fired and asked for an abort that the
stuck thread never sent, so the association, its threads and its place under dicom_max_associations stayed (a
review held eleven places this way for 400 s, and a SIGTERM waited 113 s). A kernel timeout (SO_RCVTIMEO,
SO_SNDTIMEO) of the network timeout ends each such call with an error the DUL takes for the connection closing, and
costs nothing per call: Python's own socket timeout would poll() before every recv(). A TLS socket gets Python's
own timeout instead (the kernel's do not end a call on it: guard()).
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any

from pynetdicom import evt


def guard(sock: socket.socket, timeout: float | None) -> None:
    # Nagle's algorithm otherwise holds every DIMSE response, or a C-STORE request's last segment, ~40 ms
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if timeout and isinstance(sock, ssl.SSLSocket):
        # Python's own timeout: on a blocking TLS socket the kernel's ends the recv() or send() under OpenSSL, which
        # Python's ssl module takes for "try again" and calls again, for ever (a peer stalled mid-PDU, or a C-GET
        # requestor that stopped reading, held its association past 40 s with a 1 s idle timeout, until it let go).
        # It costs no poll() a call here: ssl reads and writes first, and waits only when OpenSSL wants more.
        sock.settimeout(timeout)
    elif timeout:
        whole = int(timeout)
        interval = struct.pack("ll", whole, int((timeout - whole) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)


def cut(sock: Any) -> None:
    """Shut the connection down both ways: a thread blocked reading or writing it returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):  # closed already
        pass


def on_connection_open(event: Any) -> None:
    """EVT_CONN_OPEN handler, for the associations peers open to us and those we open to them."""
    assoc = event.assoc
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        guard(transport.socket, assoc.network_timeout)


def on_connection_close(event: Any) -> None:
    """EVT_CONN_CLOSE handler for the associations we open (C-MOVE and routing destinations): a C-STORE waiting for
    its response is told there will be none, as pynetdicom tells it on the peer's A-ABORT. Without it, a C-STORE sent
    as the connection ended (its send timed out: the destination stopped reading) still looked established and waited
    out the DIMSE timeout (30 s), longer than a C-MOVE requestor waits for the final response."""
    event.assoc.dimse.msg_queue.put((None, None))


def connection_ended(assoc: Any) -> bool:
    """The association's connection is gone (aborted by either side, or its DUL stopped), though pynetdicom may still
    call the association established for a moment: a C-STORE sent now would wait out the DIMSE timeout (30 s)."""
    return bool(assoc.acse.is_aborted() or not assoc.dul.is_alive())


def fails_fast_once_closed(assoc: Any) -> Any:
    """`assoc` (one we opened to a C-MOVE or routing destination), its send_c_store() raising at once when the
    connection has ended: the next C-STORE after a destination stopped reading waited out the DIMSE timeout, longer
    than the C-MOVE requestor waited for the final response (it got none)."""
    send = assoc.send_c_store

    def send_c_store(*args: Any, **kwargs: Any) -> Any:
        if connection_ended(assoc):
            raise ConnectionError("the association with the destination has ended")
        return send(*args, **kwargs)

    assoc.send_c_store = send_c_store
    return assoc


CONNECTION_OPEN = (evt.EVT_CONN_OPEN, on_connection_open)
CONNECTION_CLOSE = (evt.EVT_CONN_CLOSE, on_connection_close)
