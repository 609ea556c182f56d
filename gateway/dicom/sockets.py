"""Every DIMSE socket, ours or a peer's we connect to: Nagle off, and no read or write that waits for ever.

pynetdicom leaves accepted sockets, and requestor sockets once connected, blocking without a timeout. A peer that
sent part of a PDU and went silent, or stopped reading a C-GET's objects, held the DUL thread in recv() or
sendmsg() for as long as it kept the connection open; the idle timer then fired and asked for an abort that the
stuck thread never sent, so the association, its threads and its place under dicom_max_associations stayed (a
review held eleven places this way for 400 s, and a SIGTERM waited 113 s). A kernel timeout (SO_RCVTIMEO,
SO_SNDTIMEO) of the network timeout ends each such call with an error the DUL takes for the connection closing, and
costs nothing per call: Python's own socket timeout would poll() before every recv().
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from pynetdicom import evt


def guard(sock: socket.socket, timeout: float | None) -> None:
    # Nagle's algorithm otherwise holds every DIMSE response, or a C-STORE request's last segment, ~40 ms
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if timeout:
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


CONNECTION_OPEN = (evt.EVT_CONN_OPEN, on_connection_open)
