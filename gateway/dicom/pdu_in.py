"""Reading PDUs off an association's socket, and a P-DATA-TF's presentation data values without building objects.

pynetdicom reads a PDU's body in recv() calls of at most 4,096 bytes, each copied onto a growing bytearray, then
copies it to bytes, decodes it into a P_DATA_TF of PresentationDataValueItem objects, queues an event for its state
machine and turns the PDU into a P_DATA primitive there. A 12-MP photo comes as ~200 PDUs of 16 kB (pynetdicom's and
dcmtk's default): that was the largest part of the gateway's CPU for a C-STORE (py-spy, ~22 ms of CPU per photo in
the gateway process, whose Python runs one thread at a time). Here the body is read into one buffer in as few
recv_into() calls as the kernel takes, and a P-DATA-TF's values are handed on as views of it.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

_PDU_HEADER = struct.Struct(">BBL")  # type, reserved, length
_ITEM_HEADER = struct.Struct(">LB")  # PDV item length, presentation context id
P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))


class ConnectionEnded(Exception):
    """The peer closed the connection (or it failed, or timed out) before a whole PDU came."""


# the longest P-DATA-TF our side takes, given in every association negotiation, and one association's PDU never more
# than this in memory. A PDU's fragment is written and hashed once the whole PDU has come (spooled.py): at 4 MiB a
# 12-MP photo came in one PDU and all its ~3.9 ms of writing and hashing followed the last byte, while the peer
# waited; at 1 MiB only the last PDU's does, the others' overlap the sending. A/B, 12-MP C-STORE, 6 batches of 40 in
# turns: one association 48.5 -> 61.2 files/s, four 66.3 -> 75.0; 512 KiB the same, 128 KiB slower (per-PDU work),
# 2 MiB no gain on four.
MAX_PDU_LENGTH = 1024 * 1024
FIRST_READ = 1 << 20  # bytes made ready for a PDU's body before any has come: the rest as it comes


def read_exactly(sock: socket.socket | ssl.SSLSocket, size: int, deadline: float | None = None) -> bytearray:
    """`size` bytes from the socket, blocking until they have all come, or ConnectionEnded once `deadline`
    (time.monotonic()) has passed. The buffer grows (doubling) as bytes arrive, so a length a peer only claims (a
    header saying 4 GB) costs no memory it has not sent."""
    buffer = bytearray(min(size, FIRST_READ))
    got = 0
    try:
        while got < size:
            if got == len(buffer):
                buffer.extend(bytes(min(size - got, len(buffer))))
            with memoryview(buffer) as view:
                n = sock.recv_into(view[got:], len(buffer) - got)
            if n == 0:
                raise ConnectionEnded(f"closed after {got} of {size} bytes")
            got += n
            if deadline is not None and got < size and time.monotonic() > deadline:
                raise ConnectionEnded(f"{got} of {size} bytes in the time allowed")
    except OSError as exc:  # TimeoutError included
        raise ConnectionEnded(type(exc).__name__) from exc
    return buffer


class PduTooLong(Exception):
    """A P-DATA-TF longer than the maximum length this side gave in its association negotiation."""


def read_pdu(sock: socket.socket | ssl.SSLSocket, max_pdata: int = 0,
             deadline: float | None = None) -> tuple[int, bytearray, bytearray]:
    """The next PDU: its type, its 6-byte header and its body, whole by `deadline` (time.monotonic()). `max_pdata`:
    the longest P-DATA-TF taken (0: any); a longer one raises PduTooLong before its body is read (PS3.8 9.3.1: the
    peer may send no more)."""
    header = read_exactly(sock, 6, deadline)
    pdu_type, _, length = _PDU_HEADER.unpack(header)
    if pdu_type not in PDU_TYPES:
        return pdu_type, header, bytearray()  # the caller refuses it before reading on (as pynetdicom does)
    if pdu_type == P_DATA_TF and 0 < max_pdata < length:
        raise PduTooLong(f"a P-DATA-TF of {length} bytes, over the {max_pdata} agreed")
    return pdu_type, header, read_exactly(sock, length, deadline)


def pdata_values(body: bytearray) -> list[tuple[int, memoryview]] | None:
    """A P-DATA-TF body's presentation data values as (context id, value with its message control header), views of
    `body`; None when the items do not add up to the PDU (PS3.8 9.3.5: each at least its context id and header)."""
    values: list[tuple[int, memoryview]] = []
    view = memoryview(body)
    at, end = 0, len(body)
    while at < end:
        if end - at < 6:
            return None
        length, context_id = _ITEM_HEADER.unpack_from(body, at)
        if length < 2 or at + 4 + length > end:
            return None
        values.append((context_id, view[at + 5:at + 4 + length]))
        at += 4 + length
    return values if values else None
